"""Find the weights of a named model and load them exactly, with errors that say what to do.

Resolution order for each file: an explicit path (the `FLUX_MODEL` / `FLUX_AE` environment variables, as in
the reference CLI), then a local directory in the hub repo's layout (`weights_dir`; flux-tiny's is generated
on first use), then `huggingface_hub.hf_hub_download` into the normal HF cache, which honours `HF_TOKEN`,
`HF_HOME`/`HF_HUB_CACHE` and `HF_HUB_OFFLINE`. Only the files a run needs are fetched.

Models are built on the meta device and the checkpoint tensors are loaded straight to the target device with
`strict=True, assign=True`: a wrong or incomplete checkpoint fails loudly instead of leaving random weights.
"""

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from flux.autoencoder import AutoEncoder
from flux.configs import ModelSpec
from flux.errors import UserError
from flux.model import Flux

HUB = "hub"  # a `weights_dir` value that skips the local defaults and goes straight to the hub
_DIFFUSION_PREFIX = "model.diffusion_model."  # ComfyUI-style single files carry this prefix


def default_weights_dir(spec: ModelSpec) -> Path | None:
    """The local directory a model uses when none is given: flux-tiny's generated repo, else none (hub)."""
    if spec.name == "flux-tiny":
        from flux.tiny import ensure_tiny_repo

        return ensure_tiny_repo()
    return None


def _local_dir(spec: ModelSpec, weights_dir: str | Path | None) -> Path | None:
    if weights_dir == HUB:
        return None
    if weights_dir is None:
        return default_weights_dir(spec)
    path = Path(weights_dir).expanduser()
    if not path.is_dir():
        raise UserError(
            f"The weights directory {str(path)!r} does not exist. Pass a directory laid out like the hub "
            f"repo {spec.repo_id} (e.g. made by `huggingface-cli download {spec.repo_id} --local-dir DIR`), "
            "or leave it out to use the Hugging Face cache."
        )
    return path


def hub_download(repo_id: str, filename: str, *, gated: bool = False, what: str = "weights") -> Path:
    """hf_hub_download with each failure turned into one paragraph that says what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename))
    except GatedRepoError as e:
        raise UserError(
            f"{repo_id} is a gated repository and this machine has no access to it. Accept the licence at "
            f"https://huggingface.co/{repo_id}, then set HF_TOKEN to a token of that account (or run "
            "`huggingface-cli login`). Alternatively point FLUX_MODEL and FLUX_AE at local copies of "
            f"{filename} and ae.safetensors."
        ) from e
    except RepositoryNotFoundError as e:
        hint = " It may be gated: accept its licence and set HF_TOKEN." if gated else ""
        raise UserError(f"The hub repository {repo_id} was not found or is not visible.{hint}") from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: newer hubs subclass it
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise UserError(
            f"{filename} ({what}) from {repo_id} is not in the Hugging Face cache and {why}. Download "
            f"it once with network access (`huggingface-cli download {repo_id} {filename}`), or set "
            "FLUX_MODEL / FLUX_AE to local files, or pass a local weights directory."
        ) from e
    except EntryNotFoundError as e:
        raise UserError(f"The hub repository {repo_id} has no file {filename!r} ({what}).") from e


def _resolve(spec: ModelSpec, filename: str, env_var: str, weights_dir: str | Path | None, what: str) -> Path:
    explicit = os.environ.get(env_var)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"{env_var} points at {str(path)!r}, which is not a file. Fix or unset it.")
        return path
    local = _local_dir(spec, weights_dir)
    if local is not None:
        path = local / filename
        if not path.is_file():
            raise UserError(
                f"The weights directory {str(local)!r} has no {filename} ({what} of {spec.name}). "
                f"Download it from {spec.repo_id} into that directory, or set {env_var} to the file."
            )
        return path
    return hub_download(spec.repo_id, filename, gated=spec.gated, what=what)


def resolve_flow_path(spec: ModelSpec, weights_dir: str | Path | None = None) -> Path:
    """Path of the flow transformer's safetensors file (FLUX_MODEL, local directory, or the hub)."""
    return _resolve(spec, spec.repo_flow, "FLUX_MODEL", weights_dir, "flow transformer")


def resolve_ae_path(spec: ModelSpec, weights_dir: str | Path | None = None) -> Path:
    """Path of the autoencoder's safetensors file (FLUX_AE, local directory, or the hub)."""
    return _resolve(spec, spec.repo_ae, "FLUX_AE", weights_dir, "autoencoder")


def text_encoder_source(spec: ModelSpec, weights_dir: str | Path | None = None) -> str | Path:
    """Where T5 and CLIP come from: FLUX_TEXT_ENCODERS, a local directory with their subfolders, or a repo."""
    explicit = os.environ.get("FLUX_TEXT_ENCODERS")
    if explicit:
        return Path(explicit).expanduser()
    local = _local_dir(spec, weights_dir)
    if local is not None and (local / "text_encoder_2").is_dir():
        return local
    return spec.text_repo_id


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, loaded straight to `device`."""
    try:
        sd = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"Could not read {str(path)!r} as safetensors ({e}). The file is corrupt or truncated: "
            "delete it and download it again."
        ) from e
    if sd and all(k.startswith(_DIFFUSION_PREFIX) for k in sd):
        sd = {k.removeprefix(_DIFFUSION_PREFIX): v for k, v in sd.items()}
    return sd


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Raise a UserError naming missing, unexpected and mis-shaped keys, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if wrong:
        shapes = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in wrong]
        problems.append(f"{len(wrong)} with the wrong shape ({few(shapes)})")
    raise UserError(
        f"{str(path)!r} does not match the {what}: {'; '.join(problems)} keys. Check that the file is the "
        "right one for this --model (schnell has no guidance_in; dev and Krea do)."
    )


def load_checkpoint(model_factory, path: Path, device, dtype: torch.dtype | None, what: str) -> nn.Module:
    """Build a module on meta, then load `path` into it strictly, tensors landing on `device` in `dtype`."""
    with torch.device("meta"):
        model = model_factory()
    sd = read_state_dict(path, device)
    check_state_dict(model, sd, path, what)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_flow_model(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weights_dir: str | Path | None = None,
) -> Flux:
    """The flow transformer of `spec` with its published weights, on `device` in `dtype`."""
    path = resolve_flow_path(spec, weights_dir)
    return load_checkpoint(lambda: Flux(spec.params), path, device, dtype, f"{spec.name} flow transformer")


def load_ae(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights_dir: str | Path | None = None,
) -> AutoEncoder:
    """The autoencoder of `spec`; by default in the checkpoint's own dtype (float32 for FLUX.1)."""
    path = resolve_ae_path(spec, weights_dir)
    return load_checkpoint(lambda: AutoEncoder(spec.ae_params), path, device, dtype, "FLUX autoencoder")


def load_text_encoders(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weights_dir: str | Path | None = None,
):
    """(T5, CLIP) embedders for `spec`, from the source `text_encoder_source` picks."""
    from flux.conditioner import load_text_embedder

    source = text_encoder_source(spec, weights_dir)
    t5 = load_text_embedder(
        "t5", source, "text_encoder_2", "tokenizer_2", spec.t5_max_length, device=device, dtype=dtype
    )
    clip = load_text_embedder(
        "clip", source, "text_encoder", "tokenizer", spec.clip_max_length, device=device, dtype=dtype
    )
    return t5, clip
