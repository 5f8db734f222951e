"""Find the weights of a named model and load them exactly, with errors that say what to do.

Resolution order for each file: a `weights_dir` given by the caller (a local directory in the hub repo's
layout, or "hub"), then an explicit path in the environment (`FLUX_MODEL` / `FLUX_AE` / `FLUX_TEXT_ENCODERS`,
as in the reference CLI; T5 and CLIP only skip the variable for a weights_dir that holds them), then the
default local directory (flux-tiny's, generated on first use), then `huggingface_hub.hf_hub_download` into the
normal HF cache, which honours `HF_TOKEN`, `HF_HOME`/`HF_HUB_CACHE` and `HF_HUB_OFFLINE`. Only the files a run
needs are fetched.

Models are built on the meta device and the checkpoint tensors are loaded straight to the target device with
`strict=True, assign=True`: a wrong or incomplete checkpoint fails loudly instead of leaving random weights.
"""

import contextlib
import errno
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from flux.autoencoder import AutoEncoder
from flux.configs import CONFIGS, ModelSpec
from flux.errors import UsageError, UserError
from flux.model import Flux

HUB = "hub"  # a `weights_dir` value that skips the local defaults and goes straight to the hub


def hub_command(args: str) -> str:
    """The shell command that runs huggingface_hub's CLI with `args` ("download ...", "login"): `hf`, which
    huggingface_hub ships from 0.34 on (newer releases have no `huggingface-cli`), else `huggingface-cli`."""
    from importlib.metadata import version

    major_minor = re.match(r"(\d+)\.(\d+)", version("huggingface_hub"))
    if major_minor is None or (int(major_minor[1]), int(major_minor[2])) >= (0, 34):
        return f"hf {'auth login' if args == 'login' else args}"
    return f"huggingface-cli {args}"


_WITHOUT_HUB_FLAG = " (and leave out --weights_dir hub, which overrides them)"
_DIFFUSION_PREFIX = "model.diffusion_model."  # ComfyUI-style single files carry this prefix
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Failures to reach the hub of huggingface_hub's HTTP client: requests' RequestException (< 1.0), or
    the RequestError of httpx and its successors (>= 1.0). Local errors such as a full disk are not among
    them."""
    from huggingface_hub import get_session

    errors: list[type[BaseException]] = []
    client_module = sys.modules.get(type(get_session()).__module__.split(".")[0])
    for name in ("RequestError", "RequestException"):
        error = getattr(client_module, name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def default_weights_dir(spec: ModelSpec) -> Path | None:
    """The local directory a model uses when none is given: flux-tiny's generated repo, else none (hub)."""
    if spec.name == "flux-tiny":
        from flux.tiny import ensure_tiny_repo

        return ensure_tiny_repo()
    return None


def check_weights_dir(spec: ModelSpec, weights_dir: str | Path | None) -> None:
    """A UsageError for a --weights_dir that cannot work, before anything loads."""
    if weights_dir is None:
        return
    if weights_dir == HUB and spec.repo_id == CONFIGS["flux-tiny"].repo_id:
        from huggingface_hub import constants, try_to_load_from_cache

        on_huggingface_co = constants.ENDPOINT.rstrip("/") == "https://huggingface.co"  # not a mirror
        if on_huggingface_co and not isinstance(try_to_load_from_cache(spec.repo_id, spec.repo_flow), str):
            from flux.tiny import tiny_repo_dir

            raise UsageError(
                "flux-tiny is not on the Hugging Face hub: its weights are made on this machine from a seed "
                f"(into {tiny_repo_dir()}), and the Hugging Face cache holds no copy for --weights_dir hub "
                "to read. Leave out --weights_dir to use them."
            )
    if weights_dir != HUB and not Path(weights_dir).expanduser().is_dir():
        how = (
            "made by `flux.tiny.ensure_tiny_repo(FOLDER)`"
            if spec.name == "flux-tiny"
            else f"e.g. made by `{hub_command(f'download {spec.repo_id} {spec.repo_flow} {spec.repo_ae}')} "
            "--local-dir FOLDER`"
        )
        raise UsageError(
            f"--weights_dir {str(weights_dir)!r} is not a directory. Pass a folder laid out like the hub "
            f"repo {spec.repo_id} ({how}), or leave it out to use the default."
        )


