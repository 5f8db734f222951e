"""Seconds to write a `.pt` capture: torch.save computing the zip records' CRC32s inline, against ours.

    uv run python benchmarks/bench_save.py                  # 512 MB in 3 MB tensors, like 256 px captures
    uv run python benchmarks/bench_save.py --mb 2048 --tensor_mb 26 --repeats 5

torch.save computes each record's CRC32 inline on one thread; `flux.torchsave.torch_save` writes without them
(torch >= 2.6 can) and fills them in afterwards from the page cache on several threads, giving the same file.
Modes, taken in turn round after round, each after the previous file is deleted and the disk's dirty pages
flushed:

    inline     torch.save with its own CRC32s (what torch_save did before, and still does on older torch)
    ours       flux.torchsave.torch_save
    no_crc     torch.save without CRC32s: the floor (zip tools reject such a file; not something we write)

Printed: median seconds and GB/s per mode, and each mode's speed against `inline`. A CPU benchmark: it runs
the same on any machine; the gain grows with the cores that compute the CRC32s.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flux.torchsave import _crc_config, torch_save

MODES = ("inline", "ours", "no_crc")


def save_inline(obj, path: Path, crc: bool) -> None:
    config = _crc_config()
    if config is not None:
        before, config.compute_crc32 = config.compute_crc32, crc
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    finally:
        if config is not None:
            config.compute_crc32 = before


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=512, help="megabytes of tensors to save")
    parser.add_argument(
        "--tensor_mb", type=float, default=3.0, help="megabytes per tensor (a 256 px block: 3)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=None, help="default: a temporary folder, deleted after")
    args = parser.parse_args()
    if args.mb <= 0 or args.tensor_mb <= 0 or args.repeats < 1:
        parser.error("--mb, --tensor_mb and --repeats must be positive")
    modes = MODES if _crc_config() is not None else ("inline", "ours")  # older torch: ours = inline
    numel = max(1, int(args.tensor_mb * 1e6) // 2)
    n = max(1, int(args.mb * 1e6) // (2 * numel))
    gen = torch.Generator().manual_seed(0)
    obj = {"single_blocks": {f"block_{i}": [torch.randn(numel, generator=gen).bfloat16()] for i in range(n)}}
    nbytes = 2 * numel * n
    print(
        f"saving {nbytes / 1e9:.2f} GB in {n} tensors, torch {torch.__version__}, {os.cpu_count()} CPU(s)"
        + ("" if len(modes) == 3 else " (this torch cannot leave the CRC32s out: ours is torch.save)")
    )
    with tempfile.TemporaryDirectory(dir=args.output_dir) as folder:
        path, times = Path(folder) / "capture.pt", {mode: [] for mode in modes}
        for round_ in range(args.repeats + 1):  # the first round warms the page cache's allocation up
            for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                path.unlink(missing_ok=True)
                os.sync()
                start = time.perf_counter()
                if mode == "ours":
                    torch_save(obj, path)
                else:
                    save_inline(obj, path, crc=mode == "inline")
                if round_:
                    times[mode].append(time.perf_counter() - start)
    inline = statistics.median(times["inline"])
    print(f"{'mode':<8} {'s':>7} {'GB/s':>6} {'vs inline':>9}")
    for mode in modes:
        seconds = statistics.median(times[mode])
        print(f"{mode:<8} {seconds:>7.3f} {nbytes / 1e9 / seconds:>6.2f} {inline / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
