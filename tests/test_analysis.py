"""flux.analysis on flux-tiny captures (CPU): metrics against independent formulas, plots, animation,
the command, the notebook, and import hygiene without the analysis extra."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux.analysis as analysis
from flux import load_capture
from flux.configs import get_spec
from flux.decode import lens_latent, lens_plan, load_final_layer
from flux.errors import UserError
from flux.loading import resolve_flow_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # 4x4 = 16 image tokens: decoding a frame takes milliseconds
N_DOUBLE, N_SINGLE, N_STEPS = 2, 3, 4  # flux-tiny, default steps
N_BLOCKS = N_DOUBLE + N_SINGLE
PX = (int(analysis.FIGSIZE[0] * analysis.DPI), int(analysis.FIGSIZE[1] * analysis.DPI))


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> dict[str, Path]:
    """One flux-tiny run per capture format, made once for the module."""
    from flux.pipeline import RunOptions, generate, load_models

    out, models = {}, None
    for fmt in ("pt", "safetensors"):
        opts = RunOptions(
            model="flux-tiny",
            prompt="a red cube",
            seed=1,
            width=SIZE,
            height=SIZE,
            device="cpu",
            format=fmt,
            output_dir=str(tmp_path_factory.mktemp(fmt)),
            should_decode_intermediates=False,
        ).validate()
        models = models or load_models(opts.spec, "cpu")
        out[fmt] = generate(models, opts, progress=False).capture_path
    return out


@pytest.fixture(scope="module")
def final_layer():
    spec = get_spec("flux-tiny")
    return load_final_layer(resolve_flow_path(spec), spec.params, "cpu", torch.float32)


@pytest.fixture(scope="module")
def metrics(captures, final_layer):
    return {fmt: analysis.block_metrics(load_capture(p), final_layer) for fmt, p in captures.items()}


def _value(df, stream: str, block: int, step: int, metric: str) -> float:
    sel = df[(df.stream == stream) & (df.block == block) & (df.step == step) & (df.metric == metric)]
    assert len(sel) == 1
    return float(sel.value.iloc[0])


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_final_block_is_its_own_reference(metrics, fmt):
    df = metrics[fmt]
    assert df.attrs["reference"] == "pred"  # the model's own prediction, recorded at every step
    for step in range(N_STEPS):
        assert _value(df, "single", N_SINGLE - 1, step, "pred_cosine") == pytest.approx(1, abs=1e-6)
        assert _value(df, "single", N_SINGLE - 1, step, "pred_rel_l2") == pytest.approx(0, abs=1e-6)
    # The lens reproduces the sampler's last update exactly, so the last x0 is the final latent itself.
    assert _value(df, "single", N_SINGLE - 1, N_STEPS - 1, "x0_rel_l2") == 0


def test_one_row_per_block_step_metric_and_continuous_depth(metrics):
    df = metrics["pt"]
    assert list(df.columns) == list(analysis.COLUMNS)
    n_metrics = len(analysis.SIMILARITY_METRICS) + len(analysis.NORM_METRICS)
    assert len(df) == N_BLOCKS * N_STEPS * n_metrics
    assert not df.duplicated(["stream", "block", "step", "metric"]).any()
    assert set(df.metric) == set(analysis.SIMILARITY_METRICS + analysis.NORM_METRICS)
    assert sorted(df.depth.unique()) == list(range(N_BLOCKS))
    expected = np.where(df.stream == "double", df.block, N_DOUBLE + df.block)
    assert (df.depth.to_numpy() == expected).all()
    assert df.depth.is_monotonic_increasing


def test_formats_agree(metrics):
    pt, st = metrics["pt"], metrics["safetensors"]
    assert (
        pt[["stream", "block", "depth", "step", "metric"]]
        == st[["stream", "block", "depth", "step", "metric"]]
    ).all(axis=None)
    np.testing.assert_allclose(pt.value, st.value, rtol=1e-6, atol=1e-9)


def test_values_match_formulas_worked_out_here(captures, metrics, final_layer):
    """Cosine, relative L2 and norms from numpy, for one block and step, and the last block's prediction
    against the prediction the sampler's own update implies."""
    capture, df = load_capture(captures["pt"]), metrics["pt"]
    ctx = capture["denoising_context"]
    step = 1
    t_curr, t_prev = ctx["timestep_pairs"][step]
    (key,) = lens_plan(capture, {"double": [0]}, [step])
    x0 = lens_latent(capture, key, final_layer).double().numpy().ravel()
    final = ctx["final_latent"].double().numpy().ravel()
    cosine = x0 @ final / np.sqrt((x0 @ x0) * (final @ final))
    assert _value(df, "double", 0, step, "x0_cosine") == pytest.approx(cosine, abs=1e-9)
    rel = np.sqrt(((x0 - final) ** 2).sum() / (final @ final))
    assert _value(df, "double", 0, step, "x0_rel_l2") == pytest.approx(rel, rel=1e-9)

    euler = (ctx["img_state"][step + 1].double() - ctx["img_state"][step].double()) / (t_prev - t_curr)
    (last,) = lens_plan(capture, {"single": [N_SINGLE - 1]}, [step])
    x0_last = lens_latent(capture, last, final_layer).double()
    pred_last = (x0_last - ctx["img_state"][step].double()) / -t_curr
    assert torch.allclose(pred_last, euler, rtol=1e-4, atol=1e-4)
    # The recorded prediction is the model's final-layer output, which the last block's lens reproduces.
    last_img = capture["single_blocks"][f"block_{N_SINGLE - 1}"][step][:, ctx["txt_seq_len"] :]
    assert torch.equal(final_layer(last_img, ctx["vec"][step]), ctx["pred"][step])

    img, _ = capture["double_blocks"]["block_0"][step]
    img_norms = np.linalg.norm(img[0].double().numpy(), axis=-1)
    assert _value(df, "double", 0, step, "img_norm_mean") == pytest.approx(img_norms.mean(), rel=1e-5)
    assert _value(df, "double", 0, step, "img_norm_max") == pytest.approx(img_norms.max(), rel=1e-5)
    single = capture["single_blocks"]["block_1"][step][0].double().numpy()
    txt_norms = np.linalg.norm(single[: ctx["txt_seq_len"]], axis=-1)
    assert _value(df, "single", 1, step, "txt_norm_mean") == pytest.approx(txt_norms.mean(), rel=1e-5)


