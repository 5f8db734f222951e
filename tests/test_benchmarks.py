"""The benchmarks run end to end on flux-tiny (CPU), so a GPU session never spends its minutes on a crash.

They assert nothing about speed (that is their output, not a test); these tests check that every mode runs,
the random-weights path the GPU run uses works, the report's bookkeeping adds up and no file is left behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bench_capture_runs_every_mode_with_random_weights(tmp_path):
    report, work = tmp_path / "capture.json", tmp_path / "work"
    args = ["--repeats", "2", "--naive_repeats", "1", "--sizes", "64", "--random_weights"]
    args += ["--json", str(report), "--output_dir", str(work), "--modes", "off,pt,pt_host,safetensors,naive"]
    # What a run killed by `timeout` leaves behind (it skips its clean-up) is not in the next run's way.
    leftovers = work / "bench_capture_killed"
    for name in ("capture_st", "naive_decoded", "decoded"):
        (leftovers / name).mkdir(parents=True)
    printed = run("benchmarks/bench_capture.py", *args)
    data = json.loads(report.read_text())
    assert data["model"] == "flux-tiny" and data["weights"] == "random weights" and data["steps"] == 4
    rows = {r["mode"]: r for r in data["results"]}
    modes = {"off", "pt", "pt_host", "safetensors", "naive"}
    assert set(rows) == modes and all(r["size"] == 64 for r in rows.values())
    pt, st, naive = rows["pt"], rows["safetensors"], rows["naive"]
    # Two measured runs of each mode and one of naive (the slowest), after the warm-ups.
    assert data["repeats"] == 2 and data["naive_repeats"] == 1
    assert {m: len(rows[m]["sample_s_runs"]) for m in modes} == {**dict.fromkeys(modes, 2), "naive": 1}
    assert rows["pt_host"]["images"] == pt["images"]  # the same path, its buffers in host memory
    assert rows["off"]["sample_s"] == pytest.approx(sum(rows["off"]["sample_s_runs"]) / 2)  # the median
    # flux-tiny: 2 double + 3 single blocks at 4 steps; our lens also decodes the final latent.
    assert pt["images"] == 5 * 4 + 1 and naive["images"] == 5 * 4
    # The .pt write runs beside the lens: the total counts that phase once, never shorter than the write.
    assert pt["save_lens_s"] >= pt["save_s"] > 0
    assert pt["total_s"] == pytest.approx(pt["setup_s"] + pt["sample_s"] + pt["save_lens_s"])
    assert pt["total_after_setup_s"] == pytest.approx(pt["sample_s"] + pt["save_lens_s"])
    assert naive["total_s"] == pytest.approx(naive["sample_s"] + naive["save_s"] + naive["decode_s"])
    assert st["write_bytes"] > 4 * st["bytes_per_step"] > 0  # every step's shard, plus the context
    # The hooks' own time is part of the sampling time, and only our capture modes have it.
    assert all(0 < r["hook_s"] < r["sample_s"] for r in (pt, st)) and "hook_s" not in naive
    assert "naive/ours" in printed and "w/o setup" in printed and "64 pt" in printed
    # Every measured run is in the JSON as it ended, so a run cut short keeps what it measured.
    ran = ["naive", "off", "off", "pt", "pt", "pt_host", "pt_host", "safetensors", "safetensors"]
    assert sorted(r["mode"] for r in data["runs"]) == ran
    # The writer to the disk (its dirty pages flushed) is never faster than into the page cache; the lens
    # counts its decoding and more (set-up, sheets).
    assert 0 < st["flushed_Bps"] <= st["write_Bps"] and st["flush_s"] >= 0
    assert pt["lens_s"] >= pt["decode_s"] > 0
    assert list(work.iterdir()) == [leftovers]  # each run's files are deleted once measured


def test_bench_decode_runs_batched_and_one_at_a_time():
    printed = run("benchmarks/bench_decode.py", "--n", "9")
    assert "9 block outputs + 1 final latent per run" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith("64 ")]
    assert len(rows) == 2, printed  # no CUDA: no compiled or VAE-only rows
    one, batched = rows
    assert one[1:6] == ["one", "at", "a", "time", "1"]
    assert batched[1:3] == ["batched", "5"]  # 10 images under CPU_BATCH (8): two even batches of 5
    assert all(float(row[-3]) > 0 for row in rows)  # seconds per image


def test_cuda_stress_check_runs_its_plumbing_on_the_cpu():
    """The GPU session's race checks, minus the asynchrony: every captured tensor against a reference run,
    buffer sets counted as reused, the two lenses compared. A crash here would cost GPU minutes."""
    printed = run("scripts/cuda_stress.py", "--device", "cpu", "--size", "128")
    lines = [line for line in printed.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(line.startswith("PASS") for line in lines), printed
    assert "(8 steps in 2 sets)" in printed and "(80 tensors)" in printed


def test_bench_pinning_runs_each_mode_in_its_own_process(tmp_path):
    """On a CPU nothing is pinned, but every mode's process runs its bookkeeping and reports a row (CUDA is
    hidden, so this holds on a GPU machine too)."""
    report = tmp_path / "pinning.json"
    args = ["--model", "flux-tiny", "--sizes", "64", "--steps", "2", "--modes", "alloc", "register2"]
    no_gpu = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    printed = run("benchmarks/bench_pinning.py", *args, "--json", str(report), env=no_gpu)
    rows = json.loads(report.read_text())["results"]
    assert [(r["mode"], r["size"]) for r in rows] == [("alloc", 64), ("register2", 64)]
    # flux-tiny at 64 px: 16 image tokens and its T5 length of text tokens in every block output, in its
    # compute dtype, 2 steps; the context adds img_state and pred (16 tokens each) and vec per step.
    from flux.configs import get_spec
    from flux.pipeline import compute_dtype

    spec = get_spec("flux-tiny")
    itemsize = compute_dtype(spec).itemsize
    hidden, blocks = spec.params.hidden_size, (spec.params.depth, spec.params.depth_single_blocks)
    per_step = (blocks[0] * (16 + spec.t5_max_length) + blocks[1] * (16 + spec.t5_max_length)) * hidden
    per_step += 16 * spec.params.in_channels + 16 * spec.params.out_channels + hidden
    assert all(r["captured_bytes"] == 2 * itemsize * per_step for r in rows)
    timed = ("pin_s", "launch_us", "launch_us_beside_pinning", "pin_s_beside_launches", "load_Bps")
    timed += ("load_Bps_beside_pinning", "pin_s_beside_loads")
    assert all(r[key] > 0 for r in rows for key in timed)
    assert "CPU: nothing is pinned" in printed
    for mode in ("pinned", "register12"):  # torch takes a power of two of threads only
        bad = subprocess.run(
            [sys.executable, "benchmarks/bench_pinning.py", "--modes", mode], cwd=ROOT, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode == 2 and f"unknown mode {mode!r}" in bad.stderr


def test_bench_save_times_each_way_of_writing_a_pt(tmp_path):
    printed = run("benchmarks/bench_save.py", "--mb", "8", "--tensor_mb", "1", "--repeats", "1")
    assert "saving 0.01 GB in 8 tensors" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:]}
    assert {"inline", "ours"} <= set(rows) <= {"inline", "ours", "no_crc"}
    assert rows["inline"][-1] == "1.00x" and all(float(row[1]) > 0 for row in rows.values())


def test_bench_attention_times_a_replay_with_and_without_the_maps():
    printed = run("benchmarks/bench_attention.py", "--repeats", "1", "--steps", "1")
    assert "flux-tiny, random weights, torch.float32" in printed
    assert "1 step replayed per run, all 5 blocks, 8 text positions" in printed
    row = printed.strip().splitlines()[-1].split()
    assert row[0] == "64" and len(row) == 5  # size, two s/step, their ratio, ms per block (no CUDA columns)
    plain, with_maps, ratio = map(float, row[1:4])
    # The ratio of the unrounded times, against these printed to 4 significant digits
    assert plain > 0 and with_maps > 0 and ratio == pytest.approx(with_maps / plain, rel=0.002, abs=0.006)