def _local_dir(spec: ModelSpec, weights_dir: str | Path | None) -> Path | None:
    check_weights_dir(spec, weights_dir)
    if weights_dir == HUB:
        return None
    if weights_dir is None:
        return default_weights_dir(spec)
    return Path(weights_dir).expanduser()


@contextlib.contextmanager
def _hub_errors(repo_id: str, filename: str, *, gated: bool, what: str):
    """Turn each way a hub request can fail into one paragraph that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError as e:
        raise UserError(
            f"{repo_id} is a gated repository and this machine has no access to it. Accept the licence at "
            f"https://huggingface.co/{repo_id}, then set HF_TOKEN to a token of that account (or run "
            f"`{hub_command('login')}`). Alternatively point FLUX_MODEL and FLUX_AE at local copies of "
            f"{filename} and ae.safetensors{_WITHOUT_HUB_FLAG}."
        ) from e
    except RepositoryNotFoundError as e:
        hint = " It may be gated: accept its licence and set HF_TOKEN." if gated else ""
        raise UserError(f"The hub repository {repo_id} was not found or is not visible.{hint}") from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: newer hubs subclass it
        why = _offline() or "the hub could not be reached"
        raise _not_cached(repo_id, filename, what, why) from e
    except EntryNotFoundError as e:
        raise UserError(f"The hub repository {repo_id} has no file {filename!r} ({what}).") from e
    except HfHubHTTPError as e:
        raise UserError(f"The hub refused a request for {filename} ({what}) from {repo_id}: {e}") from e
    except _transport_errors() as e:
        raise UserError(
            f"Could not reach the hub for {filename} ({what}) from {repo_id}: {e}. Check the network, or "
            f"set FLUX_MODEL / FLUX_AE to local files{_WITHOUT_HUB_FLAG}, or pass a local weights directory."
        ) from e
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(
            f"The disk filled up while downloading {filename} ({what}) from {repo_id} into the Hugging Face "
            f"cache {HF_HUB_CACHE!r} ({e.strerror}). Make room there (the flow transformers are about 24 GB "
            "each), or point HF_HUB_CACHE (or HF_HOME) at a disk with space."
        ) from e


def _not_cached(repo_id: str, filename: str, what: str, why: str) -> UserError:
    return UserError(
        f"{filename} ({what}) from {repo_id} is not in the Hugging Face cache and {why}. Download it once "
        f"with network access (`{hub_command(f'download {repo_id} {filename}')}`), or set FLUX_MODEL / "
        f"FLUX_AE to local files{_WITHOUT_HUB_FLAG}, or pass a local weights directory."
    )


def _offline() -> str | None:
    """Why the hub is not to be asked ("HF_HUB_OFFLINE is set"), or None: huggingface_hub's own rule, where
    TRANSFORMERS_OFFLINE counts when HF_HUB_OFFLINE is unset or empty."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if value := os.environ.get(name):
            return f"{name} is set" if value.upper() in ("1", "ON", "YES", "TRUE") else None
    return None


