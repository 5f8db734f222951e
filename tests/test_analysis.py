"""flux.analysis on flux-tiny captures (CPU): metrics against independent formulas, plots, animation,
the command, the notebook, and import hygiene without the analysis extra."""

import importlib.util
import os
import re
import shutil
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
from flux.errors import UsageError, UserError
from flux.loading import resolve_ae_path, resolve_flow_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import capture_sample  # noqa: E402

SIZE = 64  # 4x4 = 16 image tokens: decoding a frame takes milliseconds
N_DOUBLE, N_SINGLE, N_STEPS = 2, 3, 4  # flux-tiny, default steps
N_BLOCKS = N_DOUBLE + N_SINGLE
PX = (int(analysis.FIGSIZE[0] * analysis.DPI), int(analysis.FIGSIZE[1] * analysis.DPI))
# What the README and `analyze --help` document, written out here rather than read from flux.analysis.
CSV_HEADER = "stream,block,depth,step,t,metric,value"
METRICS = {
    "pred_cosine", "pred_rel_l2", "x0_cosine", "x0_rel_l2",
    "img_norm_mean", "img_norm_max", "txt_norm_mean", "txt_norm_max",
    "txt_prompt_norm_mean", "txt_prompt_norm_max",
}  # fmt: skip
FIGURES = ["metrics.csv", "heatmap_cosine.png", "heatmap_rel_l2.png", "norms.png", "animation.gif"]
HOLD_MS = 1500  # the final image is held 1.5 s
# A 64x64 capture animates at 256x256 (longest side FRAME_SIDE) under the label band.
FRAME_PX = (analysis.FRAME_SIDE, analysis.FRAME_SIDE + analysis.LABEL_BAND)
HAS_FFMPEG = importlib.util.find_spec("imageio_ffmpeg") is not None


def _tiny_run(folder: Path, models=None, **flags) -> Path:
    """The capture of one flux-tiny run of "a red cube", seed 1, at SIZE x SIZE on the CPU (no lens)."""
    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(
        model="flux-tiny",
        prompt="a red cube",
        seed=1,
        width=SIZE,
        height=SIZE,
        device="cpu",
        output_dir=str(folder),
        should_decode_intermediates=False,
        **flags,
    ).validate()
    return generate(models or load_models(opts.spec, "cpu"), opts, progress=False).capture_path


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> dict[str, Path]:
    """One flux-tiny run per capture format, made once for the module."""
    from flux.pipeline import load_models

    models = load_models(get_spec("flux-tiny"), "cpu")
    return {fmt: _tiny_run(tmp_path_factory.mktemp(fmt), models, format=fmt) for fmt in ("pt", "safetensors")}


@pytest.fixture(scope="module")
def some_steps(tmp_path_factory) -> Path:
    """The `.pt` run of `captures` again, capturing steps 1 and 3 only: a capture where a step's list
    position is not its index."""
    return _tiny_run(tmp_path_factory.mktemp("some_steps"), steps="1,3")


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


def _stem(capture: Path) -> str:
    """The documented capture stem: `capture_{YYYYmmdd_HHMMSS}_{model}`, the .pt file's name without its
    suffix or the safetensors directory's name."""
    stem = capture.name.removesuffix(".pt")
    assert re.fullmatch(r"capture_\d{8}_\d{6}_flux-tiny", stem), stem
    return stem


def _gif_durations(path: Path) -> list[int]:
    """Each frame's display time in milliseconds, as a GIF reader sees it."""
    with Image.open(path) as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        return durations


