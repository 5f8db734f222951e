"""What capture costs: the sampler with capture off, to .pt, to safetensors, and the earlier tool's way.

    uv run python benchmarks/bench_capture.py                                   # flux-tiny on CPU, < 1 min
    uv run python benchmarks/bench_capture.py --model flux-schnell --random_weights --quick   # on a GPU

Modes, each timed on the same inputs (random T5/CLIP embeddings: the text encoders are left out):

    off          the sampler alone
    pt           our default path: hooks copying into preallocated buffers, on the GPU where the capture
                 fits there (flux-schnell's up to 1024 px on an 80 GB GPU), else in pinned host memory; one
                 `.pt` written at the end by a thread (from host copies of GPU buffers) while the lens
                 decodes every block output from memory (`decode_capture` with its default batch size,
                 computed once per size, and compiled on CUDA unless --no_compile); its save and decode
                 columns are each timed beside the other, and its total counts that phase once
    pt_host      the same with the buffers in pinned host memory, as for a capture too large for the GPU
                 (CUDA only: on the CPU it is pt)
    safetensors  hooks as above, one shard per step streamed to disk from a background thread
    naive        the earlier public tool, rebuilt here as the baseline: a blocking `.cpu()` per block output
                 inside each hook, then one decode at a time of the next-step latent
                 img_state + (t_prev - t_curr) * pred, a JPEG written synchronously per image, then one
                 `torch.save` of the whole capture

The table gives seconds per step, each mode's sampling time against capture off (also for the mode's
first run), the setup (allocating the buffers, and pinning host ones: every measured run pays it, as a
one-shot CLI run does, since torch's caches of device and pinned memory are emptied before each; the
pinned one through torch._C._host_emptyCache, where this torch has it), and the whole capture time
(setup, sampling, saving, the lens) of `pt` against `naive`; the one-time decoder compile (and warm-up) is
a column of its own, left out of the totals. The safetensors writer's throughput (bytes
over the seconds its thread spent in `save_file`; no fsync, so the page cache may absorb part of it) is
set against the disk's sequential write speed measured in the same run (buffered writes + fsync into
--output_dir). Peak host RSS is per mode (VmHWM, reset before each run where Linux allows, else the
process peak so far); peak device memory is `torch.cuda.max_memory_allocated`, reset likewise.

Figures are medians over --repeats runs after --warmup runs (for `naive`, which compiles nothing and runs
longest, one eager decode at that size stands in for its warm-up runs, unless --skip_decode). The
measured runs take the modes in turn, round after round, so drift of the machine falls on all of them
alike; before each run the disk's dirty pages are flushed and garbage is collected, so no run pays for
the last one's leftovers. Every file goes into a new folder under --output_dir and is deleted as soon as
its run is measured (the folder at the end). Step times at 256 and 512 px are bound by the CPU launching
kernels (about as long at both sizes), so they vary more from run to run than the GPU-bound ones at
1024 px: --repeats 5 or more there.
"""

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from flux.autoencoder import AutoEncoder
from flux.capture import CapturePlan
from flux.configs import ModelSpec, get_spec
from flux.decode import auto_batch_size, decode_capture, decode_latents, stable_batch_size, to_uint8
from flux.loading import load_ae, load_flow_model
from flux.model import Flux
from flux.pipeline import CaptureSession, compute_dtype, sample
from flux.sampling import StepInfo, denoise, get_noise, get_schedule, prepare
from flux.store import SCHEMA_VERSION

MODES = ("off", "pt", "pt_host", "safetensors", "naive")
CPU_MODES = ("off", "pt", "safetensors", "naive")  # on the CPU pt_host is pt: its buffers are host memory
GB = 1e9