def test_reference_falls_back_for_captures_without_the_recorded_prediction(captures, metrics, final_layer):
    """Without ctx["pred"], the last single block's lens prediction is the reference; without that block
    too, the Euler update of img_state and final_latent: the numbers barely move (float32 rounding)."""
    capture = load_capture(captures["pt"])
    del capture["denoising_context"]["pred"]
    assert analysis.block_metrics(capture, final_layer).attrs["reference"] == f"single block {N_SINGLE - 1}"
    last = f"block_{N_SINGLE - 1}"
    capture["single_blocks"] = {k: v for k, v in capture["single_blocks"].items() if k != last}
    capture["metadata"]["captured_blocks"]["single"] = list(range(N_SINGLE - 1))
    df = analysis.block_metrics(capture, final_layer)
    assert df.attrs["reference"] == "img_state"
    assert len(df) == (N_BLOCKS - 1) * N_STEPS * 8
    full = metrics["pt"][metrics["pt"].depth < N_BLOCKS - 1].reset_index(drop=True)
    np.testing.assert_allclose(df.value, full.value, atol=1e-4)


def test_image_only_capture_has_no_text_norms(captures, metrics, final_layer, tmp_path):
    """A --streams img capture: single blocks hold only image tokens; the text panel is left out."""
    capture = load_capture(captures["pt"])
    n_txt = capture["denoising_context"]["txt_seq_len"]
    capture["metadata"]["streams"] = "img"
    capture["double_blocks"] = {k: [(img, None) for img, _ in v] for k, v in capture["double_blocks"].items()}
    capture["single_blocks"] = {k: [x[:, n_txt:] for x in v] for k, v in capture["single_blocks"].items()}
    df = analysis.block_metrics(capture, final_layer)
    assert not df.metric.str.startswith("txt").any()
    full = metrics["pt"][~metrics["pt"].metric.str.startswith("txt")].reset_index(drop=True)
    np.testing.assert_array_equal(df.value, full.value)
    analysis.plot_norms(df, tmp_path / "norms.png")
    assert Image.open(tmp_path / "norms.png").size == PX


