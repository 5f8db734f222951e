"""What pinning a `.pt` capture's host buffers costs, with each of torch's two ways of pinning, and whether
pinning in a background thread slows a sampler that is bound by launching kernels.

    uv run python benchmarks/bench_pinning.py                  # on a GPU: flux-schnell, 256 512 1024 px
    uv run python benchmarks/bench_pinning.py --sizes 256 --steps 4 --modes alloc register8

The `.pt` path allocates every captured step's host buffers before sampling (pinned, so the hooks' copies
run beside the next blocks). On an H200 that took 0.50 s at 256 px and 2.61 s at 1024 px for flux-schnell,
a third of the run at 256 px. This measures the candidates for doing better, each in a fresh process (the
allocator's settings and its cache are per process):

    alloc        torch's default: cudaHostAlloc per buffer
    registerN    `pinned_use_cuda_host_register` with N threads (a power of two up to 128): malloc'd memory
                 whose pages N threads map first, then cudaHostRegister (made to avoid cudaHostAlloc's
                 long-held lock)

Either way torch's pinned allocator rounds each buffer up to a power of two first (the pinned GB column).

For each size: the bytes pinned (the allocator's own count where torch reports it), the seconds to pin the
whole capture and to give it back, and two workloads timed alone and while another thread pins the same
buffers (with the pinning's own time beside each): a launch-bound loop of small kernels (as the sampler is
at 256 and 512 px) and 64 MB copies from pageable host memory to the device (as loading a checkpoint's
tensors is). `capture_sample.py` pins while the models load: the second says what that costs the loading;
the first whether pinning beside the first steps could be free too. Both are medians; what slows a
workload beside the pinning may be the driver's lock or the pinning thread holding Python's GIL, which the
CLI's loading would meet alike. On a CPU there is
nothing to pin: the script runs its bookkeeping on pageable memory and says so.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("alloc", "register8", "register16")
LAUNCHES = 3000  # kernels in the launch-bound loop: a few milliseconds of launches
LOAD_BYTES = 64 << 20  # one pageable host-to-device copy, as of a checkpoint tensor while loading


def allocator_conf(mode: str) -> str:
    """The allocator options of a mode ("" for torch's default)."""
    if mode == "alloc":
        return ""
    threads = int(n) if (n := mode.removeprefix("register")).isdigit() and mode.startswith("register") else 0
    if 0 < threads <= 128 and threads & (threads - 1) == 0:  # torch accepts powers of two only
        return f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    raise ValueError(f"unknown mode {mode!r}: alloc, or registerN with N threads, a power of two up to 128")


# ------------------------------------------------------------------------------------- one process
def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def pin(shapes: dict, dtypes: dict, steps: int, cuda: bool):
    """(the pool of `steps` full buffer sets, pinned on CUDA; seconds it took)."""
    from flux.capture import BufferPool

    start = time.perf_counter()
    pool = BufferPool(shapes, dtypes, pin=cuda)
    pool.preallocate(full=steps)
    return pool, time.perf_counter() - start


def free(pool) -> float:
    """Seconds to give a pool's memory back to the system (so the next pinning starts from nothing)."""
    from flux.pipeline import _free_pinned_memory

    start = time.perf_counter()
    pool.drain()
    del pool
    _free_pinned_memory()
    return time.perf_counter() - start


def launches(x, cuda: bool) -> float:
    """Seconds per kernel of a loop of small kernels (bound by launching them, not by the GPU)."""
    import torch

    y = x
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(LAUNCHES):
        y = y * 1.0001
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / LAUNCHES


def load_chunk(host, device_buffer, cuda: bool) -> float:
    """Seconds to copy a pageable host tensor to the device, as loading a checkpoint's tensor does."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    device_buffer.copy_(host)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_size(flow, spec, size: int, steps: int, x, host, x_load, cuda: bool) -> dict:
    import torch

    from flux.capture import BlockCapture, CapturePlan
    from flux.pipeline import compute_dtype
    from flux.sampling import latent_size

    h, w = latent_size(size, size)
    plan = CapturePlan.everything(flow, steps)
    dtype = compute_dtype(spec)
    shapes, dtypes = BlockCapture.shapes_for(flow, plan, 1, spec.t5_max_length, h * w // 4, dtype)
    nbytes = sum(torch.Size(s).numel() * dtypes[k].itemsize for k, s in shapes.items()) * steps
    stats = getattr(torch.cuda, "host_memory_stats", None) if cuda else None

    def beside_pinning(work) -> tuple[float, float]:
        """(median seconds of `work()`, run over and over while another thread pins the buffers; the
        pinning's seconds)."""
        times, result = [], {}
        thread = threading.Thread(
            target=lambda: result.update(zip(("pool", "s"), pin(shapes, dtypes, steps, cuda)))
        )
        thread.start()
        while thread.is_alive() or not times:
            times.append(work())
        thread.join()
        free(result.pop("pool"))
        return median(times), result["s"]

    launch = lambda: launches(x, cuda)
    load = lambda: load_chunk(host, x_load, cuda)
    launch(), load()  # warm
    # The median, as beside_pinning takes: a minimum against a median would show a slowdown that is none.
    launch_alone, load_alone = median([launch() for _ in range(9)]), median([load() for _ in range(9)])
    pool, pin_s = pin(shapes, dtypes, steps, cuda)
    held = stats().get("allocated_bytes.current") if stats is not None else None
    free_s = free(pool)
    launch_beside, pin_beside_launches = beside_pinning(launch)
    load_beside, pin_beside_loads = beside_pinning(load)
    return {
        "size": size,
        "captured_bytes": nbytes,
        "pinned_bytes": held,
        "pin_s": pin_s,
        "free_s": free_s,
        "launch_us": launch_alone * 1e6,
        "launch_us_beside_pinning": launch_beside * 1e6,
        "pin_s_beside_launches": pin_beside_launches,
        "load_Bps": host.numel() / load_alone,
        "load_Bps_beside_pinning": host.numel() / load_beside,
        "pin_s_beside_loads": pin_beside_loads,
    }


def child(model: str, sizes: list[int], steps: int) -> list[dict]:
    """Measure every size in this process (its allocator settings come from the environment)."""
    import torch

    from flux.configs import get_spec
    from flux.model import Flux

    cuda = torch.cuda.is_available()
    spec = get_spec(model)
    with torch.device("meta"):
        flow = Flux(spec.params)
    device = "cuda" if cuda else "cpu"
    x = torch.ones(64, 64, device=device)
    host = torch.ones(LOAD_BYTES, dtype=torch.uint8)  # pageable, as a checkpoint's tensors are
    x_load = torch.empty(LOAD_BYTES, dtype=torch.uint8, device=device)
    torch.empty(1, pin_memory=cuda)  # the CUDA context and the host allocator, outside the timings
    return [measure_size(flow, spec, size, steps, x, host, x_load, cuda) for size in sizes]


# --------------------------------------------------------------------------------------- the report
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="flux-schnell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--steps", type=int, default=4, help="captured steps (flux-schnell's 4 by default)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="alloc and/or registerN")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one mode, in its own process
    args = parser.parse_args()
    if bad := [s for s in args.sizes if s <= 0 or s % 16]:
        parser.error(f"--sizes must be positive multiples of 16; got {bad}")
    for mode in args.modes:
        try:
            allocator_conf(mode)
        except ValueError as e:
            parser.error(str(e))
    if args.child is not None:
        print(json.dumps(child(args.model, args.sizes, args.steps)))
        return

    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU: nothing is pinned"
    print(f"pinning a {args.model} capture of {args.steps} steps, on {where}, torch {torch.__version__}")
    header = (
        f"{'size':>5} {'mode':<11} {'captured GB':>11} {'pinned GB':>9} {'pin s':>7} {'GB/s':>6} "
        f"{'free s':>7} {'launch us':>9} {'beside pin':>10} {'pin s':>6} {'load GB/s':>9} {'beside pin':>10} "
        f"{'pin s':>6}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    results, failed = [], []
    for mode in args.modes:
        env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        # Exactly this mode's settings, under both names torch reads (PYTORCH_ALLOC_CONF is the newer).
        for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            env.pop(name, None)
            if conf := allocator_conf(mode):
                env[name] = conf
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
        ]
        done = subprocess.run(
            [*command, "--sizes", *map(str, args.sizes)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}", flush=True)
            failed.append(mode)
            continue
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            row["mode"] = mode
            results.append(row)
            pinned = f"{row['pinned_bytes'] / 1e9:9.2f}" if row["pinned_bytes"] is not None else f"{'-':>9}"
            print(
                f"{row['size']:>5} {mode:<11} {row['captured_bytes'] / 1e9:>11.2f} {pinned} "
                f"{row['pin_s']:>7.3f} {row['captured_bytes'] / 1e9 / max(row['pin_s'], 1e-9):>6.1f} "
                f"{row['free_s']:>7.3f} {row['launch_us']:>9.1f} {row['launch_us_beside_pinning']:>10.1f} "
                f"{row['pin_s_beside_launches']:>6.2f} {row['load_Bps'] / 1e9:>9.2f} "
                f"{row['load_Bps_beside_pinning'] / 1e9:>10.2f} {row['pin_s_beside_loads']:>6.2f}",
                flush=True,
            )
        if args.json:  # after every mode, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"device": where, "results": results}, indent=2) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