def _final_layer_by_hand(h_img: np.ndarray, vec: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """FLUX's final layer in float64 numpy from the checkpoint's `final_layer.*` tensors: SiLU(vec) -> linear
    -> (shift, scale); LayerNorm without affine (eps 1e-6); (1 + scale) * norm + shift; linear."""
    silu = vec / (1 + np.exp(-vec))
    mod = silu @ w["adaLN_modulation.1.weight"].T + w["adaLN_modulation.1.bias"]
    shift, scale = np.split(mod, 2, axis=-1)
    mean, var = h_img.mean(-1, keepdims=True), h_img.var(-1, keepdims=True)
    x = (1 + scale[:, None]) * (h_img - mean) / np.sqrt(var + 1e-6) + shift[:, None]
    return x @ w["linear.weight"].T + w["linear.bias"]


def _schedule_by_hand(num_steps: int, image_seq_len: int) -> list[float]:
    """The reference FLUX schedule: linspace(1, 0) warped by time_shift with mu linear in the image sequence
    length (0.5 at 256 tokens, 1.15 at 4096)."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    out = []
    for k in range(num_steps + 1):
        s = 1 - k / num_steps
        out.append(0.0 if s == 0 else np.exp(mu) / (np.exp(mu) + (1 / s - 1)))
    return out


def _cos_rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.ravel(), b.ravel()
    return a @ b / np.sqrt((a @ a) * (b @ b)), np.sqrt(((a - b) ** 2).sum() / (b @ b))


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
    assert ",".join(df.columns) == CSV_HEADER
    assert len(df) == N_BLOCKS * N_STEPS * len(METRICS)
    assert not df.duplicated(["stream", "block", "step", "metric"]).any()
    assert set(df.metric) == METRICS
    assert sorted(df.depth.unique()) == list(range(N_BLOCKS))
    expected = np.where(df.stream == "double", df.block, N_DOUBLE + df.block)
    assert (df.depth.to_numpy() == expected).all()
    assert df.depth.is_monotonic_increasing


def test_a_capture_of_some_steps_scores_them_as_the_capture_of_every_step_does(
    some_steps, metrics, final_layer
):
    """Each step is scored with its own latent, prediction and t, wherever it sits in the capture's lists."""
    part = analysis.block_metrics(load_capture(some_steps), final_layer)
    full = metrics["pt"]
    full = full[full.step.isin([1, 3])].reset_index(drop=True)
    assert sorted(set(part.step)) == [1, 3] and len(part) == len(full) > 0
    for column in ("stream", "block", "step", "metric"):
        assert part[column].tolist() == full[column].tolist()
    np.testing.assert_allclose(part.t, full.t, rtol=0, atol=0)
    np.testing.assert_allclose(part.value, full.value, rtol=1e-6, atol=1e-9)


def test_formats_agree(metrics):
    pt, st = metrics["pt"], metrics["safetensors"]
    assert (
        pt[["stream", "block", "depth", "step", "metric"]]
        == st[["stream", "block", "depth", "step", "metric"]]
    ).all(axis=None)
    np.testing.assert_allclose(pt.value, st.value, rtol=1e-6, atol=1e-9)


def test_values_match_formulas_worked_out_here(captures, metrics, final_layer):
    """Every metric of non-last blocks from numpy: the final layer applied by hand to the block's image
    tokens (weights read straight from the checkpoint), cosine and relative L2 against the recorded
    prediction and the final latent, token norms; the t column from the reference FLUX schedule; and the last
    block's prediction against the prediction the sampler's own update implies."""
    from safetensors import safe_open

    capture, df = load_capture(captures["pt"]), metrics["pt"]
    ctx = capture["denoising_context"]
    n_txt = ctx["txt_seq_len"]
    with safe_open(str(resolve_flow_path(get_spec("flux-tiny"))), framework="np") as f:
        names = [k for k in f.keys() if k.startswith("final_layer.")]  # noqa: SIM118 (not a dict)
        weights = {k.removeprefix("final_layer."): f.get_tensor(k).astype(np.float64) for k in names}

    # t: one value per step, whatever the block or metric, t_curr of the shifted schedule.
    n_img = (SIZE // 16) ** 2
    schedule = _schedule_by_hand(N_STEPS, n_img)
    assert sorted(df.step.unique()) == list(range(N_STEPS))
    for step, t in df.groupby("step").t:
        assert t.to_numpy() == pytest.approx(schedule[step], abs=1e-6)

    final = ctx["final_latent"].double().numpy()
    for step in (0, 2):
        t_curr = schedule[step]
        vec = ctx["vec"][step].double().numpy()
        reference = ctx["pred"][step].double().numpy()
        state = ctx["img_state"][step].double().numpy()
        blocks = {
            ("double", 0): capture["double_blocks"]["block_0"][step][0],
            ("double", 1): capture["double_blocks"]["block_1"][step][0],
            ("single", 0): capture["single_blocks"]["block_0"][step][:, n_txt:],
            ("single", 1): capture["single_blocks"]["block_1"][step][:, n_txt:],
        }
        for (stream, block), img in blocks.items():
            pred = _final_layer_by_hand(img.double().numpy(), vec, weights)
            cosine, rel = _cos_rel(pred, reference)
            assert _value(df, stream, block, step, "pred_cosine") == pytest.approx(cosine, abs=1e-6)
            assert _value(df, stream, block, step, "pred_rel_l2") == pytest.approx(rel, rel=1e-5)
            cosine, rel = _cos_rel(state - t_curr * pred, final)
            assert _value(df, stream, block, step, "x0_cosine") == pytest.approx(cosine, abs=1e-6)
            assert _value(df, stream, block, step, "x0_rel_l2") == pytest.approx(rel, rel=1e-5)

    step = 1
    t_curr, t_prev = ctx["timestep_pairs"][step]
    euler = (ctx["img_state"][step + 1].double() - ctx["img_state"][step].double()) / (t_prev - t_curr)
    (last,) = lens_plan(capture, {"single": [N_SINGLE - 1]}, [step])
    x0_last = lens_latent(capture, last, final_layer).double()
    pred_last = (x0_last - ctx["img_state"][step].double()) / -t_curr
    assert torch.allclose(pred_last, euler, rtol=1e-4, atol=1e-4)
    # The recorded prediction is the model's final-layer output, which the last block's lens reproduces.
    last_img = capture["single_blocks"][f"block_{N_SINGLE - 1}"][step][:, n_txt:]
    assert torch.equal(final_layer(last_img, ctx["vec"][step]), ctx["pred"][step])

    img, _ = capture["double_blocks"]["block_0"][step]
    img_norms = np.linalg.norm(img[0].double().numpy(), axis=-1)
    assert _value(df, "double", 0, step, "img_norm_mean") == pytest.approx(img_norms.mean(), rel=1e-5)
    assert _value(df, "double", 0, step, "img_norm_max") == pytest.approx(img_norms.max(), rel=1e-5)
    single = capture["single_blocks"]["block_1"][step][0].double().numpy()
    txt_norms = np.linalg.norm(single[:n_txt], axis=-1)
    assert _value(df, "single", 1, step, "txt_norm_mean") == pytest.approx(txt_norms.mean(), rel=1e-5)
    assert _value(df, "single", 1, step, "txt_norm_max") == pytest.approx(txt_norms.max(), rel=1e-5)
    # The prompt's own tokens (up to </s>), without T5's padding after them.
    n_prompt = len(capture["metadata"]["t5_tokens"])
    assert 0 < n_prompt < n_txt
    prompt = txt_norms[:n_prompt]
    assert _value(df, "single", 1, step, "txt_prompt_norm_mean") == pytest.approx(prompt.mean(), rel=1e-5)
    assert _value(df, "single", 1, step, "txt_prompt_norm_max") == pytest.approx(prompt.max(), rel=1e-5)
    assert prompt.mean() != pytest.approx(txt_norms.mean(), rel=1e-3)  # the padding does count there


def test_reference_falls_back_for_captures_without_the_recorded_prediction(captures, metrics, final_layer):
    """Without ctx["pred"], the last single block's lens prediction is the reference; without that block
    too, the Euler update of img_state and final_latent: the numbers barely move (float32 rounding)."""
    capture = load_capture(captures["pt"])
    del capture["denoising_context"]["pred"]
    df = analysis.block_metrics(capture, final_layer)
    assert df.attrs["reference"] == f"single block {N_SINGLE - 1}"
    # The last block's velocity at each step is the model's prediction at that step (bit for bit here, see
    # test_values_match_formulas_worked_out_here), so every value is the one scored against the recorded one.
    np.testing.assert_allclose(df.value, metrics["pt"].value, rtol=1e-6, atol=1e-9)
    last = f"block_{N_SINGLE - 1}"
    capture["single_blocks"] = {k: v for k, v in capture["single_blocks"].items() if k != last}
    capture["metadata"]["captured_blocks"]["single"] = list(range(N_SINGLE - 1))
    df = analysis.block_metrics(capture, final_layer)
    assert df.attrs["reference"] == "img_state"
    assert len(df) == (N_BLOCKS - 1) * N_STEPS * len(METRICS)
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


def test_a_prompt_that_fills_every_text_token_has_prompt_norms_equal_to_the_text_norms(captures):
    """The prompt norms cover the T5 tokens of the prompt; with no padding left they are the text norms."""
    capture = load_capture(captures["pt"])
    n_txt = capture["denoising_context"]["txt_seq_len"]
    capture["metadata"]["t5_tokens"] = ["▁word"] * n_txt
    df = analysis.block_metrics(capture, norms=True)
    for stat in ("mean", "max"):
        prompt = df[df.metric == f"txt_prompt_norm_{stat}"].reset_index(drop=True)
        text = df[df.metric == f"txt_norm_{stat}"].reset_index(drop=True)
        assert len(prompt) == len(text) == N_BLOCKS * N_STEPS
        np.testing.assert_array_equal(prompt.value, text.value)


def test_csv_round_trip(metrics, tmp_path):
    import pandas as pd

    path = analysis.write_csv(metrics["pt"], tmp_path / "metrics.csv")
    assert path.read_text().splitlines()[0] == CSV_HEADER
    back = pd.read_csv(path)
    assert len(back) == len(metrics["pt"])
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


# The README's layout of the plots, written out here: rows by depth, double blocks first.
ROWS = [("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2)]


@pytest.mark.parametrize("family", ["cosine", "rel_l2"])
def test_heatmap_cells_hold_each_blocks_value_at_its_row_and_step(metrics, family):
    """One row per block by depth, double blocks above the red line and single blocks below it, one column
    per step; the left panel the velocity against the model's prediction, the right the x0 estimate
    against the final latent. Each cell holds the metrics table's value for that block and step."""
    df = metrics["pt"]
    fig = analysis.plot_heatmap(df, family)
    velocity, x0 = fig.axes[:2]
    assert velocity.get_title() == "velocity vs. the model's prediction"
    assert x0.get_title() == "x0 estimate vs. the final latent"
    for ax, panel in ((velocity, "pred"), (x0, "x0")):
        expected = [[_value(df, s, b, k, f"{panel}_{family}") for k in range(N_STEPS)] for s, b in ROWS]
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["D0", "D1", "S0", "S1", "S2"]
        (red_line,) = ax.lines
        assert list(red_line.get_ydata()) == [N_DOUBLE - 0.5] * 2  # between D1 and S0


def test_norm_plots_show_the_mean_and_the_largest_token_norm_of_each_stream(metrics):
    """Top row the mean token norm, bottom row the largest; image tokens left, text right; a line per step
    through the blocks by depth, with the table's values."""
    df = metrics["pt"]
    fig = analysis.plot_norms(df)
    panels = ["img_norm_mean", "txt_norm_mean", "img_norm_max", "txt_norm_max"]  # row by row
    titles = ["image tokens: mean", "text tokens: mean", "image tokens: max", "text tokens: max"]
    for ax, metric, title in zip(fig.axes[:4], panels, titles, strict=True):
        assert ax.get_title() == f"{title} L2 norm"
        *lines, boundary = ax.lines  # a line per step, then the dashed one where single blocks begin
        assert len(lines) == N_STEPS and list(boundary.get_xdata()) == [N_DOUBLE - 0.5] * 2
        for step, line in enumerate(lines):
            assert list(line.get_xdata()) == list(range(N_BLOCKS))
            expected = [_value(df, s, b, step, metric) for s, b in ROWS]
            np.testing.assert_array_equal(line.get_ydata(), expected)
    # The two rows differ: a block's largest token is far from its mean one.
    assert _value(df, "single", 0, 0, "img_norm_max") > 1.01 * _value(df, "single", 0, 0, "img_norm_mean")


def test_the_weights_check_warns_past_a_relative_l2_of_one_percent():
    """The README: analyze warns when the final layer loaded does not give the capture's own prediction from
    its last block, by relative L2 over 1e-2. Only the last single block counts (the others are meant to
    differ), at its worst step."""
    pd = analysis.require("pandas")
    meta = {"model": "flux-tiny", "weights": {"flow": "elsewhere.safetensors"}}
    last = N_SINGLE - 1
    for worst, same in ((0.0099, True), (0.0101, False)):
        rows = [
            ("single", last, N_BLOCKS - 1, k, 1.0, "pred_rel_l2", v) for k, v in enumerate([0, worst, 1e-3])
        ]
        rows.append(("single", 0, N_DOUBLE, 0, 1.0, "pred_rel_l2", 0.9))  # not the last block: no warning
        logged = []
        df = pd.DataFrame(rows, columns=CSV_HEADER.split(","))
        assert analysis.check_same_weights(df, meta, logged.append) is same
        assert len(logged) == (0 if same else 1)
    assert f"relative L2 {0.0101:.3g}" in logged[0] and "elsewhere.safetensors" in logged[0]


def test_describe_says_what_the_capture_holds(captures):
    capture = load_capture(captures["pt"])
    text = analysis.describe(capture).splitlines()
    schedule = _schedule_by_hand(N_STEPS, (SIZE // 16) ** 2)
    assert text[0] == f"model flux-tiny, {SIZE}x{SIZE} px, seed 1, {N_STEPS} steps, guidance 3.5"
    assert text[1] == "prompt: 'a red cube'"
    assert text[2] == "captured steps (t_curr): " + ", ".join(
        f"{k}: {schedule[k]:.3f}" for k in range(N_STEPS)
    )
    assert text[3] == "captured blocks: double [0, 1], single [0, 1, 2]"
    assert "  context final_latent: (1, 16, 64)" in text


def test_heatmap_needs_similarity_metrics(captures):
    df = analysis.block_metrics(load_capture(captures["pt"]))  # norms only: no final layer
    assert set(df.metric) == {"img_norm_mean", "img_norm_max", "txt_norm_mean", "txt_norm_max"} | {
        "txt_prompt_norm_mean",
        "txt_prompt_norm_max",
    }
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
    """Frames the lens already decoded (x0) are read from disk: nothing needs the final layer or the AE."""
    capture = load_capture(captures["pt"])
    keys = analysis.animation_keys(capture)
    colours = {}
    for n, key in enumerate(keys):
        colours[key] = (10 * n, 255 - 10 * n, 128)
        comment = f"flux lens: {key.stream} block {key.block}, step {key.step}, target x0"
        Image.new("RGB", (SIZE, SIZE), colours[key]).save(
            tmp_path / key.filename, quality=100, comment=comment
        )
    final = Image.new("RGB", (SIZE, SIZE), "white")
    frames = analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)
    assert len(frames) == len(keys) + 1
    w, h = analysis.frame_size(SIZE, SIZE)
    for key, frame in zip(keys, frames):
        assert frame.size == (w, h + analysis.LABEL_BAND)
        centre = np.array(frame.getpixel((w // 2, analysis.LABEL_BAND + h // 2)))
        assert np.abs(centre - colours[key]).max() <= 3
    # Not reused: a lens JPEG of the `next` target (another picture), one without the lens's comment (older
    # or not the lens's), a missing one. Each of them has to be decoded.
    key = keys[0]
    wrong = {"next": f"flux lens: {key.stream} block {key.block}, step {key.step}, target next", "none": None}
    for comment in wrong.values():
        Image.new("RGB", (SIZE, SIZE), colours[key]).save(tmp_path / key.filename, comment=comment or "")
        with pytest.raises(ValueError, match="1 frames need decoding"):
            analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)
    (tmp_path / key.filename).unlink()
    with pytest.raises(ValueError, match="1 frames need decoding"):
        analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)


def test_frames_hold_their_pictures_at_the_frames_size_not_the_lens(captures, monkeypatch, tmp_path):
    """Each picture is brought to the frame's size as soon as it is read: held whole until the last frame
    was ready, 456 frames of a 1024 px lens took 1.4 GB. (Lens JPEGs four times the frame's side stand in
    for a big capture's.) The frames are those the whole pictures give."""
    capture = load_capture(captures["pt"])
    keys = analysis.animation_keys(capture, [1, 3])
    big = 4 * analysis.FRAME_SIDE
    rng = np.random.default_rng(0)
    for key in keys:
        comment = f"flux lens: {key.stream} block {key.block}, step {key.step}, target x0"
        pixels = rng.integers(0, 256, (big, big, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / key.filename, quality=95, comment=comment)
    final = Image.new("RGB", (SIZE, SIZE), "white")
    size = analysis.frame_size(SIZE, SIZE)
    expected = []
    for key in keys:
        with Image.open(tmp_path / key.filename) as img:
            expected.append(analysis.label_frame(img.convert("RGB"), ["x"], size))
    seen, label = [], analysis.label_frame
    monkeypatch.setattr(
        analysis, "label_frame", lambda img, lines, size: seen.append(img.size) or label(img, ["x"], size)
    )
    frames = analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=final)
    assert seen[: len(keys)] == [size] * len(keys)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(frames, expected, strict=False))


def test_frames_the_lens_did_not_write_are_decoded_x0_estimates(captures, final_layer):
    """A frame that no lens JPEG holds is decoded here: the block's x0 estimate img_state - t_curr *
    velocity (the velocity the final layer reads from its image tokens), through the VAE, as the README
    says every frame shows; not the one-step (`next`) latent."""
    from flux.loading import load_ae
    from flux.sampling import unpack

    capture = load_capture(captures["pt"])
    ctx = capture["denoising_context"]
    ae = load_ae(get_spec("flux-tiny"), "cpu")
    step = 0
    keys = [k for k in analysis.animation_keys(capture, [step]) if (k.stream, k.block) in ROWS[1:3]]
    final = Image.new("RGB", (SIZE, SIZE))
    frames = analysis.render_frames(capture, keys, final_layer=final_layer, ae=ae, final_image=final)
    assert len(frames) == len(keys) + 1
    w, h = analysis.frame_size(SIZE, SIZE)
    t_curr, t_prev = ctx["timestep_pairs"][step]

    def picture(latent: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = ae.decode(unpack(latent.float(), SIZE, SIZE))[0]
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()  # truncated, as the lens
        return np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC), dtype=float)

    for key, frame in zip(keys, frames):
        out = capture[f"{key.stream}_blocks"][f"block_{key.block}"][step]
        img = out[0] if key.stream == "double" else out[:, ctx["txt_seq_len"] :]
        with torch.inference_mode():
            velocity = final_layer(img, ctx["vec"][step])
        shown = np.asarray(frame.crop((0, analysis.LABEL_BAND, w, analysis.LABEL_BAND + h)), dtype=float)
        x0 = picture(ctx["img_state"][step] - t_curr * velocity)
        one_step = picture(ctx["img_state"][step] + (t_prev - t_curr) * velocity)
        assert np.abs(shown - x0).max() <= 1, key
        assert np.abs(one_step - x0).mean() > 5  # the other target would show another picture


def test_frames_of_tall_pictures_leave_room_for_their_labels():
    # A 256x1024 picture animates 64 pixels wide: its frame widens to FRAME_MIN_WIDTH, the picture centred.
    size = analysis.frame_size(256, 1024)
    assert size == (64, 256)
    frame = analysis.label_frame(Image.new("RGB", (256, 1024), "red"), ["(the sampler's output)"], size)
    assert frame.size == (112, 256 + analysis.LABEL_BAND)
    assert frame.getpixel((24 + 32, 200)) == (255, 0, 0) and frame.getpixel((10, 200)) == (255, 255, 255)
    wide = analysis.label_frame(Image.new("RGB", (256, 256), "red"), ["x"], analysis.frame_size(256, 256))
    assert wide.size == (256, 256 + analysis.LABEL_BAND)  # wide enough already: unchanged


def test_frame_labels_count_steps_from_0_like_everything_else(captures, monkeypatch, tmp_path):
    capture = load_capture(captures["pt"])
    keys = analysis.animation_keys(capture, [1, 3])
    keys = keys[:1] + keys[-1:]
    for key in keys:  # frames the lens wrote, so nothing is decoded
        comment = f"flux lens: {key.stream} block {key.block}, step {key.step}, target x0"
        Image.new("RGB", (SIZE, SIZE)).save(tmp_path / key.filename, comment=comment)
    drawn = []
    monkeypatch.setattr(analysis, "label_frame", lambda img, lines, size: drawn.append(lines))
    analysis.render_frames(capture, keys, jpeg_dir=tmp_path, final_image=Image.new("RGB", (SIZE, SIZE)))
    t1, t3 = (float(capture["denoising_context"]["timestep_pairs"][k][0]) for k in (1, 3))
    assert drawn[0][0] == f"step 1  t={t1:.2f}" and drawn[1][0] == f"step 3  t={t3:.2f}"


def test_the_norms_colour_bar_names_the_captured_steps(tmp_path):
    steps = list(range(0, 50, 5))  # ten steps: a colour bar, not a legend
    rows = [
        ("double", 0, 0, k, 1 - k / 50, m, 1.0 + k) for k in steps for m in ("img_norm_mean", "img_norm_max")
    ]
    df = analysis.require("pandas").DataFrame(rows, columns=CSV_HEADER.split(","))
    fig = analysis.plot_norms(df)
    bar = fig.axes[-1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels == ["0", "10", "20", "30", "40"]  # steps, at every other position (not 0, 2, 4, 6, 8)


def test_the_norms_leave_a_gap_where_blocks_were_not_captured():
    depths = [0, 1, 3, 4]  # depth 2 not captured
    rows = [("double", d, d, 0, 1.0, m, 10.0 + d) for d in depths for m in ("img_norm_mean", "img_norm_max")]
    df = analysis.require("pandas").DataFrame(rows, columns=CSV_HEADER.split(","))
    line = analysis.plot_norms(df).axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4]
    y = line.get_ydata()
    assert np.isnan(y[2]) and list(y[[0, 1, 3, 4]]) == [10.0, 11.0, 13.0, 14.0]


def test_a_capture_with_no_step_on_disk_is_refused_before_any_folder(captures, tmp_path, capsys):
    import json
    import shutil

    copy = tmp_path / "capture"
    shutil.copytree(captures["safetensors"], copy)
    index = json.loads((copy / "index.json").read_text())
    index.update(steps_done=[], complete=False)
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="No captured step"):
        analysis.analyze(copy, tmp_path / "analysis", device="cpu", progress=False)
    assert not (tmp_path / "analysis").exists()
    # The lens too (it raised an IndexError from the empty latent list).
    assert capture_sample.run(["decode", str(copy), "--output_dir", str(tmp_path / "lens")]) == 1
    assert not (tmp_path / "lens").exists()
    assert "the lens has nothing to decode" in capsys.readouterr().err


def test_a_capture_cut_short_gets_the_velocity_metrics_and_no_final_frame(metrics, tmp_path):
    """The run of `captures`, streamed and interrupted in its last step: steps 0-2 on disk, no final latent
    and no image. Its velocity metrics are the full run's at those steps; nothing needs the final latent."""
    import pandas as pd

    from flux.pipeline import load_models

    models, calls = load_models(get_spec("flux-tiny"), "cpu"), []

    def interrupt_the_last_step(module, args):
        calls.append(1)
        if len(calls) == N_STEPS:
            raise KeyboardInterrupt

    models.flow.register_forward_pre_hook(interrupt_the_last_step)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path, models, format="safetensors")
    capture = next((tmp_path / "intermediates").glob("capture_*"))
    assert load_capture(capture)["metadata"]["captured_steps"] == [0, 1, 2]
    assert not list(tmp_path.glob("*.jpg"))  # the run's image: none

    logged, out = [], tmp_path / "analysis"
    written = analysis.analyze(
        capture, out, device="cpu", animation_steps=0, progress=False, log=logged.append
    )
    df = pd.read_csv(written["metrics"])
    velocity = ["pred_cosine", "pred_rel_l2"]
    assert set(df.metric) == METRICS - {"x0_cosine", "x0_rel_l2"}
    full = metrics["pt"]
    full = full[full.step.isin([0, 1, 2]) & full.metric.isin(velocity)].reset_index(drop=True)
    part = df[df.metric.isin(velocity)].reset_index(drop=True)
    assert part[["stream", "block", "step", "metric"]].values.tolist() == (
        full[["stream", "block", "step", "metric"]].values.tolist()
    )
    np.testing.assert_allclose(part.value, full.value, rtol=1e-6, atol=1e-9)
    with Image.open(written["animation"]) as gif:
        assert gif.n_frames == N_BLOCKS * 3  # every block at each of the 3 steps, and no final frame
    assert any("no final frame (the run was cut short)" in line for line in logged)


def test_weights_other_than_the_runs_are_caught_by_the_last_blocks_prediction(captures, tmp_path):
    """The final layer loaded for the analysis must give the run's own prediction from its last block;
    other weights (here its linear layer scaled by 3) would make every metric silently wrong."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flux.tiny import ensure_tiny_repo

    spec = get_spec("flux-tiny")
    other = tmp_path / "other-weights"
    shutil.copytree(ensure_tiny_repo(), other)
    state = load_file(other / spec.repo_flow)
    state["final_layer.linear.weight"] *= 3
    save_file(state, other / spec.repo_flow)
    for weights_dir, warned in ((None, False), (str(other), True)):
        logged = []
        analysis.analyze(captures["pt"], tmp_path / f"analysis_{warned}", device="cpu", animation=False,
                         weights_dir=weights_dir, progress=False, log=logged.append)  # fmt: skip
        warning = [line for line in logged if line.startswith("warning: the final layer loaded now")]
        assert bool(warning) is warned, logged
    assert "the weights differ from the run's" in warning[0]


def test_the_lens_of_a_later_decode_is_reused_too(captures, tmp_path):
    capture = load_capture(captures["pt"])
    keys = analysis.animation_keys(capture)
    link = tmp_path / "intermediates" / "capture_x.pt"
    link.parent.mkdir()
    link.symlink_to(captures["pt"])
    own = tmp_path / "intermediates" / "decoded" / "capture_x"
    later = own.with_name("capture_x_1")
    for folder, target in ((own, "next"), (later, "x0")):  # the run's lens showed `next`; decode made x0
        folder.mkdir(parents=True)
        for key in keys:
            comment = f"flux lens: {key.stream} block {key.block}, step {key.step}, target {target}"
            Image.new("RGB", (SIZE, SIZE)).save(folder / key.filename, comment=comment)
    assert analysis.lens_folder(link, keys) == (later, [])
    (later / keys[0].filename).unlink()
    assert analysis.lens_folder(link, keys) == (later, keys[:1])
    # Another capture's lens is never this one's: a run started in the same second (capture_x_1a2b), even
    # one whose suffix happens to be all digits (capture_x_2024), and a folder of another kind.
    for other in ("capture_x_1a2b", "capture_x_2024", "capture_x_best"):
        folder = own.with_name(other)
        folder.mkdir()
        for key in keys:
            comment = f"flux lens: {key.stream} block {key.block}, step {key.step}, target x0"
            Image.new("RGB", (SIZE, SIZE)).save(folder / key.filename, comment=comment)
    (link.parent / "capture_x_2024.pt").write_bytes(b"")
    assert analysis.lens_folder(link, keys) == (later, keys[:1])


# ----------------------------------------------------------------------------------------------- command


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_analyze_command_writes_everything(captures, fmt, capsys):
    path = captures[fmt]
    analysis.analyze_command(str(path), device="cpu", animation_steps=2)
    out_dir = path.parent / "analysis" / _stem(path)  # the documented default
    printed = capsys.readouterr().out
    for name in FIGURES:
        assert (out_dir / name).is_file() and str(out_dir / name) in printed
    for name in FIGURES[1:4]:
        assert Image.open(out_dir / name).size == PX
    assert (out_dir / "metrics.csv").read_text().splitlines()[0] == CSV_HEADER
    with Image.open(out_dir / "animation.gif") as gif:
        assert gif.size == FRAME_PX
        assert gif.n_frames == N_BLOCKS * 2 + 1  # two steps (first and last), then the final image
    # --frame_ms defaults to 120 ms a frame; the final image is held 1.5 s.
    assert _gif_durations(out_dir / "animation.gif") == [120] * (N_BLOCKS * 2) + [HOLD_MS]


def test_analyze_rejects_bad_values_with_exit_code_2(captures, tmp_path, capsys):
    """Bad values are usage errors (exit code 2), caught before anything is written."""
    out = tmp_path / "never"
    for flags, named in (
        (["--animation_steps", "-1"], "--animation_steps"),
        (["--frame_ms", "10"], "--frame_ms"),
        (["--device", "tpu:x"], "--device"),
        (["--animation", "maybe"], "--animation is a switch"),
        # Flags the run would ignore: the user may believe they applied.
        (["--animation", "False", "--frame_ms", "50"], "--frame_ms applies only to the animation"),
        (["--noanimation", "--animation_steps", "3"], "--animation_steps applies only to the animation"),
    ):
        argv = ["analyze", str(captures["pt"]), "--output_dir", str(out), *flags, "--progress", "False"]
        assert capture_sample.run(argv) == 2, flags
        assert named in capsys.readouterr().err
    assert capture_sample.run(["analyze", str(captures["pt"]) + ".missing", "--output_dir", str(out)]) == 2
    assert "No capture" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UsageError, match="animation_steps"):
        analysis.analyze_command(str(captures["pt"]), output_dir=str(out), animation_steps=-1)
    with pytest.raises(UsageError, match="No capture"):
        analysis.analyze_command(str(captures["pt"]) + ".missing", output_dir=str(out))
    assert not out.exists()


def test_analyze_loads_only_the_final_layer_and_the_ae(captures, tmp_path, monkeypatch):
    """The README: only the final layer's tensors and the AE are loaded, never the whole flow model."""
    import flux.loading
    import flux.model
    import flux.pipeline

    def whole_model(*args, **kwargs):
        pytest.fail("analyze built or loaded the whole flow model")

    monkeypatch.setattr(flux.loading, "load_flow_model", whole_model)
    monkeypatch.setattr(flux.pipeline, "load_flow_model", whole_model)
    monkeypatch.setattr(flux.pipeline, "load_models", whole_model)
    monkeypatch.setattr(flux.model.Flux, "__init__", whole_model)
    read_whole, read_parts, aes = [], [], []
    read_state_dict, read_tensors, load_ae = (
        flux.loading.read_state_dict,
        flux.loading.read_tensors,
        flux.loading.load_ae,
    )

    def spy_read_state_dict(path, *args, **kwargs):
        read_whole.append(Path(path).resolve())
        return read_state_dict(path, *args, **kwargs)

    def spy_read_tensors(path, prefix):
        read_parts.append((Path(path).resolve(), prefix))
        return read_tensors(path, prefix)

    def spy_load_ae(*args, **kwargs):
        aes.append(args)
        return load_ae(*args, **kwargs)

    monkeypatch.setattr(flux.loading, "read_state_dict", spy_read_state_dict)
    monkeypatch.setattr(flux.loading, "read_tensors", spy_read_tensors)
    monkeypatch.setattr(flux.loading, "load_ae", spy_load_ae)
    # No lens JPEGs beside this capture: every frame is decoded, so the AE must load.
    written = analysis.analyze(
        captures["pt"], tmp_path / "a", device="cpu", animation_steps=1, progress=False, log=lambda *a: None
    )
    assert written["animation"].is_file()
    spec = get_spec("flux-tiny")
    assert read_parts == [(resolve_flow_path(spec).resolve(), "final_layer.")]
    assert len(aes) == 1 and read_whole == [resolve_ae_path(spec).resolve()]


def test_compare_captures_measures_each_block_against_the_other_run(captures, tmp_path):
    """The same run in both formats is identical everywhere; another prompt with the same seed is not, and
    every value is the formula worked out here, on the tensors as stored."""
    from flux.pipeline import RunOptions, generate, load_models

    same = analysis.compare_captures(load_capture(captures["pt"]), load_capture(captures["safetensors"]))
    assert set(same.metric) == set(analysis.COMPARE_METRICS)
    assert (same[same.metric.str.endswith("cosine")].value.round(12) == 1).all()
    assert (same[same.metric.str.endswith("rel_l2")].value == 0).all()
    opts = RunOptions(model="flux-tiny", prompt="a blue ball", seed=1, width=SIZE, height=SIZE, device="cpu",
                      output_dir=str(tmp_path), should_decode_intermediates=False)  # fmt: skip
    other = load_capture(
        generate(load_models(opts.spec, "cpu"), opts.validate(), progress=False).capture_path
    )
    mine = load_capture(captures["pt"])
    df = analysis.compare_captures(mine, other)
    assert len(df) == N_BLOCKS * 4 * 4  # blocks x steps x (img, txt) x (cosine, rel_l2)
    t_len = mine["denoising_context"]["txt_seq_len"]
    a, b = mine["single_blocks"]["block_1"][2], other["single_blocks"]["block_1"][2]
    for tokens, x, y in (("img", a[:, t_len:], b[:, t_len:]), ("txt", a[:, :t_len], b[:, :t_len])):
        x, y = x.double().flatten(), y.double().flatten()
        cosine = float(x @ y / (x.norm() * y.norm()))
        assert _value(df, "single", 1, 2, f"{tokens}_cosine") == pytest.approx(cosine, rel=1e-12)
        assert _value(df, "single", 1, 2, f"{tokens}_rel_l2") == pytest.approx(
            float((x - y).norm() / y.norm())
        )
    assert _value(df, "double", 0, 0, "txt_rel_l2") > 0  # another prompt: other text tokens from the start
    with pytest.raises(UserError, match="The captures differ in width"):
        other["metadata"] = {**other["metadata"], "width": 128}
        analysis.compare_captures(mine, other)


def test_compare_captures_pairs_steps_by_index_not_by_list_position(captures, some_steps):
    """The run against itself captured at steps 1 and 3 only: those two steps, identical, either way round."""
    full, part = load_capture(captures["pt"]), load_capture(some_steps)
    for a, b in ((full, part), (part, full)):
        df = analysis.compare_captures(a, b)
        assert sorted(set(df.step)) == [1, 3] and len(df) == N_BLOCKS * 2 * 4
        assert (df[df.metric.str.endswith("cosine")].value.round(12) == 1).all()
        assert (df[df.metric.str.endswith("rel_l2")].value == 0).all()


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


def _run_notebook(capture: Path, folder: Path, monkeypatch) -> tuple[list, list, str]:
    """Run the notebook as Jupyter does, in {folder}/notebooks/, where it finds `capture` (copied into
    ../output/intermediates) as the newest capture. Returns (its cells, their outputs, the text printed)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "explore_capture.ipynb", as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    runs = folder / "output" / "intermediates"
    runs.mkdir(parents=True)
    shutil.copy(capture, runs)
    (folder / "notebooks").mkdir()
    monkeypatch.delenv("FLUX_CAPTURE", raising=False)
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    # nbclient's defaults give up on a busy machine: a kernel that takes over 60 s to start fails the run,
    # and a cell's outputs that come more than 4 s after its reply are dropped without an error.
    NotebookClient(
        nb, kernel_name="python3", timeout=300, startup_timeout=300, iopub_timeout=300,
        raise_on_iopub_timeout=True, resources={"metadata": {"path": str(folder / "notebooks")}},
    ).execute()  # fmt: skip
    assert nb.cells[1].outputs[0]["text"].startswith(f"../output/intermediates/{capture.name}\n")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return nb.cells, outputs, "".join(o.get("text", "") for o in outputs)


def _pngs(outputs: list) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_notebook_runs_top_to_bottom(captures, monkeypatch, tmp_path):
    _, outputs, printed = _run_notebook(captures["pt"], tmp_path, monkeypatch)
    assert _pngs(outputs) == 5  # the lens image, two heatmaps, the norms, the attention maps
    # The attention maps' caption: the last step of flux-tiny's 4, and the prompt's last word, "cube", whose
    # T5 tokens (flux-tiny's tokenizer spells it letter by letter) are summed.
    assert (
        "step 3, the word 'cube' (text positions [2, 3, 4, 5, 6]) of ['a', 'red', 'cube', '</s>']" in printed
    )


def test_notebook_runs_on_a_capture_of_text_tokens_only(monkeypatch, tmp_path):
    """`--streams txt` leaves the lens and the similarity heatmaps nothing to show; the notebook says so and
    shows the rest (the norms, and the attention maps, which replay the step from the stored latent)."""
    capture = _tiny_run(tmp_path / "run", streams="txt")
    _, outputs, printed = _run_notebook(capture, tmp_path / "nb", monkeypatch)
    assert "text tokens only (--streams txt): the lens has no image tokens" in printed
    assert "no similarity metrics" in printed
    assert _pngs(outputs) == 2 and "step 3, the word '" in printed


def test_analyze_command_writes_an_mp4_that_decodes(captures, tmp_path, capsys):
    """`capture_sample.py analyze` with imageio-ffmpeg (in the dev extra): animation.mp4 beside the GIF, at
    1000 / frame_ms fps, the final image repeated to last 1.5 s."""
    ffmpeg = pytest.importorskip(
        "imageio_ffmpeg", reason="imageio-ffmpeg is not installed (uv sync --extra dev installs it)"
    )
    out = tmp_path / "a"
    argv = ["analyze", str(captures["pt"]), "--output_dir", str(out), "--device", "cpu"]
    rc = capture_sample.run([*argv, "--frame_ms", "100", "--animation_steps", "2", "--progress", "False"])
    assert rc == 0
    assert str(out / "animation.mp4") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*FIGURES, "animation.mp4"])  # no temporary file
    n_gif = N_BLOCKS * 2 + 1  # blocks at the first and last step, then the final image
    assert _gif_durations(out / "animation.gif") == [100] * (n_gif - 1) + [HOLD_MS]

    reader = ffmpeg.read_frames(str(out / "animation.mp4"))
    meta = next(reader)
    assert meta["codec"] == "h264" and meta["fps"] == pytest.approx(1000 / 100)
    width, height = meta["size"]
    assert (width, height) == FRAME_PX
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    assert len(frames) == (n_gif - 1) + HOLD_MS // 100
    # Lossy, but the same pictures: each frame's mean colour matches the GIF frame it encodes.
    with Image.open(out / "animation.gif") as gif:
        gif_means = []
        for i in range(gif.n_frames):
            gif.seek(i)
            gif_means.append(np.asarray(gif.convert("RGB"), dtype=float).mean(axis=(0, 1)))
    for i, frame in enumerate(frames):
        np.testing.assert_allclose(frame.mean(axis=(0, 1)), gif_means[min(i, n_gif - 1)], atol=3)


def test_analysing_again_writes_a_new_folder_and_leaves_the_first_alone(captures, tmp_path):
    """The default folder is analysis/{capture stem}/ beside the capture; a second run gets {stem}_1."""
    capture = Path(shutil.copy(captures["pt"], tmp_path))
    stem = _stem(capture)
    analysis.analyze_command(str(capture), device="cpu", animation=False, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "analysis" / stem).iterdir()}
    assert set(first) == {"metrics.csv", "heatmap_cosine.png", "heatmap_rel_l2.png", "norms.png"}
    analysis.analyze_command(str(capture), device="cpu", animation=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "analysis").iterdir()) == [stem, f"{stem}_1"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "analysis" / stem).iterdir()} == first
    assert {p.name for p in (tmp_path / "analysis" / f"{stem}_1").iterdir()} == set(first)


def test_main_command_with_analyze_writes_the_analysis_folder(tmp_path, capsys):
    """`capture_sample.py --analyze True` end to end: the capture, the lens, then
    intermediates/analysis/{capture stem}/ with the documented files, the animation reusing the lens."""
    n_steps = 2
    argv = ["--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", "--device", "cpu"]
    argv += ["--width", str(SIZE), "--height", str(SIZE), "--num_steps", str(n_steps)]
    argv += ["--output_dir", str(tmp_path), "--analyze", "True", "--progress", "False"]
    rc = capture_sample.run(argv)
    assert rc == 0
    (capture,) = (tmp_path / "intermediates").glob("capture_*")
    stem = _stem(capture)
    assert [p.name for p in (tmp_path / "intermediates" / "analysis").iterdir()] == [stem]
    folder = tmp_path / "intermediates" / "analysis" / stem
    expected = {*FIGURES, "animation.mp4"} if HAS_FFMPEG else set(FIGURES)
    assert {p.name for p in folder.iterdir()} == expected
    lines = (folder / "metrics.csv").read_text().splitlines()
    assert lines[0] == CSV_HEADER and len(lines) == 1 + N_BLOCKS * n_steps * len(METRICS)
    printed = capsys.readouterr().out
    assert f"{N_BLOCKS * n_steps} from the lens" in printed  # the lens ran first: nothing decoded twice
    with Image.open(folder / "animation.gif") as gif:
        assert gif.n_frames == N_BLOCKS * n_steps + 1 and gif.size == FRAME_PX


def test_the_animation_shows_this_run_even_where_files_beside_it_do_not(tmp_path, capsys):
    """A lens decoded with --decode_target next shows another picture than the x0 frames: not reused. And
    the final frame is this run's image, even when img_0.jpg has since been replaced (the user deleted it and
    another run took its free name)."""
    argv = ["--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", "--num_steps", "2"]
    argv += ["--width", str(SIZE), "--height", str(SIZE), "--decode_target", "next"]
    assert capture_sample.run([*argv, "--output_dir", str(tmp_path), "--progress", "False"]) == 0
    (capture,) = (tmp_path / "intermediates").glob("capture_*")
    with Image.open(tmp_path / "img_0.jpg") as img:
        genuine = np.asarray(img.convert("RGB"), dtype=float)
    Image.new("RGB", (SIZE, SIZE), (0, 255, 0)).save(tmp_path / "img_0.jpg")  # another run's image
    capsys.readouterr()
    analysis.analyze_command(str(capture), device="cpu", progress=False)
    assert "from the lens" not in capsys.readouterr().out  # all 2 x N_BLOCKS frames decoded as x0
    with Image.open(tmp_path / "intermediates" / "analysis" / _stem(capture) / "animation.gif") as gif:
        gif.seek(gif.n_frames - 1)
        w, h = analysis.frame_size(SIZE, SIZE)
        final = gif.convert("RGB").crop((0, analysis.LABEL_BAND, w, analysis.LABEL_BAND + h))
    final = np.asarray(final.resize((SIZE, SIZE)), dtype=float)
    assert np.abs(final - genuine).mean() < 0.25 * np.abs(final - [0, 255, 0]).mean()


def test_the_final_frame_is_the_runs_image_while_it_is_unchanged(captures, tmp_path, monkeypatch):
    capture = captures["pt"]
    meta = load_capture(capture)["metadata"]
    image = Path(meta["files"]["image"])
    with Image.open(image) as img:
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(analysis.sampler_image(meta, capture)), expected)
    # Looked for beside the capture too (the recorded path is relative to where the run started).
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(
        np.asarray(
            analysis.sampler_image({**meta, "files": {**meta["files"], "image": image.name}}, capture)
        ),
        expected,
    )
    original = image.read_bytes()
    try:
        image.write_bytes(original[:-3] + bytes(3))  # the same name, other bytes
        assert analysis.sampler_image(meta, capture) is None
    finally:
        image.write_bytes(original)
    assert analysis.sampler_image({**meta, "files": {"image": str(image)}}, capture) is None  # no digest


def test_the_lens_of_a_symlinked_capture_is_found_beside_its_target(tmp_path):
    run = tmp_path / "run" / "intermediates"
    (run / "decoded" / "capture_x").mkdir(parents=True)
    (run / "capture_x.pt").write_bytes(b"")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "latest.pt").symlink_to(run / "capture_x.pt")
    assert analysis.decoded_dir(tmp_path / "links" / "latest.pt") == run / "decoded" / "capture_x"
    (tmp_path / "links" / "decoded" / "latest").mkdir(parents=True)  # a lens decoded through the link
    assert analysis.decoded_dir(tmp_path / "links" / "latest.pt") == tmp_path / "links" / "decoded" / "latest"


def test_a_bad_weights_dir_leaves_no_analysis_folder(captures, tmp_path):
    with pytest.raises(UsageError, match="--weights_dir"):
        analysis.analyze_command(str(captures["pt"]), output_dir=str(tmp_path / "a"), weights_dir="/nope")
    assert not (tmp_path / "a").exists()
