"""The options of one run, checked before anything is loaded or written: flags, sizes, memory, disk."""

import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux.capture import CapturePlan
from flux.configs import CONFIGS, ModelSpec, get_spec
from flux.errors import UsageError, UserError
from flux.sampling import image_tokens
from flux.store import human_bytes

FORMATS = ("pt", "safetensors")
DECODE_TARGETS = ("x0", "next")
MAX_SIDE = 4096  # 65k image tokens; beyond this FLUX.1 was never trained and memory explodes


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(spec: ModelSpec) -> torch.dtype:
    """bf16 for the published models (their checkpoints are bf16); float32 for flux-tiny: exact tests."""
    return torch.float32 if spec.name == "flux-tiny" else torch.bfloat16


# ----------------------------------------------------------------------------------------- options
CAPTURE_FLAGS = ("format", "blocks", "steps", "streams", "capture_dtype", "force")  # used only by a capture
LENS_FLAGS = ("decode_target", "decode_batch_size", "compile_decoder")  # used only by the lens


@dataclass
class RunOptions:
    """Every knob of one run; `validate()` checks them all before anything is loaded or written."""

    model: str = "flux-schnell"
    prompt: str = "a beautiful landscape"
    width: int = 256
    height: int = 256
    seed: int | None = None
    num_steps: int | None = None
    guidance: float | None = None
    offload: bool = False
    device: str | None = None
    output_dir: str = "output"
    capture: bool = True
    format: str = "pt"
    blocks: str | None = None
    steps: str | None = None
    streams: str = "both"
    capture_dtype: str | None = None
    force: bool = False
    should_decode_intermediates: bool = True
    decode_target: str = "x0"
    decode_batch_size: int | None = None
    compile_decoder: bool | None = None
    analyze: bool = False
    weights_dir: str | None = None
    warnings: list[str] = field(default_factory=list)

    def validate(self) -> "RunOptions":
        """Normalise and check values; raise UsageError naming the flag. Touches no files."""
        if self.model not in CONFIGS:
            hint, given = "", str(self.model)  # Fire reads the first value without a flag as --model
            if isinstance(self.model, str) and Path(given).expanduser().exists():
                hint = f" To work on a saved capture, name a subcommand: `capture_sample.py decode {given}`."
            elif isinstance(self.model, str) and " " in given.strip():  # a prompt without its flag
                hint = (
                    " A value given without a flag is read as --model (the first parameter): "
                    f"give a prompt as --prompt {shlex.quote(given)}."
                )
            raise UsageError(
                f"--model {self.model!r} is not known. Choose one of: {', '.join(CONFIGS)}.{hint}"
            )
        spec = get_spec(self.model)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UsageError(
                f"--prompt must be non-empty text; got {self.prompt!r}, e.g. --prompt 'a red cube'."
            )
        for flag in ("width", "height"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"--{flag} must be a whole number of pixels; got {value!r}.")
            if value <= 0 or value % 16 or value > MAX_SIDE:
                raise UsageError(
                    f"--{flag} must be a positive multiple of 16 up to {MAX_SIDE}; got {value}. "
                    f"Try {max(16, min(MAX_SIDE, 16 * round(value / 16)))}."
                )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise UsageError(
                f"--seed must be a whole number (or left out for a random one); got {self.seed!r}."
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UsageError(f"--seed must be between 0 and 2**64 - 1; got {self.seed}.")
        if self.num_steps is None:
            self.num_steps = spec.default_steps
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise UsageError(f"--num_steps must be a whole number >= 1; got {self.num_steps!r}.")
        if self.num_steps > 1000:
            raise UsageError(f"--num_steps must be at most 1000; got {self.num_steps}.")
        if self.guidance is not None and not spec.uses_guidance:
            self.warnings.append(
                f"warning: {self.model} has no guidance input; --guidance {self.guidance} is ignored."
            )
        if self.guidance is None:
            self.guidance = spec.default_guidance
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise UsageError(f"--guidance must be a number; got {self.guidance!r}.")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise UsageError(f"--guidance must be a finite number >= 0; got {self.guidance}.")
        self.guidance = float(self.guidance)
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {self.format!r}.")
        self.device = str(check_device(self.device))
        check_gpu_fits(spec, torch.device(self.device), self.offload)
        if self.weights_dir is not None:
            from flux.loading import check_weights_dir

            self.weights_dir = str(self.weights_dir)  # Fire reads a folder named 2024 as a number
            check_weights_dir(spec, self.weights_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise UsageError(f"--output_dir must be a folder path; got {self.output_dir!r}.")
        check_output_dir(Path(self.output_dir))
        check_decode_flags(self.decode_target, self.decode_batch_size)
        for flag in ("offload", "capture", "force", "should_decode_intermediates", "analyze"):
            if not isinstance(getattr(self, flag), bool):
                raise UsageError(
                    f"--{flag} is a switch: pass --{flag} or --no{flag}; got {getattr(self, flag)!r}."
                )
        if self.compile_decoder is not None and not isinstance(self.compile_decoder, bool):
            raise UsageError(f"--compile_decoder is a switch; got {self.compile_decoder!r}.")
        self._refuse_unused_flags()
        if self.plan().dtype == torch.float16 and compute_dtype(spec) == torch.bfloat16:
            self.warnings.append(
                "warning: --capture_dtype fp16 holds magnitudes up to 65504; with the published weights some "
                "text-token and single-block outputs exceed that (diffusers clips them for fp16), and they "
                "would be stored as inf. bf16, the default here, takes the same space and holds them."
            )
        if self.capture:
            self._check_capture_fits()
        elif self.analyze:
            raise UsageError("--analyze works on a capture: leave out --capture False.")
        if self.capture and self.streams == "txt" and self.should_decode_intermediates:
            raise UsageError(
                "--streams txt keeps no image tokens, so the lens has nothing to decode: add "
                "--should_decode_intermediates False, or capture --streams img or --streams both."
            )
        if self.analyze:
            from flux.analysis import check_extra

            check_extra()  # before a long run, not after it
        return self

    def _refuse_unused_flags(self) -> None:
        """A capture or lens flag given to a run that neither captures nor runs the lens is refused: the
        metadata would record it as if it had applied, and the user may believe it did."""
        defaults = RunOptions()
        given = [
            flag
            for flag in CAPTURE_FLAGS + LENS_FLAGS
            if getattr(self, flag) != getattr(defaults, flag)
            and not (flag == "capture_dtype" and self.capture_dtype == "auto")
        ]
        if not self.capture and given:
            raise UsageError(f"--{given[0]} applies only to a capture; leave it out with --capture False.")
        unused = [flag for flag in given if flag in LENS_FLAGS]
        if not self.should_decode_intermediates and unused:
            raise UsageError(
                f"--{unused[0]} applies only to the lens; leave it out with --should_decode_intermediates "
                "False, or pass it to `capture_sample.py decode CAPTURE` later."
            )

    def _check_capture_fits(self) -> None:
        """Refuse, before anything loads, a capture that the disk (or, for .pt, host memory) cannot hold."""
        needed = self.estimated_capture_bytes()
        smaller_dtype = (self.plan().dtype or compute_dtype(self.spec)).itemsize > 2
        check_disk_space(_existing_parent(Path(self.output_dir)), needed, self.force, smaller_dtype)
        if self.format == "pt":
            # A .pt capture lives in host buffers until the end, pinned on CUDA, where they are allocated
            # in power-of-two sizes, up to twice what they hold. One expected to wait on the GPU comes to
            # host memory unpinned, to be written, but whether it fits there is settled only after loading
            # (CaptureSession.buffers), so it is counted as pinned too.
            on_gpu = torch.device(self.device).type == "cuda"
            held = self.estimated_capture_bytes(pinned=on_gpu)
            available = free = available_host_memory()
            if available is not None and (not on_gpu or self.offload):
                available -= model_host_bytes(self.spec)  # the models will live in host memory too
                if available <= 0:
                    # Their weights are mapped from the checkpoint files, which the system can page in and
                    # out (slowly); what the capture adds cannot be judged against nothing.
                    self.warnings.append(
                        f"warning: the models take {model_host_bytes(self.spec) / 1e9:.1f} GB in host memory "
                        f"and {free / 1e9:.1f} GB is available, so the system will page their weights in and "
                        f"out of their files (slow), and the .pt capture's {held / 1e9:.1f} GB may not fit "
                        "beside them: --format safetensors holds only a few steps in memory."
                    )
            if available is not None and 0 < available < held / 0.8 and not self.force:
                rounded = " (its pinned buffers rounded up to powers of two)" if held > needed else ""
                raise UserError(
                    f"A .pt capture is held in memory until the run ends, and written from host memory: "
                    f"this one needs up to "
                    f"{held / 1e9:.1f} GB{rounded}, over 80% of the {max(available, 0) / 1e9:.1f} GB "
                    "available beside the models. Use --format "
                    "safetensors (streamed to disk, a few steps in memory), capture less (--blocks, --steps, "
                    "--streams img), or pass --force to try anyway."
                )

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.model)

    def plan(self) -> CapturePlan:
        p = self.spec.params
        return CapturePlan.parse(
            self.blocks,
            self.steps,
            self.streams,
            self.capture_dtype,
            p.depth,
            p.depth_single_blocks,
            self.num_steps,
        )

    def token_counts(self) -> tuple[int, int]:
        """(T text tokens, L image tokens) of this run."""
        return self.spec.t5_max_length, image_tokens(self.height, self.width)

    def capture_on_device(self) -> bool:
        """Whether this run's capture is expected to wait on the GPU until the run ends: a `.pt` capture
        without --offload, on a GPU whose free memory, less the models' weights, holds it (see
        `capture_fits_on_device`). Worked out before loading; after loading, the capture's buffers are
        placed by the memory then free (`CaptureSession.buffers`)."""
        device = torch.device(self.device)
        if not (self.capture and self.format == "pt" and device.type == "cuda" and not self.offload):
            return False
        free = torch.cuda.mem_get_info(device)[0] - sum(model_bytes(self.spec).values())
        return capture_fits_on_device(self.estimated_capture_bytes(), free)

    def estimated_capture_bytes(self, pinned: bool = False) -> int:
        """Bytes the planned block outputs take on disk, or (`pinned`) in pinned host buffers; the context
        tensors are small and left out."""
        txt_len, img_len = self.token_counts()
        plan = self.plan()
        itemsize = (plan.dtype or compute_dtype(self.spec)).itemsize
        per_step = plan.bytes_per_step(1, txt_len, img_len, self.spec.params.hidden_size, itemsize, pinned)
        return per_step * len(plan.steps)


def check_decode_flags(target: str, batch_size: int | None) -> None:
    """--decode_target and --decode_batch_size, for a capture run and for `decode` alike."""
    if target not in DECODE_TARGETS:
        raise UsageError(f"--decode_target must be one of {', '.join(DECODE_TARGETS)}; got {target!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise UsageError(f"--decode_batch_size must be a whole number >= 1; got {batch_size!r}.")


def check_device(name: str | None) -> torch.device:
    """The torch device named by --device (default: cuda when available, else cpu); UsageError if bad."""
    if isinstance(name, str) and name.isdigit():
        name = int(name)  # --device 0 means cuda:0, as torch.device(0) does
    try:
        device = torch.device(name if name is not None else default_device())
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N).") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is visible. Use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
        )
    if device.type == "meta":
        raise UsageError("--device meta holds no data, so nothing can run on it. Use cpu or cuda.")
    if device.type not in ("cpu", "cuda"):
        try:
            torch.empty(1, device=device)  # mps, xpu, ...: present in this build and this machine?
        except (RuntimeError, AssertionError) as e:
            raise UsageError(
                f"--device {device.type}: this PyTorch or machine cannot use it "
                f"({' '.join(str(e).split()).split('. ')[0].removesuffix('.')}). Use cpu or cuda."
            ) from e
    return device