def test_csv_round_trip(metrics, tmp_path):
    import pandas as pd

    path = analysis.write_csv(metrics["pt"], tmp_path / "metrics.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(analysis.COLUMNS) and len(back) == len(metrics["pt"])
    np.testing.assert_allclose(back.value, metrics["pt"].value, rtol=1e-12)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- plots


def test_plots_are_pngs_of_figsize_times_dpi(metrics, tmp_path):
    df = metrics["pt"]
    for family in analysis.FAMILIES:
        analysis.plot_heatmap(df, family, tmp_path / f"heatmap_{family}.png")
    analysis.plot_norms(df, tmp_path / "norms.png")
    analysis.plot_heatmap(df, "rel_l2", tmp_path / "small.png", figsize=(4, 3), dpi=50)
    for name in ("heatmap_cosine.png", "heatmap_rel_l2.png", "norms.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size == PX
    with Image.open(tmp_path / "small.png") as img:
        assert img.size == (200, 150)


def test_heatmap_needs_similarity_metrics(captures):
    df = analysis.block_metrics(load_capture(captures["pt"]))  # norms only: no final layer
    assert set(df.metric) == set(analysis.NORM_METRICS)
    with pytest.raises(UserError, match="no cosine similarity"):
        analysis.plot_heatmap(df, "cosine")


# --------------------------------------------------------------------------------------------- animation


def test_animation_order_is_numeric_not_lexicographic():
    """Step by step, double 0..18 then single 0..37, whatever order the dict holds the blocks in."""
    doubles, singles = sorted(map(str, range(19))), sorted(map(str, range(38)))  # "0", "1", "10", ...
    capture = {
        "metadata": {"captured_steps": [0, 1], "streams": "both"},
        "double_blocks": {f"block_{i}": None for i in doubles},
        "single_blocks": {f"block_{i}": None for i in singles},
    }
    keys = analysis.animation_keys(capture)
    expected = [(s, i, k) for k in (0, 1) for s, n in (("double", 19), ("single", 38)) for i in range(n)]
    assert [(key.stream, key.block, key.step) for key in keys] == expected


def test_pick_steps():
    assert analysis.pick_steps(list(range(50)), 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert analysis.pick_steps([0, 1, 2], 8) == [0, 1, 2]
    assert analysis.pick_steps([0, 1, 2], 0) == [0, 1, 2]
    assert analysis.pick_steps([0, 5, 9], 1) == [9]


def test_frames_reuse_the_lens_jpegs(captures, tmp_path):
    """Frames the lens already decoded are read from disk: nothing needs the final layer or the AE."""
    capture = load_capture(captures["pt"])
    keys = analysis.animation_keys(capture)
    colours = {}
    for n, key in enumerate(keys):
        colours[key] = (10 * n, 255 - 10 * n, 128)
        Image.new("RGB", (SIZE, SIZE), colours[key]).save(tmp_path / key.filename, quality=100)
    final = Image.new("RGB", (SIZE, SIZE), "white")
    frames = analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)
    assert len(frames) == len(keys) + 1
    w, h = analysis.frame_size(SIZE, SIZE)
    for key, frame in zip(keys, frames):
        assert frame.size == (w, h + analysis.LABEL_BAND)
        centre = np.array(frame.getpixel((w // 2, analysis.LABEL_BAND + h // 2)))
        assert np.abs(centre - colours[key]).max() <= 3
    (tmp_path / keys[0].filename).unlink()
    with pytest.raises(ValueError, match="need decoding"):
        analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)


# ----------------------------------------------------------------------------------------------- command


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_analyze_command_writes_everything(captures, fmt, capsys):
    path = captures[fmt]
    analysis.analyze_command(str(path), device="cpu", animation_steps=2)
    out_dir = path.parent / "analysis" / analysis.capture_stem(path)
    printed = capsys.readouterr().out
    names = ["metrics.csv", "heatmap_cosine.png", "heatmap_rel_l2.png", "norms.png", "animation.gif"]
    for name in names:
        assert (out_dir / name).is_file() and str(out_dir / name) in printed
    for name in names[1:4]:
        assert Image.open(out_dir / name).size == PX
    with Image.open(out_dir / "animation.gif") as gif:
        w, h = analysis.frame_size(SIZE, SIZE)
        assert gif.size == (w, h + analysis.LABEL_BAND)
        assert gif.n_frames == N_BLOCKS * 2 + 1  # two steps (first and last), then the final image


def test_analyze_command_rejects_bad_values(captures):
    with pytest.raises(UserError, match="animation_steps"):
        analysis.analyze_command(str(captures["pt"]), animation_steps=-1)
    with pytest.raises(UserError, match="No capture"):
        analysis.analyze_command(str(captures["pt"]) + ".missing")


def test_latest_capture(tmp_path):
    with pytest.raises(UserError, match="No capture"):
        analysis.latest_capture(tmp_path)
    (tmp_path / "capture_a.pt").write_bytes(b"")
    newest = tmp_path / "capture_b"
    newest.mkdir()
    (newest / "index.json").write_text("{}")
    os.utime(tmp_path / "capture_a.pt", (time.time() - 60, time.time() - 60))
    assert analysis.latest_capture(tmp_path) == newest


# ------------------------------------------------------------------------------------- without the extra


@pytest.mark.parametrize("module", ["pandas", "matplotlib"])
def test_missing_extra_is_named(captures, metrics, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(UserError, match=r"uv sync --extra analysis") as err:
        analysis.analyze_command(str(captures["pt"]), device="cpu")
    assert module in str(err.value) and "flux-intermediate-representation[analysis]" in str(err.value)
    call = (
        (lambda: analysis.block_metrics({}))
        if module == "pandas"
        else (lambda: analysis.plot_norms(metrics["pt"]))
    )
    with pytest.raises(UserError, match=r"--extra analysis"):
        call()


BLOCKER = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "pandas"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

sys.meta_path.insert(0, Blocker())
import flux, flux.analysis, flux.decode, flux.pipeline
import capture_sample
assert "matplotlib" not in sys.modules and "pandas" not in sys.modules
try:
    flux.analysis.require("pandas")
except flux.errors.UserError as e:
    print(e)
"""


def test_import_flux_without_the_extra():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "uv sync --extra analysis" in done.stdout


# ---------------------------------------------------------------------------------------------- notebook


def test_notebook_runs_top_to_bottom(captures, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "explore_capture.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    monkeypatch.setenv("FLUX_CAPTURE", str(captures["pt"]))
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    start = time.perf_counter()
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    assert time.perf_counter() - start < 120
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # lens image, heatmap, norms


def test_mp4_when_imageio_ffmpeg_is_there(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    frames = [
        analysis.label_frame(Image.new("RGB", (64, 64), (40 * i, 0, 0)), [f"{i}"], (64, 64)) for i in range(5)
    ]
    path = analysis.write_mp4(frames, tmp_path / "a.mp4", frame_ms=100, hold_ms=300)
    assert path.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_analysing_again_writes_a_new_folder_and_leaves_the_first_alone(captures, tmp_path):
    base = tmp_path / "again"
    analysis.analyze_command(str(captures["pt"]), output_dir=str(base), device="cpu", animation=False)
    first = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    analysis.analyze_command(str(captures["pt"]), output_dir=str(base), device="cpu", animation=False)
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir()} == first
    assert {p.name for p in (tmp_path / "again_1").iterdir()} == set(first)


def test_a_bad_weights_dir_leaves_no_analysis_folder(captures, tmp_path):
    from flux.errors import UsageError

    with pytest.raises(UsageError, match="--weights_dir"):
        analysis.analyze_command(str(captures["pt"]), output_dir=str(tmp_path / "a"), weights_dir="/nope")
    assert not (tmp_path / "a").exists()