# ------------------------------------------------------------------------------------------ models
@torch.no_grad()
def random_module(factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int):
    """Build on meta, allocate straight on `device` in `dtype`, fill with a cheap random init there.

    Matrices and convolutions ~ N(0, 0.02), biases 0, 1-D scales 1: full-size FLUX (12B parameters) never
    exists on the CPU, nor in float32 anywhere. Speed does not depend on the values.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype).to_empty(device=device)
    if buffers := [name for name, _ in module.named_buffers()]:
        raise RuntimeError(f"to_empty leaves buffers uninitialised; this init does not handle {buffers}")
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return module.eval().requires_grad_(False)


def build_models(spec: ModelSpec, device: torch.device, dtype: torch.dtype, random_weights: bool):
    """(flow in `dtype`, AE in float32 like the checkpoint), random or loaded through flux.loading."""
    if random_weights:
        flow = random_module(lambda: Flux(spec.params), device, dtype, seed=0)
        ae = random_module(lambda: AutoEncoder(spec.ae_params), device, torch.float32, seed=1)
    else:
        flow = load_flow_model(spec, device, dtype)
        ae = load_ae(spec, device)
    return flow, ae


# ------------------------------------------------------------------------------------ measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device: torch.device) -> bool:
    """Free caches and reset the peak counters; False when the host RSS peak could not be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # cached pinned blocks would count in the next RSS
            torch._C._host_emptyCache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes: VmHWM since the last reset, else the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def disk_write_speed(folder: Path, nbytes: int) -> float:
    """Bytes/s of plain buffered sequential writes of `nbytes` incompressible bytes, fsync included."""
    chunk = memoryview(os.urandom(min(nbytes, 64 << 20)))
    path = folder / "disk_write_test.bin"
    try:
        start = time.perf_counter()
        with open(path, "wb") as f:
            written = 0
            while written < nbytes:
                written += f.write(chunk[: nbytes - written])
            f.flush()
            os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def time_hooks(session: CaptureSession) -> list[float]:
    """Accumulate the seconds the capture hooks spend copying (their CPU time: on CUDA the copies are only
    queued) into the returned one-item list. Where the sampler is bound by the CPU launching kernels, this
    is what capture adds to a step, measured directly rather than as a difference of noisy step times; it
    leaves out the few microseconds a module with hooks takes to call them, and adds two clock reads per
    hook (well under 1% of a step) to the sampling time of the modes it times."""
    copy, spent = session.capture._copy, [0.0]

    def timed(*items) -> None:
        start = time.perf_counter()
        copy(*items)
        spent[0] += time.perf_counter() - start

    session.capture._copy = timed
    return spent


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- one size
class Case:
    """Everything the modes share at one image size: models, prepared inputs, schedule, plan."""

    def __init__(
        self, flow: Flux, ae: AutoEncoder, spec: ModelSpec, txt: Tensor, y: Tensor, size: int,
        num_steps: int, out: Path, *, decode: bool = True, batch_size: int | None = None,
        compile: bool | None = None,
    ):  # fmt: skip
        self.flow, self.ae, self.spec, self.device, self.dtype = flow, ae, spec, txt.device, txt.dtype
        self.size, self.out = size, out
        self.decode, self.batch_size, self.compile = decode, batch_size, compile  # pt's lens
        noise = get_noise(1, size, size, device=self.device, dtype=self.dtype, seed=0)
        self.inp = prepare(noise, txt, y)
        self.txt_len, self.img_len = self.inp["txt"].shape[1], self.inp["img"].shape[1]
        self.num_steps = num_steps
        self.timesteps = get_schedule(num_steps, self.img_len, shift=spec.shift_schedule)
        self.guidance = spec.default_guidance
        self.plan = CapturePlan.everything(flow, num_steps)
        self.bytes_per_step = self.plan.bytes_per_step(
            1, self.txt_len, self.img_len, flow.hidden_size, self.dtype.itemsize
        )

    def context(self) -> dict[str, Any]:
        inp = self.inp
        return {
            "y": inp["vec"].cpu(),
            "txt": inp["txt"].cpu(),
            "txt_ids": inp["txt_ids"].cpu(),
            "img_ids": inp["img_ids"].cpu(),
            "txt_seq_len": self.txt_len,
            "guidance": self.guidance,
            "timestep_pairs": list(itertools.pairwise(self.timesteps)),
        }

    def metadata(self, fmt: str) -> dict[str, Any]:
        plan, dtype = self.plan, str(self.dtype).removeprefix("torch.")
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.spec.name,
            "width": self.size,
            "height": self.size,
            "num_steps": len(self.timesteps) - 1,
            "timesteps": self.timesteps,
            "guidance": self.guidance,
            "dtype": dtype,
            "capture_dtype": dtype,
            "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
            "captured_steps": list(plan.steps),
            "streams": plan.streams,
            "format": fmt,
        }

    def _sample(self, session: CaptureSession | None = None) -> tuple[Tensor, float]:
        sync(self.device)
        start = time.perf_counter()
        try:
            latent = sample(self.flow, self.inp, self.timesteps, self.guidance, session)  # synchronises
        except BaseException:
            if session is not None:
                session.sink.abort()
            raise
        return latent, time.perf_counter() - start

    # ---- the modes: each returns its timings in seconds (and byte counts)
    def run_off(self) -> dict[str, float]:
        _, seconds = self._sample()
        return {"sample_s": seconds}

    def run_pt(self) -> dict[str, float]:
        return self._run_pt(on_device=None)

    def run_pt_host(self) -> dict[str, float]:
        return self._run_pt(on_device=False)

    def _run_pt(self, on_device: bool | None) -> dict[str, float]:
        path, decoded = self.out / "capture.pt", self.out / "decoded"
        metadata, context = self.metadata("pt"), self.context()
        start = time.perf_counter()  # allocating (pinning) the buffers is part of a run's cost
        session = CaptureSession.open(
            self.flow, self.plan, "pt", path, self.txt_len, self.img_len, self.dtype, metadata,
            self.num_steps, on_device=on_device,
        )  # fmt: skip
        setup_s = time.perf_counter() - start
        saving, hooks = None, time_hooks(session)
        try:
            latent, sample_s = self._sample(session)
            start = time.perf_counter()
            context["final_latent"] = latent.cpu()
            if not self.decode:
                session.sink.finish(context, metadata)
                return {
                    "sample_s": sample_s,
                    "hook_s": hooks[0],
                    "save_s": time.perf_counter() - start,
                    "setup_s": setup_s,
                }
            # As `generate`: the .pt is written by a thread while the lens decodes the capture in memory.
            capture = session.sink.collect(context, metadata)
            writer = ThreadPoolExecutor(1)
            saving = writer.submit(_write_then_time, session.sink, capture)
            writer.shutdown(wait=False)
            report = decode_capture(
                capture, self.flow.final_layer, self.ae, decoded, batch_size=self.batch_size,
                compile=self.compile, progress=False,
            )  # fmt: skip
            # The decoder's set-up counts: after the first run it is no compile but a warm-up batch (and
            # the memory the lens allocates after the emptied caches), which every CLI run pays too.
            lens_s = time.perf_counter() - start
            save_s = saving.result() - start
            del capture
            return {
                "sample_s": sample_s,
                "hook_s": hooks[0],
                "setup_s": setup_s,
                "save_s": save_s,  # from the end of sampling, beside the lens
                "decode_s": report.decode_seconds,  # beside the write, the compile left out
                "lens_s": lens_s,  # the whole lens from the end of sampling: set-up, decode_s, the sheets
                # Both together: the write began with the lens (and the compile), so it counts in full.
                "save_lens_s": max(save_s, lens_s),
                "compile_s": report.compile_seconds,  # the first run's is the one-time compile
                "images": report.n_images,
                "decode_batch": report.batch_size,
            }
        finally:
            if saving is not None:
                saving.exception()  # let the write end before its file is removed
            del session
            remove(path), remove(decoded)

    def run_safetensors(self) -> dict[str, float]:
        path = self.out / "capture_st"
        metadata, context = self.metadata("safetensors"), self.context()
        start = time.perf_counter()  # allocating (pinning) the host buffers is part of a run's cost
        session = CaptureSession.open(
            self.flow,
            self.plan,
            "safetensors",
            path,
            self.txt_len,
            self.img_len,
            self.dtype,
            metadata,
            self.num_steps,
        )
        setup_s = time.perf_counter() - start
        hooks = time_hooks(session)
        try:
            latent, sample_s = self._sample(session)
            start = time.perf_counter()
            context["final_latent"] = latent.cpu()
            session.sink.finish(context, metadata)  # waits for the writer thread to drain
            save_s = time.perf_counter() - start
            # The writer's own time is writing into the page cache; the disk test fsyncs. Flushing what the
            # run left dirty gives the writer's speed to the disk, comparable with the disk's.
            start = time.perf_counter()
            os.sync()
            flush_s = time.perf_counter() - start
            return {
                "sample_s": sample_s,
                "hook_s": hooks[0],
                "save_s": save_s,
                "setup_s": setup_s,
                "write_bytes": session.sink.bytes_written,
                "write_s": session.sink.write_seconds,
                "flush_s": flush_s,
            }
        finally:
            del session
            remove(path)

    def run_naive(self) -> dict[str, float]:
        path, decoded = self.out / "naive_capture.pt", self.out / "naive_decoded"
        capture = NaiveCapture(self.flow)
        inp = self.inp
        sync(self.device)
        start = time.perf_counter()
        with capture:
            latent = denoise(
                self.flow, inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["vec"],
                self.timesteps, self.guidance, before_step=capture.before_step,
            )  # fmt: skip
        sync(self.device)
        result = {"sample_s": time.perf_counter() - start}
        try:
            if self.decode:
                start = time.perf_counter()
                decoded.mkdir()
                result["images"] = capture.decode_all(self, decoded)
                result["decode_s"] = time.perf_counter() - start
            start = time.perf_counter()
            torch.save(capture.as_dict(self.context() | {"final_latent": latent.cpu()}), path)
            result["save_s"] = time.perf_counter() - start
            return result
        finally:
            remove(path), remove(decoded)


