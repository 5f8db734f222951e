"""One generation with FLUX.1, end to end: load, encode the prompt, sample (optionally capturing), decode.

This is the library behind `capture_sample.py`; notebooks can call it too. The options of a run and their
checks are in `flux.options` (`RunOptions` is re-exported here).
"""

import contextlib
import itertools
import math
import platform
import random
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flux.autoencoder import AutoEncoder
from flux.capture import CONTEXT_KEYS, BlockCapture, BufferPool, CapturePlan, format_steps, host_nbytes
from flux.configs import ModelSpec, get_spec
from flux.loading import (
    AE_WHAT,
    check_checkpoint,
    flow_what,
    library_progress_bars,
    load_ae,
    load_flow_model,
    load_text_encoders,
    resolve_ae_path,
    resolve_flow_path,
    text_encoder_source,
)
from flux.model import Flux, FluxParams
from flux.options import (
    RunOptions,
    available_host_memory,
    capture_fits_on_device,
    check_decode_flags,
    check_device,
    check_output_dir,
    compute_dtype,
)
from flux.sampling import denoise, get_noise, get_schedule, prepare
from flux.store import (
    SCHEMA_VERSION,
    PtSink,
    SafetensorsSink,
    beside_capture,
    claim_stem,
    drop_buffers,
    file_sha256,
    fresh_dir,
    metadata_path_for,
    next_free_index,
    publish_new,
    release_stem,
    write_json,
)

STREAMING_HOST_BYTES = 8 * 2**30  # host buffers the safetensors writer may have in flight, at most
STREAMING_MAX_SETS = 8