def check_output_dir(out: Path) -> None:
    """Refuse an output folder that cannot be made or written (exit 2), before any model loads."""
    probe = _existing_parent(out)
    if not probe.is_dir():
        raise UsageError(f"--output_dir {str(out)!r} cannot be created: {str(probe)!r} is a file.")
    if not os_access_writable(probe):
        raise UsageError(f"--output_dir {str(out)!r} is not writable (no write permission on {probe}).")


def os_access_writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# GPU memory a capture waiting on the GPU must leave free: the lens plans its batches for 16 GiB within 70% of
# the free memory (decode.STABLE_BATCH_BYTES: 22.9 GiB free), so that its batches, and its files, are those
# of a later decode; the rest is room for sampling's activations (about 3 GB for flux-dev at 4096 px).
DEVICE_CAPTURE_RESERVE = 26 * 2**30


def capture_fits_on_device(nbytes: int, free: int) -> bool:
    """Whether a `.pt` capture of `nbytes` may wait on the GPU, `free` bytes being free there beside the
    models: when it leaves DEVICE_CAPTURE_RESERVE and takes at most half of what is free (flux-schnell's 6 GB
    at 1024 px on an 80 GB GPU, not flux-dev's 80 GB at 1024 px on a 141 GB one). There it costs no
    pinning, the hooks' copies stay on the GPU, and the lens reads it where it is."""
    return nbytes <= min(free // 2, free - DEVICE_CAPTURE_RESERVE)


def available_host_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# T5-XXL encoder and CLIP-L text model in bf16, as shipped in FLUX.1-schnell's text_encoder(_2) folders.
TEXT_ENCODER_BYTES = 9_800_000_000


def model_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of the weights of `spec`'s models as loaded: "flow", "ae" and "text" (T5 + CLIP)."""
    from flux.autoencoder import AutoEncoder
    from flux.model import Flux

    with torch.device("meta"):
        flow, ae = Flux(spec.params), AutoEncoder(spec.ae_params)
    return {
        "flow": sum(p.numel() for p in flow.parameters()) * compute_dtype(spec).itemsize,
        "ae": sum(p.numel() for p in ae.parameters()) * 4,  # the AE checkpoint is float32
        "text": 0 if spec.name == "flux-tiny" else TEXT_ENCODER_BYTES,
    }


def model_host_bytes(spec: ModelSpec) -> int:
    """Host memory the models of `spec` take when they live on the CPU (--device cpu, or --offload)."""
    return sum(model_bytes(spec).values())


def check_replay_fits(spec: ModelSpec, device: torch.device) -> None:
    """Refuse, before loading, a replay or sweep whose flow model and autoencoder, which it holds on the GPU
    together while replaying (--offload frees the GPU of the flow model only for the decoding), exceed the
    GPU's whole memory."""
    if device.type != "cuda":
        return
    total, sizes = torch.cuda.mem_get_info(device)[1], model_bytes(spec)
    if (need := sizes["flow"] + sizes["ae"]) > total:
        raise UserError(
            f"Replaying {spec.name} holds its flow model and autoencoder on the GPU together, "
            f"{need / 1e9:.1f} GB, more than this GPU's {total / 1e9:.1f} GB "
            f"({torch.cuda.get_device_name(device)}). Use a GPU with more memory, or --device cpu (slow)."
        )


def check_gpu_fits(spec: ModelSpec, device: torch.device, offload: bool) -> None:
    """Refuse, before a minute of loading, models that cannot fit the GPU's memory, counting its whole
    memory (what other processes hold may be given back): all the models at once, as they load, or with
    --offload, which moves each to the GPU only while it runs, the largest, the flow model, alone."""
    if device.type != "cuda":
        return
    total = torch.cuda.mem_get_info(device)[1]
    sizes = model_bytes(spec)
    gpu = f"this GPU's {total / 1e9:.1f} GB ({torch.cuda.get_device_name(device)})"
    if sizes["flow"] > total:
        raise UserError(
            f"{spec.name}'s flow model alone takes {sizes['flow'] / 1e9:.1f} GB, more than {gpu}: it "
            "cannot run on this GPU, even with --offload. Use a GPU with more memory, or --device cpu (slow)."
        )
    together = sum(sizes.values())
    if not offload and together > total:
        raise UserError(
            f"{spec.name}'s models take {together / 1e9:.1f} GB together (the flow model "
            f"{sizes['flow'] / 1e9:.1f} GB, T5 and CLIP {sizes['text'] / 1e9:.1f} GB), more than {gpu}. "
            "Pass --offload: each model then visits the GPU only while it runs."
        )


def check_disk_space(folder: Path, needed: int, force: bool, smaller_dtype: bool = False) -> None:
    """Refuse a capture of `needed` bytes that `folder`'s disk cannot hold (unless `force`);
    `smaller_dtype`: the capture is in 4-byte floats, so --capture_dtype bf16 would halve it."""
    free = shutil.disk_usage(folder).free
    if needed > free and not force:
        raise UserError(
            f"The capture needs about {human_bytes(needed)} but {str(folder)!r} has {human_bytes(free)} "
            "free. "
            "Capture fewer blocks or steps (--blocks, --steps, --streams img), a smaller size, "
            f"{'--capture_dtype bf16 (half the bytes), ' if smaller_dtype else ''}"
            "another --output_dir, or pass --force to try anyway."
        )
