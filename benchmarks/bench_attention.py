"""What measuring attention maps costs: seconds per replayed step with and without them, and device memory.

    uv run python benchmarks/bench_attention.py                        # flux-tiny, CPU, 64 px, seconds
    uv run python benchmarks/bench_attention.py --model flux-schnell --random_weights --sizes 256 1024

Replays a synthetic capture (random noise, random T5 and CLIP embeddings of the right shapes: speed does not
depend on their values) with `flux.interventions.replay`, first plainly, then through
`flux.attention.attention_maps` at every block and step for `--tokens` text positions, and prints for each
size: seconds per step of each (medians of `--repeats` runs after a warm-up), their ratio, the time per
measured block, and the peak device memory above the model's (CUDA).
"""

import argparse
import functools
import itertools
import statistics
import time

import torch
from bench_capture import build_models, sync

from flux.attention import attention_maps
from flux.configs import get_spec
from flux.interventions import replay
from flux.sampling import get_noise, get_schedule, prepare


def synthetic_capture(spec, size: int, steps: int, n_tokens: int, device, dtype) -> dict:
    """The denoising context a replay reads (as a capture stores it), from random embeddings."""
    gen = torch.Generator().manual_seed(0)
    txt = torch.randn(1, spec.t5_max_length, spec.params.context_in_dim, generator=gen).to(device, dtype)
    y = torch.randn(1, spec.params.vec_in_dim, generator=gen).to(device, dtype)
    inp = prepare(get_noise(1, size, size, device=device, dtype=dtype, seed=0), txt, y)
    times = get_schedule(steps, inp["img"].shape[1], shift=spec.shift_schedule)
    ctx = {
        "img_state": [inp["img"]],
        "txt": inp["txt"],
        "txt_ids": inp["txt_ids"],
        "img_ids": inp["img_ids"],
        "y": inp["vec"],
        "guidance": spec.default_guidance,
        "txt_seq_len": inp["txt"].shape[1],
        "timestep_pairs": list(itertools.pairwise(times)),
    }
    meta = {
        "height": size,
        "width": size,
        "num_steps": steps,
        "t5_tokens": [f"t{i}" for i in range(n_tokens)],
    }
    return {"denoising_context": ctx, "metadata": meta}


def timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="flux-tiny", help="flux-tiny, or a full-size model with --random_weights"
    )
    parser.add_argument("--random_weights", action="store_true", help="required for full-size models")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sizes in pixels")
    parser.add_argument("--steps", type=int, default=2, help="steps replayed per run")
    parser.add_argument("--tokens", type=int, default=8, help="text positions measured")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each mode, after a warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    spec = get_spec(args.model)
    if spec.name != "flux-tiny" and not args.random_weights:
        parser.error("full-size models need --random_weights (this benchmark never downloads weights)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = args.sizes or ([256, 512, 1024] if cuda else [64])
    flow, _ = build_models(spec, device, dtype, random_weights=True)
    blocks = len(flow.double_blocks) + len(flow.single_blocks)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"attention benchmark: {spec.name}, random weights, {dtype}, on {name}, torch {torch.__version__}")
    print(
        f"{args.steps} step{'s' * (args.steps != 1)} replayed per run, all {blocks} blocks, {args.tokens} "
        "text positions; "
        f"medians of {args.repeats} runs\n"
    )
    header = f"{'size':>6} {'replay s/step':>13} {'with maps s/step':>16} {'ratio':>6} {'ms/block':>8}"
    if cuda:
        header += f" {'peak GB':>9} {'with maps':>9}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        capture = synthetic_capture(spec, size, args.steps, args.tokens, device, dtype)
        with torch.inference_mode():
            plain, measured, peaks = [], [], {}
            for run in range(args.repeats + 1):  # the first of each is a warm-up
                for mode, fn in (("plain", replay), ("maps", attention_maps)):
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    seconds = timed(device, functools.partial(fn, flow, capture))
                    if cuda:
                        peaks[mode] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
                    if run:
                        (plain if mode == "plain" else measured).append(seconds / args.steps)
        p, m = statistics.median(plain), statistics.median(measured)
        row = f"{size:>6} {p:>13.4g} {m:>16.4g} {m / p:>6.2f} {1e3 * (m - p) / blocks:>8.2f}"
        if cuda:  # above the model's own memory: the replay's activations, then with the maps' scores
            row += f" {peaks['plain']:>9.2f} {peaks['maps']:>9.2f}"
        print(row)


if __name__ == "__main__":
    main()