def streaming_buffer_sets(step_bytes: int, available: int | None) -> int:
    """Step buffer sets for the safetensors writer: enough for the sampler to run ahead of a slow disk for
    a few steps (at most STREAMING_MAX_SETS), within STREAMING_HOST_BYTES and a quarter of the free host
    memory (`available`, None when unknown), and two at least (one filling while one is written) unless
    two would take over half the free memory. `step_bytes` is what one set takes in host memory (pinned
    buffers rounded up, see `host_nbytes`)."""
    budget = STREAMING_HOST_BYTES if available is None else min(STREAMING_HOST_BYTES, available // 4)
    fewest = (
        1 if available is not None and 2 * step_bytes > available // 2 else 2
    )  # huge steps: one at a time
    return max(fewest, min(STREAMING_MAX_SETS, budget // max(1, step_bytes)))


# ------------------------------------------------------------------------------------------ models
@dataclass
class Models:
    spec: ModelSpec
    flow: Flux
    ae: AutoEncoder
    t5: Any
    clip: Any
    device: torch.device
    dtype: torch.dtype
    offload: bool = False
    decoder_stranded: bool = False  # the final decode's fallback left the VAE decoder on the CPU
    weights: dict[str, str] = field(default_factory=dict)  # where each model's weights came from
    # With --offload: the tensors each offloaded module was loaded into, which it returns to (see to_host).
    host: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    OFFLOADED = ("t5", "clip", "flow", "ae.decoder")

    def keep_host_weights(self) -> None:
        """Remember the host tensors of the modules --offload moves to the GPU and back."""
        for name in self.OFFLOADED:
            self.host[name] = _held(attrgetter(name)(self))

    def to_host(self, *names: str) -> None:
        """Move modules back to the CPU. A module whose loaded tensors were kept points its parameters at them
        again: no copy back from the GPU, and no second copy in process memory (`.cpu()` would allocate 24 GB
        of new memory for the flow model, where the loaded weights are mapped from the checkpoint file)."""
        for name in names:
            module, kept = attrgetter(name)(self), self.host.get(name)
            if kept is None:
                module.cpu()
            else:
                _point_back(module, kept)

    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor]:
        """(T5 tokens (1, T, 4096), CLIP pooled (1, 768)) on the device, in the model dtype."""
        self.t5.to(self.device), self.clip.to(self.device)  # back from the CPU if offloaded or parked
        txt, y = self.t5([prompt]), self.clip([prompt])
        if self.offload:
            self.to_host("t5", "clip")
            _empty_cache(self.device)
        return txt.to(self.device, self.dtype), y.to(self.device, self.dtype)

    def decode(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Latent tokens (B, L, 64) -> image (B, 3, H, W) in about [-1, 1], float32."""
        from flux.decode import decode_latents, decoder_bytes_per_image

        try:
            # With --offload only the decoder visits the GPU, as in the reference.
            self.ae.decoder.to(self.device)
            self.decoder_stranded = False
            return decode_latents(tokens, self.ae, height, width).float()
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the exception (and the activations its frames hold) is gone
        # Sampling finished, so the image and the capture are worth minutes: decode on the CPU, not fail.
        print(
            f"The GPU ran out of memory decoding the {width}x{height} image: decoding it on the CPU instead "
            "(in float32, slower).",
            file=sys.stderr,
        )
        need, available = decoder_bytes_per_image(self.spec.ae_params, height, width), available_host_memory()
        if available is not None and need > available:
            print(
                f"warning: that may take up to {need / 1e9:.0f} GB of host memory, and {available / 1e9:.0f} "
                "GB is available; should the system stop this process, a --format safetensors capture keeps "
                "its finished steps (`capture_sample.py decode` shows them).",
                file=sys.stderr,
            )
        _empty_cache(self.device)
        self.to_host("ae.decoder")
        image = decode_latents(tokens.cpu(), self.ae, height, width).float()
        try:  # back for the lens
            self.ae.decoder.to(self.device)
            return image
        except torch.cuda.OutOfMemoryError:
            pass
        # The GPU is still full: the image is kept and the decoder stays on the CPU, whole (a move cut short
        # leaves some parameters on each device), and the run skips its lens.
        self.to_host("ae.decoder")
        self.decoder_stranded = True
        _empty_cache(self.device)
        return image

    def make_room_for_vae(self, height: int, width: int) -> list[str]:
        """Before decoding on the GPU: while one image's decoder estimate exceeds the free GPU memory, park
        the text encoders (done for this run), then the flow model, on the CPU. Returns what was moved.

        A no-op with --offload (only the decoder is on the GPU then) and below ~2048 px on an 80 GB GPU.
        """
        if self.offload or self.device.type != "cuda":
            return []
        from flux.decode import decoder_bytes_per_image, free_gpu_bytes

        need = decoder_bytes_per_image(self.spec.ae_params, height, width)
        parked: list[str] = []
        for names in (("t5", "clip"), ("flow",)):
            if free_gpu_bytes(self.device) >= need:
                break
            size = sum(_module_bytes(getattr(self, name)) for name in names)
            available = available_host_memory()
            if available is not None and size > 0.8 * available:  # host RAM holds the capture too
                print(
                    f"Not moving {', '.join(names)} to the CPU for the VAE: {size / 1e9:.0f} GB would not "
                    f"fit in the {available / 1e9:.0f} GB of host memory available.",
                    file=sys.stderr,
                )
                break
            for name in names:
                getattr(self, name).cpu()
            parked += names
        if parked:
            _empty_cache(self.device)
            print(
                f"Moved {', '.join(parked)} to the CPU to make room for the VAE at {width}x{height} "
                f"(estimated {need / 1e9:.0f} GB per image).",
                file=sys.stderr,
            )
        return parked

    def offload_decoder(self) -> None:
        if self.offload:
            self.to_host("ae.decoder")
            _empty_cache(self.device)


def _tensors(module: torch.nn.Module):
    return (*module.named_parameters(), *module.named_buffers())


def _held(module: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors a module's parameters and buffers hold now, by name."""
    return {n: t.data for n, t in _tensors(module)}


def _point_back(module: torch.nn.Module, held: dict[str, Tensor]) -> None:
    """Point a module's parameters and buffers at tensors `_held` took: a move back without a copy."""
    for n, t in _tensors(module):
        t.data = held[n]


def visiting(module: torch.nn.Module, device: torch.device):
    """For a module in host memory: a context manager factory under which it runs on `device`, coming back
    after to the tensors it holds now (no copy back, no new host memory), as --offload moves the models."""
    held = _held(module)

    @contextlib.contextmanager
    def visit():
        module.to(device)
        try:
            yield
        finally:
            _point_back(module, held)
            _empty_cache(device)

    return visit


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _free_pinned_memory() -> None:
    """Give cached pinned host memory back to the system (torch keeps freed pinned blocks for reuse)."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # torch >= 2.5
    if empty is not None and torch.cuda.is_available():
        empty()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_models(
    spec: ModelSpec,
    device: str | torch.device,
    offload: bool = False,
    weights_dir: str | None = None,
    progress: bool = True,
) -> Models:
    """Load the flow model, AE and text encoders of `spec` (on the CPU first with --offload).

    `progress=False` also silences the download and loading bars of huggingface_hub and transformers.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        # Make cuda:N current, so events, streams and pinned memory all belong to the run's GPU.
        torch.cuda.set_device(device)
    dtype = compute_dtype(spec)
    home = torch.device("cpu") if offload else device
    with library_progress_bars(progress):
        # The flow model and AE files first, each checked from its header: a gated repo, a missing or a
        # wrong file is reported before the 10 GB of text encoders is fetched and loaded.
        text_source = text_encoder_source(spec, weights_dir)  # a FLUX_TEXT_ENCODERS that is no folder: now
        flow_path, ae_path = resolve_flow_path(spec, weights_dir), resolve_ae_path(spec, weights_dir)
        check_checkpoint(lambda: Flux(spec.params), flow_path, flow_what(spec))
        check_checkpoint(lambda: AutoEncoder(spec.ae_params), ae_path, AE_WHAT)
        t5, clip = load_text_encoders(spec, home, dtype, source=text_source)
        flow = load_flow_model(spec, home, dtype, path=flow_path)
        ae = load_ae(spec, home, path=ae_path)
    weights = {"flow": str(flow_path), "ae": str(ae_path), "text_encoders": str(text_source)}
    models = Models(spec, flow, ae, t5, clip, device, dtype, offload, weights=weights)
    if offload:
        models.keep_host_weights()
    return models


def buffers_while_loading(opts: RunOptions) -> Future | None:
    """Start allocating the capture's host buffers in a thread, for one `generate(..., buffers=)` call; None
    when that is better done as usual, after the models (among others, when the capture is expected to
    wait on the GPU, see `RunOptions.capture_on_device`).

    Pinning them is slow (about 2.6 s for flux-schnell at 1024 px on an H200, longer for more steps) and
    needs nothing but the run's dimensions, so the CLI does it while the models load: at worst the two take
    turns at the driver, as they did one after the other. Not with --offload (the models then live in host
    memory), nor unless the buffers fit in the available memory beside what the models may hold there while
    they load (on CUDA the text encoders, which transformers may read into host memory first; on the CPU all
    of them). On the CPU nothing is pinned and this gains nothing, but costs nothing either.
    """
    from flux.options import TEXT_ENCODER_BYTES, model_host_bytes

    if not opts.capture or opts.offload or opts.capture_on_device():
        return None  # a capture on the GPU is allocated after the models, by the memory then free: quickly
    device, plan = torch.device(opts.device), opts.plan()
    available = available_host_memory()
    held = opts.estimated_capture_bytes(pinned=device.type == "cuda")
    if opts.format == "safetensors":  # a few steps' buffers at most, however many steps the run has
        per_step = held // len(plan.steps)
        held = min(len(plan.steps), streaming_buffer_sets(per_step, available)) * per_step
    loading = TEXT_ENCODER_BYTES if device.type == "cuda" else model_host_bytes(opts.spec)
    if available is None or held + loading > available:
        return None
    txt_len, img_len = opts.token_counts()
    dims = (plan, opts.format, txt_len, img_len, compute_dtype(opts.spec), opts.num_steps, device)
    return buffers_in_a_thread(opts.spec.params, *dims)


def buffers_in_a_thread(
    params: FluxParams,
    plan: CapturePlan,
    fmt: str,
    txt_len: int,
    img_len: int,
    dtype: torch.dtype,
    num_steps: int,
    device: torch.device,
) -> Future:
    """`CaptureSession.buffers` in host memory for a model of `params`, run by a new thread: the future of
    the pool (or of the error that allocating it raised)."""
    future = Future()

    def allocate() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # this thread's current GPU: the pinned memory is the run's
            with torch.device("meta"):
                flow = Flux(params)  # only its dimensions are read
            pool = CaptureSession.buffers(
                flow, plan, fmt, txt_len, img_len, dtype, num_steps, device, on_device=False
            )
        except BaseException as e:  # generate reports it and allocates the buffers itself
            future.set_exception(e)
        else:
            future.set_result(pool)

    # Not a daemon: a Ctrl-C during loading waits for the pinning to end (seconds) rather than tearing the
    # interpreter and CUDA down under a thread inside the driver.
    threading.Thread(target=allocate, name="capture-buffers").start()
    return future


def _take_buffers(buffers: Future | None) -> BufferPool | None:
    """The pool allocated while the models loaded; None (generate allocates it) if that failed."""
    if buffers is None:
        return None
    try:
        return buffers.result()
    except Exception as e:  # e.g. pinned memory ran short beside the loading models: try again now
        print(
            f"Allocating the capture's host buffers while the models loaded failed ({type(e).__name__}: "
            f"{e}); allocating them now.",
            file=sys.stderr,
        )
        e.__traceback__ = None  # its frames would keep the half-allocated buffers alive in the future
        return None


# -------------------------------------------------------------------------------------- generation
def _set_bytes(shapes: dict, dtypes: dict, keys: Sequence[str] | None = None, pinned: bool = False) -> int:
    """Bytes of one buffer set (`keys`: those buffers only), or (`pinned`) what it takes in pinned memory."""
    return sum(host_nbytes(math.prod(shapes[k]) * dtypes[k].itemsize, pinned) for k in keys or shapes)


@dataclass
class CaptureSession:
    """Hooks, buffers and a sink for one sampling run: the glue between the sampler and the store."""

    capture: BlockCapture
    sink: PtSink | SafetensorsSink
    path: Path

    @staticmethod
    def buffers(
        flow: Flux,
        plan: CapturePlan,
        fmt: str,
        txt_len: int,
        img_len: int,
        dtype: torch.dtype,
        num_steps: int,
        device: torch.device,
        on_device: bool | None = None,
    ) -> BufferPool:
        """The buffers of a capture of these dimensions, allocated now, before the first step. `flow` only
        lends its dimensions: a model on the meta device will do.

        A `.pt` capture on CUDA waits on the GPU where it fits beside what is allocated now (`on_device`
        None: `capture_fits_on_device`; True or False forces the choice). Otherwise it is host memory,
        pinned on CUDA: slow, which is why all of it is allocated here, never inside the sampling loop.
        """
        shapes, dtypes = BlockCapture.shapes_for(flow, plan, 1, txt_len, img_len, dtype)
        captured, uncaptured = len(plan.steps), num_steps - len(plan.steps)
        if fmt == "pt" and device.type == "cuda" and on_device is not False:
            forced = on_device is True
            if not forced:
                from flux.decode import free_gpu_bytes

                nbytes = captured * _set_bytes(shapes, dtypes) + uncaptured * _set_bytes(
                    shapes, dtypes, CONTEXT_KEYS
                )
                on_device = capture_fits_on_device(nbytes, free_gpu_bytes(device))
            if on_device:
                try:
                    pool = BufferPool(shapes, dtypes, pin=False, device=device)
                    pool.preallocate(full=captured, context=uncaptured)
                    return pool
                except torch.cuda.OutOfMemoryError:
                    if forced:
                        raise
                # Another process took the memory since it was measured: host memory it is.
                pool = None
                _empty_cache(device)
        pin = device.type == "cuda"
        held_bytes = _set_bytes(shapes, dtypes, pinned=pin)
        limit = streaming_buffer_sets(held_bytes, available_host_memory()) if fmt == "safetensors" else None
        pool = BufferPool(shapes, dtypes, pin=pin, limit=limit)
        # A .pt keeps every step's buffers; the writer recycles them, so a few sets of each kind will do
        # (one context-only set per uncaptured step made a sparse plan's memory grow with the steps).
        pool.preallocate(
            full=captured if limit is None else min(limit, captured),
            context=uncaptured if limit is None else min(limit, uncaptured),
        )
        return pool

    @classmethod
    def open(
        cls,
        flow: Flux,
        plan: CapturePlan,
        fmt: str,
        path: Path,
        txt_len: int,
        img_len: int,
        dtype: torch.dtype,
        metadata: dict,
        num_steps: int,
        device: torch.device | None = None,
        pool: BufferPool | None = None,
        context: dict | None = None,
        on_device: bool | None = None,
    ) -> "CaptureSession":
        """Prepare a capture into `path` (a `.pt` file, or a directory created here for safetensors).

        `device` is where sampling will run (default: where `flow` is now; with --offload the model is still
        on the CPU at this point, so pass the run's device). `pool`: its buffers if already allocated
        (`buffers`, called with the same dimensions, e.g. while the models load); allocated here otherwise.
        `context`: the run's context known before sampling, which a safetensors capture writes at once.
        `on_device`: whether a `.pt` capture's buffers are on the GPU (None: where they fit; see `buffers`).
        """
        device = device if device is not None else next(flow.parameters()).device
        shapes, dtypes = BlockCapture.shapes_for(flow, plan, 1, txt_len, img_len, dtype)
        if pool is None:
            pool = cls.buffers(flow, plan, fmt, txt_len, img_len, dtype, num_steps, device, on_device)
        else:
            # Host memory (pinned on CUDA), or the run's device for a .pt; bounded for safetensors only.
            places = [(None, device.type == "cuda")] + [(device, False)] * (fmt == "pt")
            if (pool.shapes, pool.dtypes, pool.limit is None) != (shapes, dtypes, fmt == "pt") or (
                pool.device,
                pool.pin,
            ) not in places:
                raise ValueError("the buffers given were allocated for another capture")
        step_bytes = _set_bytes(shapes, dtypes)
        if fmt == "safetensors":
            path.mkdir()
            sink = SafetensorsSink(path, pool, metadata, context)
        else:
            sink = PtSink(path, pool, step_bytes * len(plan.steps))
        return cls(BlockCapture(flow, plan, pool, txt_len), sink, path)

    def release(self) -> None:
        """Let go of every buffer set the session holds (a `.pt` sink's steps, the step being filled, the
        pool's free sets), so their memory goes back once nothing else holds it: for when the capture is
        written or given up."""
        self.capture.current = None
        if isinstance(self.sink, PtSink):
            self.sink.steps.clear()
        self.capture.pool.drain()

    def before_step(self, info) -> None:
        self.capture.begin_step(info.index, info.img)

    def after_step(self, info) -> None:
        self.sink.add_step(self.capture.end_step())


def sample(
    flow: Flux,
    inp: dict[str, Tensor],
    timesteps: list[float],
    guidance: float,
    session: CaptureSession | None = None,
    progress: bool | str = False,
) -> Tensor:
    """Run the sampler on prepared inputs, capturing through `session` if given; returns the final latent.

    The hooks exist only inside this call and are removed even when it raises (Ctrl-C included). What
    happens to a half-finished capture is the caller's choice: `generate` calls `session.sink.abort`, which
    keeps the finished safetensors steps readable and marks the index incomplete.
    """
    args = {k: inp[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec")}
    desc = progress if isinstance(progress, str) else "sampling"
    bar = (lambda it: tqdm(it, desc=desc, unit="step")) if progress else None
    if session is None:
        latent = denoise(flow, **args, timesteps=timesteps, guidance=guidance, progress=bar)
    else:
        with session.capture:
            latent = denoise(
                flow, **args, timesteps=timesteps, guidance=guidance, progress=bar,
                before_step=session.before_step, after_step=session.after_step,
            )  # fmt: skip
    if latent.device.type == "cuda":
        torch.cuda.synchronize(latent.device)
    return latent


@dataclass
class RunResult:
    image_path: Path
    capture_path: Path | None
    metadata_path: Path | None
    metadata: dict
    image: Tensor
    decoded_dir: Path | None = None
    timings: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture: what ran a capture, for its metadata."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    names = ("torch", "transformers", "safetensors", "huggingface_hub", "einops", "numpy", "pillow")
    for name in (*names, "flux-intermediate-representation"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def generate(
    models: Models, opts: RunOptions, progress: bool = True, buffers: Future | None = None
) -> RunResult:
    """Sample one image for validated `opts`, capturing blocks if asked, and write every output file.

    `buffers`: the capture's host buffers being allocated by `buffers_while_loading(opts)` (default: they
    are allocated here, before sampling).

    Outputs: `{output_dir}/img_{n}.jpg` (next free n) and, with capture,
    `intermediates/capture_{stamp}_{model}` (`.pt` or a safetensors directory), its
    `intermediates/metadata_{stamp}_{model}.json`, and with the lens `intermediates/decoded/{stem}/`.
    """
    from flux.decode import save_jpeg, to_image

    if opts.num_steps is None or opts.guidance is None:  # the model's defaults, filled in by validate
        raise ValueError("generate needs validated options: pass RunOptions(...).validate().")
    spec, device, dtype = models.spec, models.device, models.dtype
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**63)
    out_dir = Path(opts.output_dir)
    inter_dir = out_dir / "intermediates"
    timings: dict[str, float] = {}

    start = time.perf_counter()
    txt, y = models.encode_prompt(opts.prompt)
    timings["encode_prompt_s"] = time.perf_counter() - start
    noise = get_noise(1, opts.height, opts.width, device=device, dtype=dtype, seed=seed)
    inp = prepare(noise, txt, y)
    timesteps = get_schedule(opts.num_steps, inp["img"].shape[1], shift=spec.shift_schedule)
    txt_len, img_len = inp["txt"].shape[1], inp["img"].shape[1]
    metadata = run_metadata(models, opts, seed, timesteps, txt_len, img_len)
    context = _known_context(inp, y, opts.guidance, timesteps)

    session = stem = None
    pool = _take_buffers(buffers)  # before the name is claimed: waiting here may end in Ctrl-C
    if opts.capture:
        plan = opts.plan()
        inter_dir.mkdir(parents=True, exist_ok=True)
        stem = claim_stem(inter_dir, spec.name)
        path = inter_dir / (stem if opts.format == "safetensors" else f"{stem}.pt")
        metadata.update(
            plan.describe(1, txt_len, img_len, models.flow.hidden_size, dtype),
            format=opts.format,
            estimated_capture_bytes=opts.estimated_capture_bytes(),
            files={"capture": str(path), "metadata": str(metadata_path_for(stem, inter_dir))},
        )
    try:
        # Back from the CPU if offloaded, or parked by an earlier run's VAE work; before the capture's
        # buffers, which may go on the GPU by the memory left free beside it.
        models.flow.to(device)
        if opts.capture:
            session = CaptureSession.open(
                models.flow, plan, opts.format, path, txt_len, img_len, dtype, metadata, opts.num_steps,
                device, pool, context, on_device=False if models.offload else None,
            )  # fmt: skip
    except BaseException:  # nothing was captured yet: take back the name and the folder made for it
        if session is not None:
            session.sink.abort()
        if stem is not None:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            release_stem(inter_dir, stem)
        raise
    start = time.perf_counter()
    # Until the capture is complete, any exception (Ctrl-C, SIGTERM, a full disk while writing the image or
    # the capture) stops the writer, leaves what reached the disk valid and says what it is; the capture's
    # name is freed whatever happens. Then the exception propagates.
    lens = session is not None and opts.should_decode_intermediates
    saving: Future | None = None  # a .pt write running beside the lens
    capture = None
    finished = False
    try:
        try:
            latent = sample(
                models.flow, inp, timesteps, opts.guidance, session, f"sampling {spec.name}" * progress
            )
        finally:
            if models.offload:
                models.to_host("flow")
                _empty_cache(device)
        timings["sampling_s"] = time.perf_counter() - start

        if session is not None and isinstance(session.sink, SafetensorsSink):
            # The streamed steps' host buffers (pinned; 30 GB a set at 4096 px) go back before the VAE
            # wants memory: models parked in host RAM for it, or its decode on the CPU if the GPU is full.
            session.sink.wait_for_steps()
            session.capture.pool.drain()
            _free_pinned_memory()
        models.make_room_for_vae(opts.height, opts.width)
        image = models.decode(latent, opts.height, opts.width)
        if lens and models.decoder_stranded:  # the lens would run out of GPU memory too, after the save
            lens = False
            print(
                "Skipping the lens: the GPU has no room for the VAE decoder beside this process's models. "
                "Decode it from a fresh process once the capture is saved: `capture_sample.py decode "
                f"{session.path}`.",
                file=sys.stderr,
            )
        image_path = publish_new(
            lambda n: out_dir / f"img_{n}.jpg",
            lambda tmp: save_jpeg(to_image(image[0]), tmp),
            start=next_image_index(out_dir),
        )
        metadata.setdefault("files", {}).update(image=str(image_path), image_sha256=file_sha256(image_path))
        result = RunResult(image_path, None, None, metadata, image, timings=timings)
        if session is not None:
            context["final_latent"] = latent.cpu()
            save_start = time.perf_counter()
            if lens and isinstance(session.sink, PtSink):
                # The .pt is written by a thread while the lens decodes the same buffers: at disk
                # speed (~0.7 GB/s for torch.save) the write would otherwise add its whole time to the run.
                capture = session.sink.collect(context, metadata)
                saving = _write_beside(session.sink, capture, result, stem, inter_dir)
            else:
                result.capture_path = session.sink.finish(context, metadata)
                finished = True
                _record_saved(result, stem, inter_dir, time.perf_counter() - save_start)
                session.capture.pool.drain()  # the writer's buffer sets (up to 8 steps, pinned on CUDA)
                _free_pinned_memory()
    except BaseException as e:
        if session is not None and not finished and saving is None:
            _report_interrupted(session, context, metadata, inter_dir, stem, e)
            with contextlib.suppress(Exception):  # after a CUDA error this may fail too: `e` is the one
                session.release()  # a .pt's buffers may hold half the GPU; the traceback keeps the session
                _empty_cache(device)
        raise
    finally:
        if stem is not None and saving is None:
            release_stem(inter_dir, stem)
    if session is None:
        models.offload_decoder()
        return result

    try:
        if lens:
            _run_lens(models, opts, result, capture, saving, inter_dir / "decoded" / stem, progress)
        if saving is not None:
            _wait_for_the_write(saving, result)
    finally:
        # Let go of the capture's buffers (pinned host memory, or the GPU's), so that their memory goes back,
        # also when the lens or the write failed: the traceback then keeps this frame and the lens's alive,
        # and the write's closures, so the collected capture is emptied in place once nothing reads it (after
        # a second Ctrl-C while waiting for the write, when the write ends).
        if saving is not None:  # the capture collected for the write beside the lens; at once if it is done
            saving.add_done_callback(lambda _, kept=capture: drop_buffers(kept))
        capture = None
        with contextlib.suppress(Exception):  # after a CUDA error these may fail too: the first error counts
            session.release()
            _free_pinned_memory()
            _empty_cache(device)
    models.offload_decoder()
    return result


def _known_context(inp: dict[str, Tensor], y: Tensor, guidance: float, timesteps: list[float]) -> dict:
    """The denoising context known before sampling (on the CPU): what a replay needs besides the latents,
    which the sampler adds step by step, and the final latent, added at the end."""
    return {
        "y": y.cpu(),
        "txt": inp["txt"].cpu(),
        "txt_ids": inp["txt_ids"].cpu(),
        "img_ids": inp["img_ids"].cpu(),
        "txt_seq_len": inp["txt"].shape[1],
        "guidance": guidance,
        "timestep_pairs": list(itertools.pairwise(timesteps)),
    }


def _run_lens(
    models: Models,
    opts: RunOptions,
    result: RunResult,
    capture: dict | None,
    saving: Future | None,
    decoded_dir: Path,
    progress: bool,
) -> None:
    """The lens of the saved capture (or, with `saving`, of the collected `capture` while a thread writes
    it) into `decoded_dir`; its timings go into `result`. If it stops, the write is waited for first (a
    failed write's error raised instead), and the user is told which outputs are complete."""
    from flux.decode import final_layer_from

    def stop_if_the_write_failed() -> None:
        if saving is not None and saving.done() and saving.exception() is not None:
            raise saving.exception()  # the lens stops; _wait_for_the_write cleans up once its files are done

    result.decoded_dir = decoded_dir
    spec, device, dtype = models.spec, models.device, models.dtype
    try:
        # The lens's own copy of the final layer, built as decode-later builds it (so both give the same
        # files); with --offload the model itself stays on the CPU.
        state = {f"final_layer.{k}": v for k, v in models.flow.final_layer.state_dict().items()}
        final_layer = final_layer_from(state, spec.params, "the loaded model", device, dtype)
        report = decode_saved(
            capture if saving is not None else result.capture_path, final_layer, models.ae, decoded_dir,
            target=opts.decode_target, device=device, batch_size=opts.decode_batch_size,
            compile=opts.compile_decoder, progress=progress, between_batches=stop_if_the_write_failed,
        )  # fmt: skip
    except BaseException as e:  # the run's other outputs are complete (once the write is); the lens not
        if saving is not None:
            _wait_for_the_write(saving, result)  # a failed write's error replaces the lens's
        print(
            f"\n{_stopped(e)} while decoding the lens. Saved and complete: the image {result.image_path}, "
            f"the capture {result.capture_path} and its metadata {result.metadata_path}. "
            f"{decoded_dir} holds only the JPEGs finished so far; decode again with "
            f"`capture_sample.py decode {result.capture_path}`.",
            file=sys.stderr,
        )
        raise
    result.timings["lens_compile_s"] = report.compile_seconds
    result.timings["lens_decode_s"] = report.decode_seconds
    result.timings["lens_images"] = report.n_images


def _wait_for_the_write(saving: Future, result: RunResult) -> None:
    """Wait for a `.pt` write running beside the lens (its thread also writes the metadata and frees the
    name, so a second Ctrl-C here still leaves a complete capture). If it failed, its error is raised and
    the lens, which would show a capture that does not exist, is removed."""
    if not saving.done():
        print(f"Waiting for the capture to finish writing to {result.metadata['files']['capture']} ...",
              file=sys.stderr)  # fmt: skip
    error = saving.exception()
    if error is not None:
        if result.decoded_dir is not None:
            shutil.rmtree(result.decoded_dir, ignore_errors=True)
        raise error


def _record_saved(result: RunResult, stem: str, folder: Path, seconds: float) -> None:
    """The capture is on disk: note how long writing it took, and write its metadata."""
    result.timings["save_capture_s"] = seconds
    meta_path = metadata_path_for(stem, folder)
    result.metadata_path = write_json(meta_path, {**result.metadata, "complete": True})


def _write_beside(sink: PtSink, capture: dict, result: RunResult, stem: str, folder: Path) -> Future:
    """Start writing a collected `.pt` capture in a thread, which then writes its metadata and frees its
    name: a capture that reached the disk gets its metadata whatever the main thread is doing."""
    start = time.perf_counter()

    def write() -> None:
        try:
            result.capture_path = sink.write(capture)
            _record_saved(result, stem, folder, time.perf_counter() - start)
        finally:
            release_stem(folder, stem)

    writer = ThreadPoolExecutor(1, thread_name_prefix="save-capture")
    saving = writer.submit(write)
    writer.shutdown(wait=False)  # the write goes on; the thread ends with it
    return saving


def run_metadata(
    models: Models, opts: RunOptions, seed: int, timesteps: list[float], txt_len: int, img_len: int
) -> dict[str, Any]:
    """Everything needed to reproduce the run: model, prompt, size, seed, schedule, versions, all flags."""
    device = models.device
    return {
        "schema_version": SCHEMA_VERSION,
        "model": models.spec.name,
        "prompt": opts.prompt,
        # Text position i of every block's txt tokens is t5_tokens[i]; the positions after these are padding.
        "t5_tokens": models.t5.token_strings(opts.prompt),
        "width": opts.width,
        "height": opts.height,
        "num_steps": opts.num_steps,
        "timesteps": timesteps,
        "seed": seed,
        "guidance": opts.guidance,
        "guidance_used": models.spec.uses_guidance,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": str(models.dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": device_name(device),
        "versions": package_versions(),
        "weights": models.weights,  # the files or repos loaded: FLUX_MODEL and friends are not flags
        "flags": {k: v for k, v in asdict(opts).items() if k != "warnings"},
        "txt_seq_len": txt_len,
        "img_seq_len": img_len,
    }


def _stopped(error: BaseException) -> str:
    """How a run ended early: "Interrupted" only for Ctrl-C or SIGTERM, never for an error (a full disk)."""
    if isinstance(error, KeyboardInterrupt):
        return "Interrupted"
    return f"Stopped by an error ({type(error).__name__})"


def _report_interrupted(
    session: CaptureSession, context: dict, metadata: dict, folder: Path, stem: str, error: BaseException
) -> None:
    """Stop the sink, keeping what reached the disk valid, and say what was saved; the caller re-raises."""
    why = _stopped(error)
    try:
        saved = session.sink.abort(context)
        if isinstance(session.sink, SafetensorsSink):
            write_json(metadata_path_for(stem, folder), {**metadata, "complete": False, "steps_done": saved})
    except Exception as e:  # e.g. the disk is still full; the original error is the one raised
        print(
            f"\n{why}. Could not finish the partial capture in {session.path} ({e}); "
            "the steps its index.json lists are complete."
            if isinstance(session.sink, SafetensorsSink)
            else f"\n{why}. No .pt capture was saved.",
            file=sys.stderr,
        )
        return
    if isinstance(session.sink, SafetensorsSink):
        print(
            f"\n{why}: steps {format_steps(saved) if saved else 'none'} are saved in {session.path} (index "
            "marked incomplete).",
            file=sys.stderr,
        )
    else:
        print(f"\n{why}: a .pt capture is written only at the end, so none was saved.", file=sys.stderr)


def decode_saved(
    capture: Path | dict,
    final_layer,
    ae: AutoEncoder,
    out_dir: Path,
    *,
    target: str = "x0",
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
    progress: bool = True,
    between_batches=None,
    blocks: dict[str, Sequence[int]] | None = None,
    steps: Sequence[int] | None = None,
):
    """Run the lens over a capture (a path on disk, or the capture in memory) into `out_dir`, a new folder
    (or one just made for it by `new_dir`: never a folder that holds anything); `blocks` and `steps` as
    for `lens_plan`.

    The contact sheets' final column decodes the stored final latent in the same batches as the blocks, so
    decoding at capture time and decoding later give identical files.
    """
    from flux.decode import decode_capture
    from flux.store import load_capture

    if not isinstance(capture, dict):
        capture = load_capture(capture)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; the lens never writes over earlier files")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = decode_capture(
        capture, final_layer, ae, out_dir, target=target, device=device, batch_size=batch_size,
        compile=compile, progress=progress, between_batches=between_batches, blocks=blocks, steps=steps,
    )  # fmt: skip
    what = "compiling" if report.compiled else "warming up"  # on CUDA the eager decoder warms up too
    compile_note = f", plus {report.compile_seconds:.1f} s {what}" if report.compile_seconds else ""
    print(
        f"Decoded the lens: {report.n_images} images in {report.decode_seconds:.2f} s "
        f"({1000 * report.seconds_per_image:.1f} ms each{compile_note}) -> {out_dir}"
    )
    return report


def next_image_index(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    return next_free_index(out_dir, "img_", ".jpg")


def decode_later(
    capture_path: str | Path,
    output_dir: str | Path | None = None,
    target: str = "x0",
    device: str | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
    weights_dir: str | None = None,
    blocks: str | None = None,
    steps: str | None = None,
    progress: bool = True,
):
    """The lens over a saved capture, loading only the final layer's tensors and the AE (never the full
    flow model). Output goes to `{capture folder}/decoded/{capture stem}` unless `output_dir` is given; an
    existing folder is never written into (a suffix is added). `blocks` and `steps` (in the syntax of
    --blocks and --steps) pick some of the captured block outputs; default all."""
    from flux.decode import lens_plan, load_model_final_layer
    from flux.store import load_capture

    # Check every value before reading or writing anything (exit code 2, no output folder).
    check_decode_flags(target, batch_size)
    device = check_device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # as for generation: kernels, streams and events on the chosen GPU
    capture = load_capture(capture_path)
    meta = capture["metadata"]
    spec = get_spec(meta["model"])
    chosen = CapturePlan.parse(
        blocks,
        steps,
        "both",
        None,
        spec.params.depth,
        spec.params.depth_single_blocks,
        int(meta["num_steps"]),
    )
    only_blocks = None if blocks is None else {"double": chosen.double, "single": chosen.single}
    only_steps = None if steps is None else chosen.steps
    # A capture the lens cannot decode (--streams txt), or blocks and steps it lacks: refused before loading.
    lens_plan(capture, only_blocks, only_steps)
    dtype = compute_dtype(spec)
    decoded, stem = beside_capture(capture_path, "decoded")
    out_base = Path(output_dir) if output_dir else decoded / stem
    check_output_dir(out_base)
    final_layer = load_model_final_layer(spec, weights_dir, device, dtype)
    ae = load_ae(spec, device, weights_dir=weights_dir)
    with fresh_dir(out_base) as out_dir:
        return decode_saved(
            capture, final_layer, ae, out_dir, target=target, device=device, batch_size=batch_size,
            compile=compile, progress=progress, blocks=only_blocks, steps=only_steps,
        )  # fmt: skip