def hub_download(repo_id: str, filename: str, *, gated: bool = False, what: str = "weights") -> Path:
    """hf_hub_download with each failure turned into one paragraph that says what to do."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id, filename, gated=gated, what=what):
        return Path(hf_hub_download(repo_id, filename))


def _from_env(env_var: str, weights_dir: str | Path | None) -> str | None:
    """The path an environment variable names, unless a weights_dir given by the caller overrides it."""
    if weights_dir is not None:
        return None
    return os.environ.get(env_var) or None


def _resolve(spec: ModelSpec, filename: str, env_var: str, weights_dir: str | Path | None, what: str) -> Path:
    explicit = _from_env(env_var, weights_dir)
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
                f"Download it from {spec.repo_id} into that directory"
                + (f", or set {env_var} to the file." if weights_dir is None else ".")
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
    """Where T5 and CLIP come from: a given weights_dir that holds their subfolders, else FLUX_TEXT_ENCODERS
    (unless weights_dir is "hub"), else the default local directory if it holds them, else their hub repo.

    A weights folder with only the flow and AE files (T5 and CLIP come from the schnell repo for every
    model) leaves the text encoders to FLUX_TEXT_ENCODERS rather than to a 10 GB download."""
    local = _local_dir(spec, weights_dir)
    has_encoders = local is not None and (local / "text_encoder_2").is_dir()
    if weights_dir is not None and has_encoders:
        return local
    explicit = os.environ.get("FLUX_TEXT_ENCODERS") if weights_dir != HUB else None
    if explicit:
        if not Path(explicit).expanduser().is_dir():
            raise UserError(
                f"FLUX_TEXT_ENCODERS points at {explicit!r}, which is not a directory. Point it at a folder "
                "holding text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/, or unset it (T5 and "
                f"CLIP then come from {spec.text_repo_id} on the hub)."
            )
        return Path(explicit).expanduser()
    return local if has_encoders else spec.text_repo_id


_FLOAT8 = ("F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")
_MAGIC = {  # the first bytes of files that are often mistaken for a safetensors checkpoint
    b"PK\x03\x04": "a PyTorch .pt/.ckpt file (a zip archive)",
    b"GGUF": "a GGUF file (a quantised checkpoint for llama.cpp-style runtimes)",
    **{b"\x80" + bytes([protocol]): "a pickle file" for protocol in range(2, 6)},
    b"<!": "an HTML page (a failed download?)",
    b"<html": "an HTML page (a failed download?)",
    b"<HTML": "an HTML page (a failed download?)",
}


def read_header(path: Path) -> dict[str, dict]:
    """{key: {"dtype", "shape", "data_offsets"}} of a local safetensors file, from its header alone: keys,
    shapes and dtypes are checked before gigabytes are read onto a GPU. A UserError says what the file
    is when it is not a safetensors file, and when it is shorter than its header says (a cut download)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            body = f.read(length) if 2 <= length <= min(_MAX_HEADER_BYTES, size - 8) else b""
    except OSError as e:
        raise UserError(f"Could not read {str(path)!r}: {e.strerror or e}.") from e
    kind = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None and 2 <= length <= _MAX_HEADER_BYTES and length > size - 8:
        raise UserError(
            f"{str(path)!r} is truncated: it ends inside its own header ({size:,} bytes). The download was "
            "cut short: delete it and download it again (a file in the Hugging Face cache: download it "
            "again with --force-download)."
        )
    try:
        header = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UserError(
            f"{str(path)!r} is {kind or 'not a safetensors file, or one whose header is corrupt'}. This tool "
            "loads the published .safetensors checkpoints in Black Forest Labs' layout (e.g. "
            "flux1-schnell.safetensors and ae.safetensors)"
            + (": download the file again." if kind is None or kind.startswith("an HTML") else ".")
        )
    header.pop("__metadata__", None)
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{str(path)!r} has a malformed safetensors header ({e!r}).") from e
    if 8 + length + end > size:
        raise UserError(
            f"{str(path)!r} is truncated: its header describes {8 + length + end:,} bytes, the file has "
            f"{size:,}. The download was cut short: delete it and download it again (a file in the Hugging "
            "Face cache: download it again with --force-download)."
        )
    return header


def _strip_prefix(keys) -> dict[str, str]:
    """{name: key in the file}, without a ComfyUI prefix that every key carries."""
    keys = list(keys)
    if keys and all(k.startswith(_DIFFUSION_PREFIX) for k in keys):
        return {k.removeprefix(_DIFFUSION_PREFIX): k for k in keys}
    return {k: k for k in keys}


