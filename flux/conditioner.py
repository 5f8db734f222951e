"""Text conditioning: T5 token embeddings (txt) and the CLIP pooled vector (y), exactly as FLUX.1 gets them.

Both encoders see only `input_ids`, padded to a fixed length with no attention mask: the checkpoints were
trained that way, so padding tokens take part in attention and the padded length changes the output.
"""

import contextlib
import importlib
import re
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from flux.configs import TEXT_ENCODER_REPO
from flux.errors import UserError

KINDS = ("t5", "clip")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "org/name"; anything else is meant as a path


class TextEmbedder(nn.Module):
    """Tokenizer + text model: prompts -> T5 `last_hidden_state` (B, T, d) or CLIP `pooler_output` (B, d).

    CLIP's pooled output is the final-LayerNorm hidden state at the first end-of-text token, not the projected
    `text_embeds`. Outputs are cast to `output_dtype` (bf16 for the real encoders, as in the reference).
    """

    def __init__(self, kind: str, tokenizer, model: nn.Module, max_length: int, output_dtype: torch.dtype):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.output_dtype = output_dtype
        self.output_key = "last_hidden_state" if kind == "t5" else "pooler_output"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, prompts: list[str]):
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        return self.tokenizer(
            list(prompts),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_attention_mask=True,
            return_length=False,
            return_overflowing_tokens=False,
            return_tensors="pt",
        )

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, max_length): truncated, then padded to max_length, as FLUX tokenizes."""
        return self._encode(prompts)["input_ids"]

    def token_strings(self, prompt: str) -> list[str]:
        """The tokens `prompt` becomes, up to and including the end-of-text token: the positions of the text
        stream that are not padding (padding fills the rest, up to max_length). Told apart from padding by
        the tokenizer's own mask, not by the pad id: CLIP pads with its end-of-text token, and a prompt may
        spell out the pad token itself."""
        batch = self._encode([prompt])
        real = int(batch["attention_mask"][0].sum())
        return self.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, :real].tolist())

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """T5: (B, max_length, d_model); CLIP: (B, hidden). On the model's device, in `output_dtype`."""
        input_ids = self.tokenize(prompts).to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=None, output_hidden_states=False)
        return out[self.output_key].to(self.output_dtype)