class NaiveCapture:
    """The earlier public tool's capture: each hook calls `.cpu()` (a blocking copy) and appends to a list."""

    def __init__(self, flow: Flux):
        self.flow = flow
        self.double: dict[str, list] = {f"block_{i}": [] for i in range(len(flow.double_blocks))}
        self.single: dict[str, list] = {f"block_{i}": [] for i in range(len(flow.single_blocks))}
        self.img_state: list[Tensor] = []
        self.vec: list[Tensor] = []
        self.handles: list = []

    def __enter__(self) -> "NaiveCapture":
        for i, block in enumerate(self.flow.double_blocks):
            store = self.double[f"block_{i}"]
            hook = lambda _m, _a, out, store=store: store.append((out[0].cpu(), out[1].cpu()))
            self.handles.append(block.register_forward_hook(hook))
        for i, block in enumerate(self.flow.single_blocks):
            store = self.single[f"block_{i}"]
            self.handles.append(
                block.register_forward_hook(lambda _m, _a, out, store=store: store.append(out.cpu()))
            )
        vec_hook = lambda _m, args: self.vec.append(args[1].cpu())
        self.handles.append(self.flow.final_layer.register_forward_pre_hook(vec_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def before_step(self, info: StepInfo) -> None:
        self.img_state.append(info.img.cpu())

    @torch.inference_mode()
    def decode_all(self, case: Case, out_dir: Path) -> int:
        """One block output at a time: back to the device, final layer, next-step latent, VAE, JPEG."""
        pairs, device, n = list(itertools.pairwise(case.timesteps)), case.device, 0
        for stream, blocks in (("double", self.double), ("single", self.single)):
            for name, outputs in blocks.items():
                for step, out in enumerate(outputs):
                    h = out[0] if stream == "double" else out[:, case.txt_len :]
                    pred = self.flow.final_layer(h.to(device), self.vec[step].to(device))
                    t_curr, t_prev = pairs[step]
                    latent = self.img_state[step].to(device) + (t_prev - t_curr) * pred
                    image = decode_latents(latent, case.ae, case.size, case.size)
                    pixels = to_uint8(image[0]).cpu().numpy()
                    Image.fromarray(pixels).save(out_dir / f"{stream}_{name}_step_{step}.jpg", quality=95)
                    n += 1
        return n

    def as_dict(self, context: dict) -> dict:
        context = context | {"img_state": self.img_state, "vec": self.vec}
        return {"double_blocks": self.double, "single_blocks": self.single, "denoising_context": context}


def _write_then_time(sink, capture: dict) -> float:
    """Write a collected .pt capture; return when the write ended (perf_counter)."""
    sink.write(capture)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------ report
def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over the measured runs; totals are summed per run before the median."""
    out = {}
    for run in runs:
        after = ("save_lens_s",) if "save_lens_s" in run else ("save_s", "decode_s")  # overlapped or not
        run["total_s"] = sum(run.get(k, 0.0) for k in ("setup_s", "sample_s", *after))
        if "setup_s" in run:  # as a CLI run that pinned its buffers while the models loaded
            run["total_after_setup_s"] = run["total_s"] - run["setup_s"]
        if run.get("write_s"):
            run["write_Bps"] = run["write_bytes"] / run["write_s"]
            run["flushed_Bps"] = run["write_bytes"] / (run["write_s"] + run["flush_s"])
    for key in runs[0]:
        out[key] = statistics.median(run[key] for run in runs)
    return out


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


HEADER = (
    f"{'size':>5} {'mode':<12} {'s/step':>8} {'vs off':>7} {'1st run':>7} {'hooks ms':>8} {'setup s':>7} "
    f"{'save s':>7} {'decode s':>8} {'lens s':>7} {'total s':>8} {'compile s':>9} {'MB/step':>8} "
    f"{'write GB/s':>15} {'flushed':>7} "
    f"{'RSS GB':>7} {'dev GB':>7} {'naive/ours':>10} {'w/o setup':>9}"
)


def table_rows(size: int, results: dict[str, dict], disk_Bps: float) -> list[str]:
    """One line per mode at one size; `vs off` compares sampling times (the median of each round's ratio:
    the runs of a round ran side by side), `naive/ours` whole totals."""
    off, ours = results.get("off"), results.get("pt")
    rows = []
    for mode, r in results.items():
        paired = zip(r["sample_s_runs"], off["sample_s_runs"]) if off else ()
        vs_off = statistics.median(a / b for a, b in paired) if off else None
        first = r["first_sample_s"] / off["sample_s"] if off and "first_sample_s" in r else None
        naive_vs_ours = r["total_s"] / ours["total_s"] if mode == "naive" and ours else None
        after_setup = r["total_s"] / ours["total_after_setup_s"] if mode == "naive" and ours else None
        write = r.get("write_Bps")
        write_txt = "-" if write is None else f"{write / GB:.2f} ({100 * write / disk_Bps:.0f}%)"
        flushed = 100 * r["flushed_Bps"] / disk_Bps if "flushed_Bps" in r else None
        device_gb = r["peak_device"] / GB if "peak_device" in r else None
        mb_step = r["bytes_per_step"] / 1e6 if mode != "off" else None
        hook_ms = 1e3 * r["hook_s"] / r["steps"] if "hook_s" in r else None
        rows.append(
            f"{size:>5} {mode:<12} {r['sample_s'] / r['steps']:>8.4f} {fmt(vs_off, '.2f', 'x'):>7} "
            f"{fmt(first, '.2f', 'x'):>7} {fmt(hook_ms, '.2f'):>8} {fmt(r.get('setup_s'), '.3f'):>7} "
            f"{fmt(r.get('save_s'), '.3f'):>7} {fmt(r.get('decode_s'), '.3f'):>8} "
            f"{fmt(r.get('lens_s'), '.3f'):>7} {r['total_s']:>8.3f} "
            f"{fmt(r.get('compile_s'), '.2f'):>9} {fmt(mb_step, '.1f'):>8} {write_txt:>15} "
            f"{fmt(flushed, '.0f', '%'):>7} "
            f"{r['peak_rss'] / GB:>7.2f} {fmt(device_gb, '.2f'):>7} {fmt(naive_vs_ours, '.2f', 'x'):>10} "
            f"{fmt(after_setup, '.2f', 'x'):>9}"
        )
    return rows


def settle(device: torch.device) -> bool:
    """Before every run: flush the disk's dirty pages, then `reset_peaks` (garbage collected, caches
    emptied, peaks reset), so that no run pays for the writeback, the garbage or the cached memory of the
    one before it (a full collection takes ~0.1 s with torch loaded). Returns reset_peaks' answer."""
    os.sync()
    sync(device)
    return reset_peaks(device)


def measure(
    case: Case,
    modes: list[str],
    warmup: int,
    repeats: int,
    naive_repeats: int | None = None,
    on_run: Callable[[str, dict], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each mode's medians over `repeats` runs (`naive`: `naive_repeats`, default the same) after
    `warmup` runs, with the peaks of its runs. `on_run(mode, figures)` is told each measured run as it ends.

    The warm-ups run mode by mode; the measured runs go round the modes in turn, each round starting one
    mode later, so slow drift of the machine (clocks, other load) and the order itself fall on every mode
    alike instead of on whichever ran last.
    """
    device = case.device
    runs = {mode: getattr(case, f"run_{mode}") for mode in modes}
    if warmup and "off" in modes:
        # A first sampling pays for the process (allocator, kernel selection at this size); thrown away, so
        # that no mode's first run, the "1st run" column's, carries it for the others.
        settle(device)
        runs["off"]()
    warm: dict[str, list[dict]] = {}
    for mode in modes:
        n = warmup
        if mode == "naive" and warmup and case.decode:
            # Its runs are the longest (40 s at 1024 px on an H200) and compile nothing: warm only what
            # it alone uses, the eager decoder at this size, instead of paying a whole run.
            with torch.inference_mode():
                decode_latents(torch.zeros_like(case.inp["img"]), case.ae, case.size, case.size)
            n = 0
        warm[mode] = []
        for _ in range(n):
            settle(device)  # empty caches: the first run is a cold one, as in a one-shot CLI run
            warm[mode].append(runs[mode]())
    measured: dict[str, list[dict]] = {mode: [] for mode in modes}
    peaks: dict[str, dict[str, int]] = {mode: {"peak_rss": 0, "peak_device": 0} for mode in modes}
    rss_reset = True
    naive_repeats = repeats if naive_repeats is None else naive_repeats
    for round_ in range(repeats):
        for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:  # each round starts anew
            if mode == "naive" and round_ >= naive_repeats:
                continue
            rss_reset = settle(device) and rss_reset
            measured[mode].append(runs[mode]())
            if on_run is not None:
                on_run(mode, dict(measured[mode][-1]))
            peaks[mode]["peak_rss"] = max(peaks[mode]["peak_rss"], peak_rss())
            if device.type == "cuda":
                peaks[mode]["peak_device"] = max(
                    peaks[mode]["peak_device"], torch.cuda.max_memory_allocated(device)
                )
    results = {}
    for mode in modes:
        r = summarise(measured[mode])
        r.update(steps=len(case.timesteps) - 1, bytes_per_step=case.bytes_per_step, **peaks[mode])
        if device.type != "cuda":
            del r["peak_device"]
        r["peak_rss_per_mode"] = rss_reset  # False: the process's peak so far, earlier modes included
        r["sample_s_runs"] = [x["sample_s"] for x in measured[mode]]  # the spread behind the median
        if warm[mode]:  # what one run in a fresh process pays: pinned buffers allocated, nothing cached
            r["first_sample_s"] = warm[mode][0]["sample_s"]
        # The one-time cost is the first run's: later runs reuse the compiled decoder.
        compiles = [x.get("compile_s", 0.0) for x in warm[mode]] + [r.get("compile_s", 0.0)]
        r["compile_s"] = max(compiles) or None
        results[mode] = r
    return results


# -------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: flux-tiny on CPU, flux-schnell on CUDA")
    parser.add_argument(
        "--random_weights",
        action="store_true",
        help="random weights built on the device (no download); without it, the real weights are loaded",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square sizes in pixels (default: 256 512 1024 on CUDA, 128 on CPU)",
    )
    parser.add_argument("--num_steps", type=int, default=None, help="default: the model's default")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated, from {','.join(MODES)} (default: all; on the CPU {','.join(CPU_MODES)})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="measured runs (default: 3 CUDA, 1 CPU)")
    parser.add_argument(
        "--naive_repeats",
        type=int,
        default=None,
        help="measured runs of naive, the slowest and steadiest mode (default: --repeats)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs before them")
    parser.add_argument("--quick", action="store_true", help="repeats=1, warmup=1: a time-boxed GPU run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on CPU, steadier on a shared machine; torch's own on CUDA)",
    )
    parser.add_argument(
        "--output_dir", default=None, help="where a temporary folder is made, deleted after (default: /tmp)"
    )
    parser.add_argument("--no_compile", action="store_true", help="pt's lens without torch.compile")
    parser.add_argument("--skip_decode", action="store_true", help="measure capture and save only")
    parser.add_argument("--disk_test_mb", type=int, default=None, help="default: 1024 on CUDA, 128 on CPU")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but no CUDA GPU is visible")
    args.model = args.model or ("flux-schnell" if cuda else "flux-tiny")
    args.sizes = args.sizes or ([256, 512, 1024] if cuda else [128])  # CPU: under a minute on 2 cores
    args.repeats = args.repeats or (3 if cuda else 1)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    args.disk_test_mb = args.disk_test_mb or (1024 if cuda else 128)
    args.modes = args.modes or ",".join(MODES if cuda else CPU_MODES)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(args.modes) - set(MODES)):
        parser.error(f"unknown --modes {unknown}; choose from {', '.join(MODES)}")
    if bad := [s for s in args.sizes if s <= 0 or s % 16]:
        parser.error(f"--sizes must be positive multiples of 16; got {bad}")
    if args.naive_repeats is not None:
        args.naive_repeats = min(args.naive_repeats, args.repeats)
    if args.repeats < 1 or args.warmup < 0 or (args.naive_repeats is not None and args.naive_repeats < 1):
        parser.error("--repeats and --naive_repeats must be >= 1 and --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    if args.threads or torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
    spec = get_spec(args.model)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    dtype = compute_dtype(spec)
    num_steps = args.num_steps or spec.default_steps

    start = time.perf_counter()
    flow, ae = build_models(spec, device, dtype, args.random_weights)
    sync(device)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    txt = torch.randn(1, spec.t5_max_length, spec.params.context_in_dim, generator=gen).to(device, dtype)
    y = torch.randn(1, spec.params.vec_in_dim, generator=gen).to(device, dtype)

    # A folder of this run's own, also under --output_dir: a run killed by `timeout` skips its clean-up, and
    # its leftovers (capture_st/, naive_decoded/) must not be in the next run's way.
    if args.output_dir is not None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench_capture_", dir=args.output_dir))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} thread(s))"
    weights = "random weights" if args.random_weights else "real weights"
    info = {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": spec.name,
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": num_steps,
        "txt_tokens": spec.t5_max_length,
        "repeats": args.repeats,
        "naive_repeats": args.naive_repeats or args.repeats,
        "warmup": args.warmup,
        "model_build_s": build_s,
        "results": [],
        "runs": [],  # every measured run as it ends: what a run cut short (timeout -s INT) still has
    }
    print(
        f"capture benchmark: {spec.name} ({weights}, {info['dtype']}), {num_steps} steps, "
        f"{spec.t5_max_length} text tokens, on {name}, torch {torch.__version__}",
        flush=True,
    )
    print(f"model built in {build_s:.1f} s; writing under {out}", flush=True)
    try:
        disk_Bps = disk_write_speed(out, args.disk_test_mb << 20)
        info["disk_write_Bps"] = disk_Bps
        print(f"disk sequential write ({args.disk_test_mb} MiB, buffered + fsync): {disk_Bps / GB:.2f} GB/s")
        what = "capture + save" if args.skip_decode else "capture + save + lens"
        naive_runs = args.naive_repeats or args.repeats
        naive_note = f" (naive: {naive_runs})" if "naive" in args.modes and naive_runs != args.repeats else ""
        rss_resets = reset_peaks(device)
        print(
            f"medians of {args.repeats} run(s){naive_note} after {args.warmup} warm-up(s), the modes taken "
            "in turn\n"
            "vs off: sampling time over that with capture off (median of each round's ratio); 1st run: the\n"
            "same for the first (warm-up) run of the mode (cold caches, as in a one-shot CLI run)\n"
            "hooks ms: CPU time per step in the capture hooks (what capture adds where launching kernels\n"
            "is the bottleneck, as at 256 and 512 px on a GPU)\n"
            "setup s: allocating the buffers and pinning host ones (emptied caches, as in a one-shot run;\n"
            "the CLI pins host buffers while the models load)\n"
            "decode s: the lens's decoding; lens s: the whole lens after sampling (the decoder's set-up,\n"
            "a warm-up batch after the first run, and the contact sheets included), beside the .pt's write\n"
            f"total: setup + {what} in seconds, the first run's one-time compile (compile s) left out\n"
            "write GB/s: the safetensors writer into the page cache, in percent of the disk's fsync'd speed\n"
            "flushed: the same with the run's dirty pages flushed (os.sync), like for like (target >= 80%)\n"
            "naive/ours: total of naive over total of pt; w/o setup: the same, pt's setup left out (the\n"
            "CLI pins host buffers while the models load)\n"
            + ("" if rss_resets else "RSS GB: the process's peak so far (this system cannot reset it)\n")
        )
        print(HEADER)
        print("-" * len(HEADER), flush=True)
        for size in args.sizes:
            # The lens compiled on CUDA (the issue's targets assume a cached compiled decoder), with the
            # batch fixed per size so every run reuses one compiled shape.
            compile = device.type == "cuda" and not args.no_compile
            batch_size = None
            if {"pt", "pt_host"} & set(args.modes) and not args.skip_decode:
                batch_size = auto_batch_size(ae.params, size, size, device)
                if device.type == "cuda":  # as decode_capture's default
                    batch_size = stable_batch_size(ae.params, size, size, batch_size)
            case = Case(
                flow, ae, spec, txt, y, size, num_steps, out, decode=not args.skip_decode,
                batch_size=batch_size, compile=compile,
            )  # fmt: skip

            def record(mode: str, run: dict, size: int = size) -> None:
                info["runs"].append({"size": size, "mode": mode, **run})
                if args.json:
                    Path(args.json).write_text(json.dumps(info, indent=2) + "\n")

            results = measure(case, args.modes, args.warmup, args.repeats, args.naive_repeats, record)
            info["results"] += [{"size": size, "mode": mode, **r} for mode, r in results.items()]
            if args.json:  # after every size, so a run cut short still leaves its figures
                Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
            print("\n".join(table_rows(size, results, disk_Bps)), flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