def read_state_dict(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read one at a time straight to `device` and converted there to
    `dtype` (None: as stored), so a conversion never holds two copies of the whole file."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            sd = {}
            for name, key in _strip_prefix(f.keys()).items():
                tensor = f.get_tensor(key)
                sd[name] = tensor if dtype is None else tensor.to(dtype)
            return sd
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"Could not read {str(path)!r} as safetensors ({e}). The file is corrupt or truncated: "
            "delete it and download it again."
        ) from e


def _matching(keys, prefix: str) -> dict[str, str]:
    """{name without any ComfyUI prefix: key in the file} for the keys under `prefix`."""
    return {
        key.removeprefix(_DIFFUSION_PREFIX): key
        for key in keys
        if key.removeprefix(_DIFFUSION_PREFIX).startswith(prefix)
    }


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors file whose names start with `prefix`, read on their own."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"No flow checkpoint at {str(path)!r}: pass the path of the model's .safetensors file."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(key) for name, key in _matching(f.keys(), prefix).items()}
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"Could not read {str(path)!r} as safetensors ({e}). The file is corrupt or truncated: "
            "delete it and download it again."
        ) from e


def _ranged_get(url: str, headers: dict, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of `url`, refusing before the body is read when the server sends anything else
    (a server that ignores Range would otherwise stream the whole 24 GB file into memory)."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status

    session = get_session()
    headers = {**headers, "range": f"bytes={start}-{stop - 1}"}
    if callable(getattr(session, "stream", None)):  # httpx-style clients (huggingface_hub >= 1.0)
        context = session.stream("GET", url, headers=headers, timeout=60)
    else:  # a requests.Session
        context = contextlib.closing(session.get(url, headers=headers, timeout=60, stream=True))
    with context as response:
        if response.status_code >= 400:
            _body(response)  # error bodies are small, and the hub's error mapping reads them
            hf_raise_for_status(response)
        length = response.headers.get("content-length")
        if response.status_code != 206 or (length is not None and int(length) != stop - start):
            raise _RangeRefused(f"HTTP {response.status_code}, {length} bytes for {stop - start}")
        data = _body(response)
    if len(data) != stop - start:
        raise _RangeRefused(f"{len(data)} bytes for {stop - start}")
    return data


def _body(response) -> bytes:
    """The whole body of a streamed response: httpx-style responses read(), requests ones have .content."""
    return response.read() if hasattr(response, "read") else response.content


class _RangeRefused(Exception):
    """The server answered a range request with something else (HTTP 200 and the whole file, say)."""


def fetch_hub_tensors(
    repo_id: str, filename: str, prefix: str, *, gated: bool = False, what: str = "weights"
) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` of a safetensors file on the hub, fetched with HTTP range requests.

    Reads the 8-byte header length, the JSON header, then each wanted tensor's bytes: for the lens that is
    the final layer (about 38 MB of a 24 GB checkpoint). Honours HF_TOKEN and HF_ENDPOINT like every other
    hub call; nothing is written to the cache.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if offline := _offline():
        raise _not_cached(repo_id, filename, what, offline)
    url = hf_hub_url(repo_id, filename)
    headers = build_hf_headers()
    where = f"{repo_id}/{filename}"

    def fetch(start: int, stop: int) -> bytes:
        try:
            return _ranged_get(url, headers, start, stop)
        except _RangeRefused as e:
            raise UserError(
                f"The server for {where} did not answer a range request as asked ({e}). Download the file "
                f"instead (`{hub_command(f'download {repo_id} {filename}')}`) and set FLUX_MODEL to it."
            ) from None

    with _hub_errors(repo_id, filename, gated=gated, what=what):
        header_len = int.from_bytes(fetch(0, 8), "little")
        if not 2 <= header_len <= _MAX_HEADER_BYTES:
            raise UserError(f"{where} is not a safetensors file (header of {header_len} bytes).")
        try:
            header = json.loads(fetch(8, 8 + header_len))
            wanted = {}
            for name, key in _matching((k for k in header if k != "__metadata__"), prefix).items():
                info = header[key]
                begin, end = (int(x) for x in info["data_offsets"])
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{key} has dtype {info['dtype']}, which no FLUX checkpoint uses")
                shape = [int(x) for x in info["shape"]]
                if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{key}: data_offsets {info['data_offsets']} do not fit shape {shape}")
                wanted[name] = (begin, end, dtype, shape)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where} has a malformed safetensors header ({e!r}).") from e
        total = sum(end - begin for begin, end, _, _ in wanted.values())
        print(
            f"Reading {prefix}* ({total / 1e6:.1f} MB) from {where} by range requests, without "
            "downloading the whole file.",
            file=sys.stderr,
        )
        tensors = {}
        for name, (begin, end, dtype, shape) in wanted.items():
            offset = 8 + header_len + begin
            data = fetch(offset, 8 + header_len + end) if end > begin else b""
            tensors[name] = _placed_as_in_file(data, offset, dtype, shape)
        return tensors


def _placed_as_in_file(data: bytes, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor from its bytes, at the address alignment (mod 64) it has in a memory-mapped local copy of
    the file, where it starts at `offset`. CPU float32 GEMMs round differently by alignment, so this makes
    the lens from fetched tensors give the same bytes as from a local checkpoint."""
    pad = offset % 64 if offset % 64 % dtype.itemsize == 0 else 0
    buffer = torch.empty(pad + len(data), dtype=torch.uint8)  # the CPU allocator aligns to 64 bytes
    if data:
        buffer[pad:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer[pad:].view(dtype).reshape(shape)


def read_flow_tensors(
    spec: ModelSpec, prefix: str, weights_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The flow checkpoint's tensors under `prefix` (e.g. "final_layer."), and where they were read from.

    Never reads or downloads the rest of the file: a local file (FLUX_MODEL or a weights directory) or a
    copy already in the Hugging Face cache is opened lazily; otherwise only those tensors' bytes are fetched
    from the hub.
    """
    if _from_env("FLUX_MODEL", weights_dir) or _local_dir(spec, weights_dir) is not None:
        path = resolve_flow_path(spec, weights_dir)
        return read_tensors(path, prefix), str(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.repo_id, spec.repo_flow)
    if isinstance(cached, str):
        return read_tensors(Path(cached), prefix), cached
    tensors = fetch_hub_tensors(
        spec.repo_id, spec.repo_flow, prefix, gated=spec.gated, what="flow transformer"
    )
    return tensors, f"{spec.repo_id}/{spec.repo_flow}"


def _kind_of(names) -> str | None:
    """What a checkpoint with these tensor names looks like, when it is a file often given by mistake."""
    names = list(names)
    if any(n.startswith(("transformer_blocks.", "x_embedder.", "single_transformer_blocks.")) for n in names):
        return (
            "a diffusers-format transformer (renamed keys); this tool reads Black Forest Labs' single file "
            "(flux1-*.safetensors, at the top of the model's hub repo)"
        )
    if any(n.startswith(("vae.", "first_stage_model.", "text_encoders.", "conditioner.")) for n in names):
        return "an all-in-one checkpoint (flow, VAE and text encoders in one file); pass the flow model alone"
    if names and all(n.startswith(("encoder.", "decoder.")) for n in names):
        return "the autoencoder (ae.safetensors)"
    if any(n.startswith("double_blocks.") for n in names):
        return "a flow transformer (flux1-*.safetensors)"
    return None


def check_state_dict(model: nn.Module, shapes: dict[str, tuple], path: Path, what: str) -> None:
    """Raise a UserError naming missing, unexpected and mis-shaped keys, if any. `shapes` maps each name in
    the file to its shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: tuple(v) for k, v in shapes.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])
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
        mismatches = [f"{k} {shapes[k]} != {expected[k]}" for k in wrong]
        problems.append(f"{len(wrong)} with the wrong shape ({few(mismatches)})")
    kind = _kind_of(shapes) if len(missing) > len(expected) // 2 else None
    raise UserError(
        f"{str(path)!r} does not match the {what}: {'; '.join(problems)} keys. "
        + (f"It looks like {kind}." if kind else "Check that the file is the right one for this --model")
        + ("" if kind else " (schnell has no guidance_in; dev and Krea do).")
    )


def check_checkpoint(model_factory, path: Path, what: str) -> None:
    """Check a checkpoint's header against the module `model_factory` builds (on meta): every key and shape,
    and float dtypes (bf16, fp16, fp32, fp64; not float8 or integers), in milliseconds, reading no tensor."""
    with torch.device("meta"):
        model = model_factory()
    header = read_header(path)
    names = _strip_prefix(header)
    check_state_dict(model, {name: header[key]["shape"] for name, key in names.items()}, path, what)
    dtypes = {header[key]["dtype"] for key in names.values()}
    if odd := sorted(dtypes - set(_SAFETENSORS_DTYPES)):
        why = (
            "a quantised copy, whose activations differ from the published model's"
            if set(odd) <= set(_FLOAT8)
            else "not weights this tool can run"
        )
        raise UserError(
            f"{str(path)!r} holds {', '.join(odd)} tensors: {why}. Use the published checkpoint of the "
            f"{what} (bf16)."
        )


def load_checkpoint(model_factory, path: Path, device, dtype: torch.dtype | None, what: str) -> nn.Module:
    """Build a module on meta, check the file's header against it, then load it strictly, tensors landing
    on `device` in `dtype` (None: as stored)."""
    check_checkpoint(model_factory, path, what)
    with torch.device("meta"):
        model = model_factory()
    model.load_state_dict(read_state_dict(path, device, dtype), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_flow_model(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weights_dir: str | Path | None = None,
    path: Path | None = None,
) -> Flux:
    """The flow transformer of `spec` with its published weights, on `device` in `dtype` (from `path`, a file
    `resolve_flow_path` gave, when given)."""
    path = path or resolve_flow_path(spec, weights_dir)
    return load_checkpoint(lambda: Flux(spec.params), path, device, dtype, flow_what(spec))


def flow_what(spec: ModelSpec) -> str:
    return f"{spec.name} flow transformer"


def load_ae(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights_dir: str | Path | None = None,
    path: Path | None = None,
) -> AutoEncoder:
    """The autoencoder of `spec`; by default in the checkpoint's own dtype (float32 for FLUX.1). From `path`,
    a file `resolve_ae_path` gave, when given."""
    path = path or resolve_ae_path(spec, weights_dir)
    return load_checkpoint(lambda: AutoEncoder(spec.ae_params), path, device, dtype, AE_WHAT)


AE_WHAT = "FLUX autoencoder"


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Within the block, the hub's download bars and transformers' loading bars show only when `enabled`.

    Both libraries keep a process-wide switch; it is put back as it was on the way out.
    """
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_on = not are_progress_bars_disabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers_logging.enable_progress_bar()  # which also turns the hub's bars on
        (enable_progress_bars if hub_was_on else disable_progress_bars)()


def load_text_encoders(
    spec: ModelSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    weights_dir: str | Path | None = None,
    source: str | Path | None = None,
):
    """(T5, CLIP) embedders for `spec`, from `source` (default: the one `text_encoder_source` picks)."""
    from flux.conditioner import load_text_embedder

    source = source if source is not None else text_encoder_source(spec, weights_dir)
    t5 = load_text_embedder(
        "t5", source, "text_encoder_2", "tokenizer_2", spec.t5_max_length, device=device, dtype=dtype
    )
    clip = load_text_embedder(
        "clip", source, "text_encoder", "tokenizer", spec.clip_max_length, device=device, dtype=dtype
    )
    for embedder, width, wanted in (
        (t5, t5.model.config.d_model, spec.params.context_in_dim),
        (clip, clip.model.config.hidden_size, spec.params.vec_in_dim),
    ):
        if width != wanted:
            raise UserError(
                f"The {embedder.kind.upper()} text encoder in {source} gives vectors of {width}, but "
                f"{spec.name} reads {wanted}: these are another model's encoders. Point FLUX_TEXT_ENCODERS "
                f"at the folders of {spec.text_repo_id}, or unset it."
            )
    return t5, clip