def load_text_embedder(
    kind: str,
    source: str | Path,
    subfolder_model: str,
    subfolder_tokenizer: str,
    max_length: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> TextEmbedder:
    """Load a T5 ("t5") or CLIP ("clip") embedder from a local directory or a hub repo id.

    `source` is a directory holding `subfolder_model/` and `subfolder_tokenizer/`, or a hub repo id, in which
    case only those two subfolders are fetched into the usual Hugging Face cache (HF_TOKEN and HF_HUB_OFFLINE
    apply). Files that cannot be found or fetched raise a UserError that says what to do.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    model_cls = T5EncoderModel if kind == "t5" else CLIPTextModel
    # CLIP: the class both reference pipelines name (BFL's and diffusers'); under transformers 4 it is the
    # Python tokenizer, which AutoTokenizer would replace with the Rust one, and the two differ on some
    # text (CJK characters). T5: the repo's tokenizer.json (diffusers' T5TokenizerFast; BFL's slow T5
    # tokenizer needs sentencepiece). Under transformers 5 both classes are the Rust tokenizers.
    tokenizer_cls = AutoTokenizer if kind == "t5" else CLIPTokenizer
    local = _local_dir(source)
    from_hub = local is None
    if local is None:
        # Fetch (or find in the cache) just the two subfolders, then load from disk like any local copy.
        # Loading by repo id instead makes newer transformers look up files that do not exist
        # (tokenizer_2/config.json), which fails offline even when everything needed is cached.
        from huggingface_hub import snapshot_download

        try:
            local = Path(
                snapshot_download(
                    str(source), allow_patterns=[f"{subfolder_model}/*", f"{subfolder_tokenizer}/*"]
                )
            )
        except _fetch_errors() as err:
            raise UserError(_fetch_failure(f"{kind.upper()} files", source, False, err)) from err
    for sub in (subfolder_tokenizer, subfolder_model):
        if not (local / sub).is_dir():
            raise UserError(
                f"The {kind.upper()} text encoder directory {local} has no {sub}/ subfolder. "
                f"{_how_to_get_files()}"
            )
    tokenizer_args = (str(local / subfolder_tokenizer),)
    model_args = (str(local / subfolder_model),)
    tokenizer_kwargs: dict = {}
    model_kwargs: dict = {}

    what = f"{kind.upper()} tokenizer"
    try:
        tokenizer = tokenizer_cls.from_pretrained(*tokenizer_args, **tokenizer_kwargs)
        what = f"{kind.upper()} text encoder"
        model, info = model_cls.from_pretrained(
            *model_args, **model_kwargs, **{_DTYPE_KWARG: dtype}, output_loading_info=True
        )
    except (*_fetch_errors(), SafetensorError) as err:  # SafetensorError: a cut or corrupt weights file
        raise UserError(_fetch_failure(what, source, not from_hub, err)) from err
    if info["missing_keys"]:
        # transformers would leave these randomly initialised and only log a warning.
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"The {kind.upper()} text encoder in {source} (subfolder {subfolder_model}) lacks {len(missing)} "
            f"weights of {model_cls.__name__}, e.g. {', '.join(missing[:3])}: it is not the expected model. "
            f"{_how_to_get_files()}"
        )
    return TextEmbedder(kind, tokenizer, model.to(device), max_length, dtype)


# transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns, then goes in 5.x).
_DTYPE_KWARG = (
    "dtype" if tuple(map(int, version("transformers").split(".")[:2])) >= (4, 56) else "torch_dtype"
)


def _how_to_get_files() -> str:
    from flux.loading import hub_command

    download = hub_command(f"download {TEXT_ENCODER_REPO} --include 'text_encoder*' 'tokenizer*'")
    return (
        "Point FLUX_TEXT_ENCODERS at a local directory holding text_encoder/, tokenizer/, text_encoder_2/ "
        f"and tokenizer_2/ (the layout of {TEXT_ENCODER_REPO}), or download them once with `{download}`."
    )


def _local_dir(source: str | Path) -> Path | None:
    """The directory `source` names, None for a hub repo id, or a UserError for a path that is not there."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if isinstance(source, Path) or not _HUB_ID.match(str(source)) or str(source).startswith("."):
        raise UserError(
            f"Text encoder source {str(source)!r} is neither an existing directory nor a hub repo id "
            f"(org/name). {_how_to_get_files()}"
        )
    return None


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """What a missing file, a refused download or offline mode raises, across huggingface_hub versions."""
    from huggingface_hub import utils as hub_utils

    errors: list[type[BaseException]] = [OSError]  # transformers wraps most hub failures in OSError
    for name in ("EntryNotFoundError", "LocalEntryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled"):
        if hasattr(hub_utils, name):
            errors.append(getattr(hub_utils, name))
    # Connection failures, from whichever HTTP client this huggingface_hub version uses.
    for client in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(client).HTTPError)
    return tuple(errors)


def _fetch_failure(what: str, source: str | Path, local: bool, err: BaseException) -> str:
    """One paragraph: what is missing, where we looked, what to do."""
    from huggingface_hub import utils as hub_utils

    from flux.loading import hub_command

    detail = " ".join(str(err).split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    where = f"the local directory {source}" if local else f"the hub repo {source}"
    message = f"Could not load the {what} from {where} ({type(err).__name__}: {detail})."
    gated = getattr(hub_utils, "GatedRepoError", None)
    if gated is not None and isinstance(err, gated):
        message += (
            " The repo is gated: accept its licence on huggingface.co while logged in, then set HF_TOKEN "
            f"to a token of that account (or run `{hub_command('login')}`)."
        )
    elif not local:
        message += (
            " If you are offline or HF_HUB_OFFLINE is set, the files must already be in the Hugging Face "
            "cache: unset HF_HUB_OFFLINE and connect, or fetch them beforehand. Private repos need HF_TOKEN."
        )
    return f"{message} {_how_to_get_files()}"
