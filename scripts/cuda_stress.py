"""Provoke the races the CUDA capture path must be free of, and check every captured tensor.

scripts/cuda_checks.py compares the capture with hooks that call `.cpu()`, in the same run: those host syncs
would hide a copy that does not wait for its block, or a block output freed before its copy has read it. Here
the reference comes from a separate run, and the capture run is made hostile:

- `compute_slow`: every block is delayed on the compute stream (`torch.cuda._sleep`), so a copy that did not
  wait for its block would read an unfinished output;
- `copy_slow`: every copy is delayed on the copy stream after it has waited, so an output whose memory was
  not protected by `record_stream` would be overwritten by later blocks before the copy reads it;
- two pinned buffer sets and a slow disk, so sets are recycled while copies land (counted, not assumed).

As a consistency check of the `.pt` paths (not a race: sampling has synchronised by then), the lens of the
in-memory `.pt` (in pinned host buffers, or on the GPU), read while `torch.save` writes it in a thread, must
give the same JPEGs as the lens of the same capture read back from disk.

Every captured tensor (double img/txt, single, vec, pred, img_state at every step) must equal the reference.

    python3 scripts/cuda_stress.py                  # on the GPU; exits non-zero if a check fails
    python3 scripts/cuda_stress.py --break wait     # negative controls: the capture is broken on purpose
    python3 scripts/cuda_stress.py --break record   #   (copies not waiting / no record_stream): must FAIL
    python3 scripts/cuda_stress.py --device cpu --size 128   # the plumbing only: nothing is asynchronous
"""

import argparse
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flux.pipeline
import flux.store
from flux.capture import BlockCapture, CapturePlan
from flux.configs import CONFIGS
from flux.decode import decode_capture
from flux.loading import load_ae, load_flow_model
from flux.model import Flux
from flux.pipeline import CaptureSession, sample
from flux.sampling import StepInfo, denoise, get_noise, get_schedule, prepare
from flux.store import load_capture

STEPS, GUIDANCE = 8, 3.5
SLEEP_CYCLES = 2_000_000  # about 1 ms of GPU time


def reference(flow: Flux, inp: dict, timesteps: list[float]) -> tuple[dict, torch.Tensor]:
    """{(step, key): tensor} of everything a capture records, copied synchronously, and the final latent."""
    ref, step = {}, [0]

    def keep(key: str, value: torch.Tensor) -> None:
        ref[step[0], key] = value.cpu()

    hooks = [flow.final_layer.register_forward_pre_hook(lambda m, args: keep("vec", args[1]))]
    hooks.append(flow.final_layer.register_forward_hook(lambda m, a, out: keep("pred", out)))
    for i, block in enumerate(flow.double_blocks):

        def both(m, a, out, i=i) -> None:  # a hook must return None, or it replaces the output
            keep(f"double_blocks.{i}.img", out[0])
            keep(f"double_blocks.{i}.txt", out[1])

        hooks.append(block.register_forward_hook(both))
    for i, block in enumerate(flow.single_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: keep(f"single_blocks.{i}", out)))

    def before(info: StepInfo) -> None:
        step[0] = info.index
        keep("img_state", info.img)

    try:
        latent = denoise(
            flow, inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["vec"], timesteps, GUIDANCE,
            before_step=before,
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    return ref, latent


def captured(capture: dict, step: int, key: str) -> torch.Tensor:
    """The capture's tensor for a reference key such as `double_blocks.3.img` or `pred`."""
    parts = key.split(".")
    if parts[0] == "double_blocks":
        return capture["double_blocks"][f"block_{parts[1]}"][step][0 if parts[2] == "img" else 1]
    if parts[0] == "single_blocks":
        return capture["single_blocks"][f"block_{parts[1]}"][step]
    return capture["denoising_context"][key][step]


def make_hostile(flow: Flux, mode: dict, broken: str | None) -> None:
    """Delays on the compute stream (before every block) or the copy stream (before every copy), switched
    by mode["now"]; two pinned sets and a slow disk; and, for a negative control, a capture whose copies do
    not wait for their block (Stream.wait_event made a no-op) or without record_stream."""
    for block in [*flow.double_blocks, *flow.single_blocks, flow.final_layer]:
        block.register_forward_pre_hook(
            lambda m, a: torch.cuda._sleep(SLEEP_CYCLES) if mode["now"] == "compute_slow" else None
        )
    copy = BlockCapture._copy

    def slow_copy(self: BlockCapture, *items: tuple[str, torch.Tensor]) -> None:
        device = items[0][1].device
        if mode["now"] == "copy_slow" and device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self._stream):
                torch.cuda._sleep(4 * SLEEP_CYCLES)
        copy(self, *items)

    BlockCapture._copy = slow_copy
    if broken == "wait":  # the capture's copies then start without waiting for their block
        torch.cuda.Stream.wait_event = lambda self, event: None
    elif broken == "record":
        torch.Tensor.record_stream = lambda self, stream: None
    flux.pipeline.STREAMING_MAX_SETS = 2
    save_file = flux.store.save_file
    flux.store.save_file = lambda tensors, path: (time.sleep(0.05), save_file(tensors, path))[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--size", type=int, default=512, help="image side in pixels (default 512: 1,024 image tokens)"
    )
    parser.add_argument("--break", dest="broken", choices=["wait", "record"], help="a negative control")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.broken and not cuda:
        parser.error("--break needs CUDA: on the CPU nothing is asynchronous, so nothing could catch it")
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    dtype, spec = torch.bfloat16, CONFIGS["flux-tiny"]
    flow, ae = load_flow_model(spec, device, dtype), load_ae(spec, device)
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, spec.t5_max_length, spec.params.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, spec.params.vec_in_dim, generator=g).to(device, dtype)
    inp = prepare(get_noise(1, args.size, args.size, device, dtype, seed=1), txt, y)
    timesteps = get_schedule(STEPS, inp["img"].shape[1])
    T, L = txt.shape[1], inp["img"].shape[1]
    ref, plain = reference(flow, inp, timesteps)

    mode = {"now": None}
    if cuda:
        make_hostile(flow, mode, args.broken)
    else:
        flux.pipeline.STREAMING_MAX_SETS = 2
    failures = 0

    def report(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} [{where}] {name}{f' ({detail})' if detail else ''}", flush=True)

    # (format, provocation, buffers on the GPU): a .pt in pinned host buffers and on the GPU, where the
    # write's host copies run on a side stream beside the lens
    passes = [
        ("safetensors", "compute_slow", False),
        ("safetensors", "copy_slow", False),
        ("pt", "copy_slow", False),
        ("pt", "compute_slow", True),
    ]
    if not cuda:
        passes = [("safetensors", None, False), ("pt", None, False)]
    with tempfile.TemporaryDirectory() as tmp:
        lens = {}
        for n, (fmt, provocation, on_device) in enumerate(passes):
            mode["now"] = provocation
            label = f"{fmt}{' on the GPU' * on_device}, {provocation or 'no delays'}"
            plan = CapturePlan.everything(flow, STEPS)
            meta = {
                "captured_steps": list(plan.steps),
                "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
                "height": args.size,
                "width": args.size,
                "streams": "both",
            }
            path = Path(tmp) / (f"capture_{n}" if fmt == "safetensors" else f"capture_{n}.pt")
            session = CaptureSession.open(
                flow, plan, fmt, path, T, L, dtype, meta, STEPS, device, on_device=on_device
            )
            if cuda and fmt == "pt":
                where_ok = (session.capture.pool.device is not None) == on_device
                report(f"{label}: the buffers are where they were asked to be", where_ok)
            pool, acquired, most_sets = session.capture.pool, [], [0]
            acquire = pool.acquire

            def counted(captured: bool = True, pool=pool, acquire=acquire, acquired=acquired, most=most_sets):
                tensors = acquire(captured)
                acquired.append(captured)
                most[0] = max(most[0], pool.allocated)
                return tensors

            pool.acquire = counted
            latent = sample(flow, inp, timesteps, GUIDANCE, session)
            if fmt == "safetensors":
                steps = sum(acquired)
                report(
                    f"{label}: buffer sets were reused while copies landed",
                    steps == STEPS and most_sets[0] < steps,
                    f"{steps} steps in {most_sets[0]} sets",
                )
            context = {
                "txt_seq_len": T,
                "final_latent": latent.cpu(),
                "timestep_pairs": list(itertools.pairwise(timesteps)),
            }
            report(f"{label}: capture does not change the result", torch.equal(latent, plain))
            if fmt == "pt":  # the lens reads the buffers while torch.save writes them
                in_memory = session.sink.collect(context, meta)
                writer = threading.Thread(target=session.sink.write, args=(in_memory,))
                writer.start()
                lens[label] = Path(tmp) / f"lens_memory_{n}"
                decode_capture(in_memory, flow.final_layer, ae, lens[label], device=device, progress=False)
                writer.join()
                mode["now"] = None
            else:
                session.sink.finish(context, meta)
            capture = load_capture(path)
            wrong = [
                f"step {k} {key}"
                for (k, key), want in ref.items()
                if not torch.equal(captured(capture, k, key), want)
            ]
            report(
                f"{label}: every captured tensor equals the synchronous reference",
                not wrong,
                f"{len(wrong)} of {len(ref)} differ, e.g. {wrong[:3]}" if wrong else f"{len(ref)} tensors",
            )
            if fmt == "safetensors" and "from disk" not in lens:
                lens["from disk"] = Path(tmp) / "lens_disk"
                decode_capture(
                    capture, flow.final_layer, ae, lens["from disk"], device=device, progress=False
                )
        b = lens.pop("from disk")
        for label, a in lens.items():
            names = sorted(p.name for p in a.glob("*_block_*.jpg"))
            same = bool(names) and all((a / name).read_bytes() == (b / name).read_bytes() for name in names)
            report(
                f"{label}: the lens of the in-memory .pt (read beside torch.save) equals the lens from disk",
                same,
                f"{len(names)} files",
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
