"""Where in the network the picture appears: per-block metrics, heatmaps, stream norms and an animation.

For every captured block output h (block i, step k) the lens turns the image tokens into a velocity
`pred = final_layer(h_img, vec_k)` and an x0 estimate `img_state_k - t_curr * pred` (see flux.decode). This
module compares them with what the model itself produced:

    pred_cosine, pred_rel_l2   pred against the reference prediction at the same step
    x0_cosine,   x0_rel_l2     x0 estimate against the final latent (denoising_context["final_latent"])

The reference prediction is the model's actual prediction at that step, recorded in the capture
(`denoising_context["pred"]`; it equals the last single block's lens prediction). For captures made
without it, the last single block's lens prediction is used if that block was captured, else the
prediction is recovered from the sampler's Euler update `(img_state[k+1] - img_state[k]) / (t_prev - t_curr)`
(final_latent standing in for img_state[k+1] at the last step), which carries the rounding of the update:
a few percent in bf16 over 50 steps. Cosine similarity and
relative L2 distance `|a - b| / |b|` are taken over the whole latent (batch, tokens and channels flattened),
in float64. Stream norms are the mean and the largest L2 norm of the image and text tokens of each block
output, computed without any weights; the text norms cover all T positions, T5's padding included (most of
them for a short prompt), and `txt_prompt_norm_*` only the prompt's own tokens (`metadata["t5_tokens"]`).

Everything is returned as one long pandas DataFrame (columns `COLUMNS`, one row per block, step and
metric), with `depth` running continuously through the network: double blocks 0..18, then single blocks
19..56 (flux-tiny: 0..1, then 2..4).

matplotlib and pandas are the `analysis` extra: they are imported inside the functions that need them, so
`import flux.analysis` works without them.
"""

import glob
import importlib
import importlib.util
import math
import os
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm.auto import tqdm

from flux.decode import (
    STREAMS,
    LensKey,
    auto_batch_size,
    block_tokens,
    decode_latents,
    jpeg_comment,
    latent_from,
    lens_comment,
    lens_latent,
    lens_plan,
    lens_velocity,
    to_image,
)
from flux.errors import UsageError, UserError
from flux.layers import LastLayer
from flux.options import check_device

COLUMNS = ("stream", "block", "depth", "step", "t", "metric", "value")
SIMILARITY_METRICS = ("pred_cosine", "pred_rel_l2", "x0_cosine", "x0_rel_l2")
NORM_METRICS = ("img_norm_mean", "img_norm_max", "txt_norm_mean", "txt_norm_max")
FAMILIES = {"cosine": "cosine similarity", "rel_l2": "relative L2 distance"}
PANELS = {"pred": "velocity vs. the model's prediction", "x0": "x0 estimate vs. the final latent"}
REL_L2_CAP = 2.0  # heatmap colours saturate here: beyond twice the reference's norm the detail is noise
FIGSIZE, DPI = (10.0, 6.0), 100  # every figure: 1000 x 600 pixels
ANNOTATE_CELLS = 120  # heatmaps with at most this many cells print their values
FRAME_SIDE = 256  # longest side of an animation frame's image, in pixels (the label band comes on top)
FRAME_MIN_WIDTH = 112  # the widest label line ("(the sampler's output)") needs about 104 pixels
LABEL_BAND = 30  # pixels of label above each animation frame
ANIMATION_STEPS = 8  # captured steps the animation sweeps through, by default
FRAME_MS = 120  # milliseconds per animation frame, by default
EXTRA_HINT = (
    "install the analysis extra: uv sync --extra analysis "
    "(or pip install 'flux-intermediate-representation[analysis]')"
)


def require(module: str) -> Any:
    """Import an optional dependency of the analysis extra, or raise a UserError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise UserError(f"Analysis needs {top}, which is not installed; {EXTRA_HINT}.") from e


def check_extra() -> None:
    """Raise the UserError naming the analysis extra unless pandas and matplotlib import: call it before
    a long run that will analyze its capture at the end."""
    require("pandas")
    require("matplotlib")


# ------------------------------------------------------------------------------------------ capture facts


def n_double_blocks(meta: dict) -> int:
    """Double blocks in the captured model (19 for FLUX.1, 2 for flux-tiny): where single blocks start."""
    from flux.configs import CONFIGS

    if meta.get("model") not in CONFIGS:
        raise UserError(f"The capture is of model {meta.get('model')!r}, which this tool does not know.")
    return CONFIGS[meta["model"]].params.depth


def depth_of(stream: str, block: int, n_double: int) -> int:
    """Position in the network: double block i is i, single block i is n_double + i."""
    return block if stream == "double" else n_double + block


def default_output_dir(path: str | Path) -> Path:
    """`{capture parent}/analysis/{capture stem}/`, beside `decoded/{capture stem}/` of the lens."""
    from flux.store import beside_capture

    folder, stem = beside_capture(path, "analysis")
    return folder / stem


def decoded_dir(path: str | Path) -> Path:
    """Where the lens wrote this capture's JPEGs: `{capture parent}/decoded/{capture stem}/` beside the path
    as given or, for a symlink, beside its target (where the lens of the run itself went)."""
    from flux.store import beside_capture

    beside_link, beside_target = (
        Path.joinpath(*beside_capture(p, "decoded")) for p in (path, Path(path).resolve())
    )
    return beside_target if not beside_link.is_dir() and beside_target.is_dir() else beside_link


def lens_folder(path: str | Path, keys: list[LensKey]) -> tuple[Path, list[LensKey]]:
    """The lens folder of this capture holding the most of `keys` as x0 JPEGs, the run's own (`decoded_dir`)
    or a later `decode`'s (`{stem}_1`, ...), and the keys it lacks. A folder named like that which is
    another capture's lens (two runs started in one second: `{stem}_{4 hex digits}`) is not this one's."""
    own = decoded_dir(path)
    captures = own.parent.parent  # decoded/ sits beside the captures
    best, best_missing = own, list(keys)
    for folder in (own, *sorted(own.parent.glob(f"{glob.escape(own.name)}_*"))):
        name = folder.name
        if folder != own and (
            not name.removeprefix(f"{own.name}_").isdigit()
            or (captures / name).exists()
            or (captures / f"{name}.pt").exists()
        ):
            continue
        if folder.is_dir():
            missing = [k for k in keys if lens_jpeg(folder, k) is None]
            if len(missing) < len(best_missing):
                best, best_missing = folder, missing
    return best, best_missing


def latest_capture(folder: str | Path = "output/intermediates") -> Path:
    """The most recently written capture (`.pt` file or safetensors directory) in `folder`."""
    folder = Path(folder)
    found = [p for p in folder.glob("capture_*") if p.suffix == ".pt" or (p / "index.json").is_file()]
    if not found:
        raise UserError(
            f"No capture in {str(folder)!r}. Make one, e.g. `uv run python capture_sample.py --model "
            "flux-tiny --prompt 'a red cube' --seed 1`, or point FLUX_CAPTURE at a capture."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def describe(capture: dict) -> str:
    """A few lines on what a capture holds: run settings, steps, blocks, tensor shapes."""
    meta, ctx = capture["metadata"], capture["denoising_context"]
    steps = meta["captured_steps"]
    ts = ", ".join(f"{k}: {float(ctx['timestep_pairs'][k][0]):.3f}" for k in steps)
    blocks = meta["captured_blocks"]
    lines = [
        f"model {meta['model']}, {meta['width']}x{meta['height']} px, seed {meta['seed']}, "
        f"{meta['num_steps']} steps, guidance {meta['guidance']}",
        f"prompt: {meta['prompt']!r}",
        f"captured steps (t_curr): {ts}",
        f"captured blocks: double {blocks['double']}, single {blocks['single']}",
        f"streams: {meta.get('streams', 'both')}; block outputs in {meta.get('capture_dtype')}, "
        f"model ran in {meta.get('dtype')}",
        "shapes per step:",
    ]
    lines += [f"  {key}: {tuple(shape)}" for key, shape in meta.get("shapes", {}).items()]
    for key in ("txt", "y", "final_latent"):
        if isinstance(ctx.get(key), Tensor):
            lines.append(f"  context {key}: {tuple(ctx[key].shape)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- metrics


def _compare(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(cosine similarity, |a - b| / |b|) of two tensors, flattened, in float64."""
    a, b = a.double().flatten(), b.to(a.device).double().flatten()
    cosine = (a @ b) / (a.norm() * b.norm())
    return cosine.item(), ((a - b).norm() / b.norm()).item()


def _reference_source(capture: dict) -> tuple[str, int | None]:
    """Where the reference prediction comes from: ("pred", None) when the capture recorded the model's
    prediction, else ("single block N", N) when the last block was captured, else ("img_state", None)."""
    if capture["denoising_context"].get("pred") is not None:
        return "pred", None
    meta = capture["metadata"]
    from flux.configs import CONFIGS

    last = CONFIGS[meta["model"]].params.depth_single_blocks - 1
    if f"block_{last}" in capture["single_blocks"] and meta.get("streams", "both") != "txt":
        return f"single block {last}", last
    return "img_state", None


def _euler_prediction(ctx: dict, step: int) -> Tensor | None:
    """The model's prediction at `step`, recovered from the sampler's update; None if the data is missing."""
    t_curr, t_prev = (float(t) for t in ctx["timestep_pairs"][step])
    if step + 1 < len(ctx["img_state"]):
        after = ctx["img_state"][step + 1]
    elif step + 1 == len(ctx["timestep_pairs"]) and ctx.get("final_latent") is not None:
        after = ctx["final_latent"]
    else:
        return None  # an interrupted run
    return (after.double() - ctx["img_state"][step].double()) / (t_prev - t_curr)


@torch.inference_mode()
def block_metrics(capture: dict, final_layer: LastLayer | None = None, *, norms: bool = True):
    """One long DataFrame (columns COLUMNS) of per-block, per-step metrics, sorted by depth then step.

    With `final_layer`, the four SIMILARITY_METRICS (see the module docstring); x0 metrics are left out when
    the capture has no final_latent (an interrupted run). With `norms`, the NORM_METRICS of each stream
    captured. Reads each block output once; `df.attrs["reference"]` names the reference prediction used.
    """
    pd = require("pandas")
    meta, ctx = capture["metadata"], capture["denoising_context"]
    n_double = n_double_blocks(meta)
    similarity = final_layer is not None and meta.get("streams", "both") != "txt"
    if final_layer is not None and not similarity:
        print("This capture holds only text tokens (--streams txt): no similarity metrics.", file=sys.stderr)
    reference, ref_block = _reference_source(capture)
    final_latent = ctx.get("final_latent")
    n_prompt = len(meta.get("t5_tokens") or ())  # text positions after these are T5's padding
    steps = list(meta["captured_steps"])
    blocks = [
        (stream, int(name.removeprefix("block_")))
        for stream in STREAMS
        for name in capture[f"{stream}_blocks"]
    ]
    rows = []
    for position, step in enumerate(steps):
        t_curr = float(ctx["timestep_pairs"][step][0])
        ref_pred = img_state = None
        if similarity:
            img_state = ctx["img_state"][step]
            if reference == "pred":
                ref_pred = ctx["pred"][step]
            elif ref_block is None:
                ref_pred = _euler_prediction(ctx, step)
            else:
                ref_key = LensKey("single", ref_block, step, position)
                ref_pred = lens_velocity(capture, ref_key, final_layer)
        for key in (LensKey(stream, block, step, position) for stream, block in blocks):
            img, txt = block_tokens(capture, key)
            values = {}
            if similarity:
                pred = lens_velocity(capture, key, final_layer, img)
                if ref_pred is not None:
                    values["pred_cosine"], values["pred_rel_l2"] = _compare(pred, ref_pred)
                if final_latent is not None:
                    x0 = latent_from(img_state, pred, t_curr, 0.0)
                    values["x0_cosine"], values["x0_rel_l2"] = _compare(x0, final_latent)
            if norms:
                for name, tokens in (("img", img), ("txt", txt)):
                    if tokens is not None:
                        token_norms = tokens.float().norm(dim=-1)
                        values[f"{name}_norm_mean"] = token_norms.mean().item()
                        values[f"{name}_norm_max"] = token_norms.max().item()
                if txt is not None and 0 < n_prompt <= txt.shape[1]:
                    prompt_norms = txt[:, :n_prompt].float().norm(dim=-1)
                    values["txt_prompt_norm_mean"] = prompt_norms.mean().item()
                    values["txt_prompt_norm_max"] = prompt_norms.max().item()
            depth = depth_of(key.stream, key.block, n_double)
            rows += [(key.stream, key.block, depth, step, t_curr, m, v) for m, v in values.items()]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.sort_values(["depth", "step"], kind="stable", ignore_index=True)
    df.attrs["reference"] = reference if similarity else None
    df.attrs["n_double"] = n_double
    return df


COMPARE_METRICS = ("img_cosine", "img_rel_l2", "txt_cosine", "txt_rel_l2")


@torch.inference_mode()
def compare_captures(a: dict, b: dict):
    """How far two runs are apart, block by block and step by step: the cosine similarity and the relative
    L2 distance (|a - b| / |b|, float64) of each block output's image and of its text tokens, flattened, in
    the long format of `block_metrics` (metrics COMPARE_METRICS). Run on two prompts with one seed, it shows
    at which depth and step their streams part. Only the blocks and steps both captured are compared; the
    runs must be of one model, image size and number of steps (one grid, one noise level per step)."""
    pd = require("pandas")
    meta_a, meta_b = a["metadata"], b["metadata"]
    for key in ("model", "width", "height", "num_steps"):
        if meta_a.get(key) != meta_b.get(key):
            raise UserError(
                f"The captures differ in {key} ({meta_a.get(key)!r} and {meta_b.get(key)!r}): compare runs "
                "of one model, image size and number of steps."
            )
    steps_a, steps_b = list(meta_a["captured_steps"]), list(meta_b["captured_steps"])
    steps = sorted(set(steps_a) & set(steps_b))
    at_a, at_b = ({step: i for i, step in enumerate(s)} for s in (steps_a, steps_b))  # not list.index
    n_double, rows = n_double_blocks(meta_a), []
    for stream in STREAMS:
        names = set(a[f"{stream}_blocks"]) & set(b[f"{stream}_blocks"])
        for block in sorted(int(name.removeprefix("block_")) for name in names):
            for step in steps:
                tokens_a = block_tokens(a, LensKey(stream, block, step, at_a[step]))
                tokens_b = block_tokens(b, LensKey(stream, block, step, at_b[step]))
                t = float(a["denoising_context"]["timestep_pairs"][step][0])
                depth = depth_of(stream, block, n_double)
                for name, x, y in zip(("img", "txt"), tokens_a, tokens_b, strict=True):
                    if x is not None and y is not None:
                        cosine, rel_l2 = _compare(x, y)
                        rows.append((stream, block, depth, step, t, f"{name}_cosine", cosine))
                        rows.append((stream, block, depth, step, t, f"{name}_rel_l2", rel_l2))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.sort_values(["depth", "step"], kind="stable", ignore_index=True)
    df.attrs["n_double"] = n_double
    return df


def write_csv(df, path: str | Path) -> Path:
    """The metrics table as CSV, written atomically."""
    from flux.store import atomic_write

    return atomic_write(Path(path), lambda tmp: df.to_csv(tmp, index=False))


# ------------------------------------------------------------------------------------------------ plots


def _figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, no global backend switch."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """PNG of exactly figsize * dpi pixels, written atomically."""
    from flux.store import atomic_write

    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))


def _block_label(stream: str, block: int) -> str:
    return f"{'D' if stream == 'double' else 'S'}{block}"


def _ticks(n: int, most: int) -> list[int]:
    stride = max(1, math.ceil(n / most))
    return list(range(0, n, stride))


def plot_heatmap(
    df, family: str = "cosine", path: str | Path | None = None, *, figsize=FIGSIZE, dpi: int = DPI
):
    """Heatmap of one metric family ("cosine" or "rel_l2"): rows are blocks by depth (double blocks, then
    single blocks below a line), columns are steps. One panel for the velocity prediction, one for the x0
    estimate. Returns the Figure; saves it as PNG when `path` is given."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    fig = _figure(figsize, dpi)
    panels = [p for p in PANELS if (df["metric"] == f"{p}_{family}").any()]
    if not panels:
        raise UserError(f"The metrics hold no {FAMILIES[family]} (was the final layer given?).")
    sel = df[df["metric"].isin([f"{p}_{family}" for p in panels])]
    rows = sel[["depth", "stream", "block"]].drop_duplicates().sort_values("depth")
    steps = sel[["step", "t"]].drop_duplicates().sort_values("step")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    shown = sel["value"]
    if family == "cosine":  # bright = pointing where the model ends up
        vmin, vmax, cmap, extend = min(0.0, float(shown.min())), 1.0, "viridis", "neither"
    else:  # bright = close; distances past REL_L2_CAP share the darkest colour
        top = float(shown.max())
        vmin, vmax, cmap = 0.0, min(max(top, 1e-6), REL_L2_CAP), "viridis_r"
        extend = "max" if top > REL_L2_CAP else "neither"
    image = None
    for ax, panel in zip(axes, panels):
        sub = sel[sel["metric"] == f"{panel}_{family}"]
        grid = sub.pivot_table(index="depth", columns="step", values="value", aggfunc="first")
        grid = grid.reindex(index=rows["depth"], columns=steps["step"])
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        n_rows, n_cols = values.shape
        if n_rows * n_cols <= ANNOTATE_CELLS:
            for (r, c), v in np.ndenumerate(values):
                if np.isfinite(v):
                    shade = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.0
                    dark = shade < 0.5 if family == "cosine" else shade > 0.5
                    color = "white" if dark else "black"
                    ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7, color=color)
        n_double_rows = int((rows["stream"] == "double").sum())
        if 0 < n_double_rows < n_rows:
            ax.axhline(n_double_rows - 0.5, color="red", linewidth=1.5)
        yt = _ticks(n_rows, 40)
        ax.set_yticks(yt, [_block_label(s, b) for s, b in rows[["stream", "block"]].to_numpy()[yt]])
        ax.tick_params(axis="y", labelsize=6 if n_rows > 20 else 8)
        xt = _ticks(n_cols, 12)
        ax.set_xticks(
            xt, [f"{int(k)}\nt={t:.2f}" for k, t in steps[["step", "t"]].to_numpy()[xt]], fontsize=7
        )
        ax.set_xlabel("step")
        ax.set_title(PANELS[panel], fontsize=10)
    axes[0].set_ylabel("block (D: double-stream, S: single-stream; red line: where they meet)")
    fig.colorbar(image, ax=list(axes), label=FAMILIES[family], extend=extend)
    fig.suptitle(f"{FAMILIES[family]} to what the model produced, per block and step")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_norms(df, path: str | Path | None = None, *, figsize=FIGSIZE, dpi: int = DPI):
    """Token L2 norms through the network: top row the mean over tokens, bottom row the largest token;
    a column per stream captured (image, text), depth on x, one line per step. Returns the Figure."""
    require("matplotlib")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    streams = [s for s in ("img", "txt") if (df["metric"] == f"{s}_norm_mean").any()]
    if not streams:
        raise UserError("The metrics hold no stream norms (block_metrics was called with norms=False).")
    fig = _figure(figsize, dpi)
    axes = fig.subplots(2, len(streams), squeeze=False, sharex=True)
    steps = df[["step", "t"]].drop_duplicates().sort_values("step").to_numpy()
    norm = Normalize(0, max(len(steps) - 1, 1))
    cmap = colormaps["viridis"]
    n_double = df.attrs.get("n_double")
    for col, stream in enumerate(streams):
        for row, stat in enumerate(("mean", "max")):
            ax = axes[row, col]
            sub = df[df["metric"] == f"{stream}_norm_{stat}"]
            for i, (k, t) in enumerate(steps):
                line = sub[sub["step"] == k].set_index("depth")["value"].sort_index()
                if line.empty:  # e.g. a frame filtered in a notebook
                    continue
                # Blocks not captured are gaps (NaN), not a straight line drawn as if measured across them.
                full = line.reindex(range(int(line.index.min()), int(line.index.max()) + 1))
                ax.plot(
                    full.index,
                    full.to_numpy(),
                    marker="." if len(line) <= 20 or full.isna().any() else None,
                    color=cmap(norm(i)),
                    label=f"{int(k)} (t={t:.2f})",
                )
            if sub["value"].min() > 0 and sub["value"].max() > 10 * sub["value"].min():
                ax.set_yscale("log")  # FLUX's streams grow by orders of magnitude through the blocks
            if n_double is not None and sub["depth"].min() < n_double <= sub["depth"].max():
                ax.axvline(n_double - 0.5, color="red", linewidth=1, linestyle="--")
            ax.set_title(f"{'image' if stream == 'img' else 'text'} tokens: {stat} L2 norm", fontsize=10)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == 1:
                ax.set_xlabel("depth (double blocks, then single blocks after the red line)")
    if len(steps) <= 8:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title="step", fontsize=7, title_fontsize=7)
    else:  # a colour bar over the steps' positions, labelled with the steps themselves
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), label="step")
        at = _ticks(len(steps), 8)
        bar.set_ticks(at, labels=[str(int(steps[i][0])) for i in at])
    fig.suptitle("How large the residual streams grow, per block output and step")
    if path is not None:
        save_figure(fig, path)
    return fig


# -------------------------------------------------------------------------------------------- animation


def pick_steps(steps: list[int], most: int) -> list[int]:
    """At most `most` of `steps`, evenly spaced, first and last included (the last alone when most == 1;
    all of them when most <= 0)."""
    if most <= 0 or most >= len(steps):
        return list(steps)
    if most == 1:
        return [steps[-1]]
    return sorted({steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)})


def animation_keys(capture: dict, steps: Iterable[int] | None = None) -> list[LensKey]:
    """Frames in order: for each step, every block by depth (double 0, 1, ... then single 0, 1, ...)."""
    rank = {stream: i for i, stream in enumerate(STREAMS)}
    return sorted(lens_plan(capture, steps=steps), key=lambda k: (k.step, rank[k.stream], k.block))


def frame_size(width: int, height: int, side: int = FRAME_SIDE) -> tuple[int, int]:
    """(w, h) of an animation frame's image: longest side `side` (small images grow: labels need room),
    aspect kept, both sides even as H.264 needs."""
    scale = side / max(width, height)
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    return w + w % 2, h + h % 2


def label_frame(img: Image.Image, lines: list[str], size: tuple[int, int]) -> Image.Image:
    """The image resized to `size` under a white band holding the label lines; a narrow image (a tall
    picture) is centred in a frame FRAME_MIN_WIDTH wide, so the labels fit."""
    width = max(size[0], FRAME_MIN_WIDTH)
    frame = Image.new("RGB", (width, size[1] + LABEL_BAND), "white")
    frame.paste(
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC), ((width - size[0]) // 2, LABEL_BAND)
    )
    ImageDraw.Draw(frame).multiline_text(
        (4, 2), "\n".join(lines), fill="black", font=ImageFont.load_default()
    )
    return frame


@torch.inference_mode()
def render_frames(
    capture: dict,
    keys: list[LensKey],
    *,
    final_layer: LastLayer | None = None,
    ae=None,
    jpeg_dir: str | Path | None = None,
    final_image: Image.Image | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """Labelled frames for `keys`, then one of the final image (`progress`: a bar over decoded frames).

    A frame is read from `{jpeg_dir}/{stream}_block_{i}_step_{k}.jpg` when the lens already wrote it with
    the x0 target (see `lens_jpeg`); the others are decoded in batches (lens_latent -> decode_latents), which
    needs `final_layer` and `ae`. The final frame is `final_image`, else final_latent decoded, else left out.
    """
    meta, ctx = capture["metadata"], capture["denoising_context"]
    height, width = int(meta["height"]), int(meta["width"])
    n_double = n_double_blocks(meta)
    size = frame_size(width, height, FRAME_SIDE)

    def shrunk(img: Image.Image) -> Image.Image:
        """At the frame's size at once, as label_frame makes it: every frame's full-size image held until the
        last was ready took gigabytes (456 frames at 1024 px: 1.4 GB)."""
        return img.convert("RGB").resize(size, Image.Resampling.BICUBIC)

    images: dict[LensKey | None, Image.Image] = {}
    if jpeg_dir is not None:
        for key in keys:
            if (p := lens_jpeg(jpeg_dir, key)) is not None:
                with Image.open(p) as img:
                    images[key] = shrunk(img)
    todo: list[LensKey | None] = [k for k in keys if k not in images]
    if final_image is not None:
        images[None] = final_image
    elif ctx.get("final_latent") is not None and ae is not None:
        todo.append(None)
    if todo and (ae is None or (final_layer is None and todo != [None])):
        raise ValueError(f"{len(todo)} frames need decoding: pass final_layer and ae")
    if todo:
        device = ae.decoder.conv_in.weight.device
        batch_size = auto_batch_size(ae.params, height, width, device)
        with tqdm(total=len(todo), desc="animation frames", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                latents = [
                    ctx["final_latent"] if k is None else lens_latent(capture, k, final_layer) for k in chunk
                ]
                decoded = decode_latents(torch.cat([z.to(device) for z in latents]), ae, height, width)
                images.update((k, shrunk(to_image(x))) for k, x in zip(chunk, decoded))
                bar.update(len(chunk))
    frames = []
    for key in keys:
        t = float(ctx["timestep_pairs"][key.step][0])
        depth = depth_of(key.stream, key.block, n_double)
        # Steps from 0, as in metrics.csv, the heatmaps and the lens file names.
        lines = [f"step {key.step}  t={t:.2f}", f"{key.stream} {key.block}  (depth {depth})"]
        frames.append(label_frame(images[key], lines, size))
    if None in images:
        frames.append(label_frame(images[None], ["final image", "(the sampler's output)"], size))
    return frames


def write_gif(
    frames: list[Image.Image], path: str | Path, frame_ms: int = FRAME_MS, hold_ms: int = 1500
) -> Path:
    """An endlessly looping GIF; the last frame is held for `hold_ms`. Written atomically."""
    from flux.store import atomic_write

    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    # Octree palettes are ~10x faster than Pillow's default median cut, and look the same at 256 colours.
    frames = [f.quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    return atomic_write(
        Path(path),
        lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0
        ),
    )


def mp4_available() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def write_mp4(
    frames: list[Image.Image], path: str | Path, frame_ms: int = FRAME_MS, hold_ms: int = 1500
) -> Path:
    """H.264 MP4 through imageio-ffmpeg (must be installed); the last frame is repeated to last `hold_ms`."""
    import imageio_ffmpeg

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")  # ffmpeg reads the suffix
    fps = 1000 / frame_ms
    frames = frames + [frames[-1]] * max(0, round(hold_ms / frame_ms) - 1)
    try:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), frames[0].size, fps=fps, macro_block_size=2, ffmpeg_log_level="error"
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------- the command


def sampler_image(meta: dict, capture_path: str | Path) -> Image.Image | None:
    """The image the run wrote, if it can be found unchanged: at the path recorded in the metadata, or
    where that name sits in the run's output folder (the capture's grandparent), with the SHA-256 the
    metadata records (a deleted image's free name may have gone to another run's)."""
    from flux.store import file_sha256

    files = meta.get("files", {})
    image, digest = files.get("image"), files.get("image_sha256")
    if not image or not digest:
        return None
    for path in (Path(image), Path(os.path.abspath(capture_path)).parent.parent / Path(image).name):
        if path.is_file() and file_sha256(path) == digest:
            with Image.open(path) as img:
                return img.convert("RGB")
    return None


def lens_jpeg(jpeg_dir: str | Path, key: LensKey) -> Path | None:
    """The lens's JPEG of `key` in `jpeg_dir` if its comment says it shows that block and step's x0
    estimate, as the frames do; None if it is missing, was decoded with another target (or copied from
    another block's), or predates the lens's comments."""
    path = Path(jpeg_dir) / key.filename
    return path if path.is_file() and jpeg_comment(path) == lens_comment(key, "x0") else None


WEIGHTS_TOLERANCE = 1e-2  # relative L2 of the last block's velocity to the stored prediction


def check_same_weights(df, meta: dict, log=print) -> bool:
    """Warn (and return False) when the final layer loaded now does not give the model's own prediction
    from the last single block, as the one that ran the capture did: other weights than the run's (another
    FLUX_MODEL or --weights_dir) would make every metric and frame silently wrong. Needs the last block
    captured; an fp16 capture of a bf16 run differs by rounding only, far below the tolerance."""
    from flux.configs import CONFIGS

    last = CONFIGS[meta["model"]].params.depth_single_blocks - 1
    rows = df[(df.stream == "single") & (df.block == last) & (df.metric == "pred_rel_l2")]
    if rows.empty:
        return True
    worst = float(rows.value.max())
    if worst <= WEIGHTS_TOLERANCE:
        return True
    log(
        f"warning: the final layer loaded now does not reproduce this capture's own prediction from its last "
        f"block (relative L2 {worst:.3g}): the weights differ from the run's ({meta.get('weights', {})}). "
        "Every metric and frame is then wrong; point FLUX_MODEL or --weights_dir at the run's weights."
    )
    return False


def analyze(
    path: str | Path,
    output_dir: str | Path | None = None,
    *,
    device: str | None = None,
    animation: bool = True,
    weights_dir: str | None = None,
    animation_steps: int = ANIMATION_STEPS,
    frame_ms: int = FRAME_MS,
    progress: bool = True,
    log=print,
) -> dict[str, Path]:
    """Metrics CSV, heatmaps, norm plot and animation of one capture; returns {what: path written}.

    Loads only the final layer of the flow checkpoint (for the metrics and the frames the lens has not
    decoded yet) and, when frames must be decoded, the autoencoder; never the whole flow model.
    """
    check_extra()
    from flux.configs import get_spec
    from flux.decode import load_model_final_layer
    from flux.loading import check_weights_dir, load_ae
    from flux.options import check_output_dir
    from flux.store import fresh_dir, load_capture

    if isinstance(animation_steps, bool) or not isinstance(animation_steps, int) or animation_steps < 0:
        raise UsageError(f"--animation_steps must be a whole number >= 0; got {animation_steps!r}.")
    if isinstance(frame_ms, bool) or not isinstance(frame_ms, int) or frame_ms < 20:
        raise UsageError(f"--frame_ms must be a whole number of milliseconds >= 20; got {frame_ms!r}.")
    if not isinstance(animation, bool):
        raise UsageError(f"--animation is a switch: pass --animation or --noanimation; got {animation!r}.")
    for flag, value, default in (
        ("animation_steps", animation_steps, ANIMATION_STEPS),
        ("frame_ms", frame_ms, FRAME_MS),
    ):
        if not animation and value != default:
            raise UsageError(f"--{flag} applies only to the animation; leave it out with --animation False.")
    dev = check_device(device)
    capture = load_capture(path)
    meta = capture["metadata"]
    if not meta["captured_steps"]:
        raise UserError(
            f"No captured step of {str(path)!r} reached the disk (the run stopped before its first): "
            "there is nothing to analyse."
        )
    n_double_blocks(meta)  # an unknown model fails here, before anything loads
    spec = get_spec(meta["model"])
    check_weights_dir(spec, weights_dir)
    base = Path(output_dir) if output_dir is not None else default_output_dir(path)
    check_output_dir(base)
    has_img = meta.get("streams", "both") != "txt"
    dtype = getattr(torch, meta.get("dtype", "float32"))
    final_layer = None
    if has_img:
        final_layer = load_model_final_layer(spec, weights_dir, dev, dtype)
    else:
        log("Only text tokens were captured (--streams txt): writing the norms only.")
    # What the animation needs is loaded now, before anything is written: a missing AE fails here.
    animate = animation and has_img
    if animate:
        keys = animation_keys(capture, pick_steps(list(meta["captured_steps"]), animation_steps))
        jpegs, missing = lens_folder(path, keys)
        final_image = sampler_image(meta, path)  # else the final latent is decoded
        ae = None
        if missing or (final_image is None and capture["denoising_context"].get("final_latent") is not None):
            ae = load_ae(spec, dev, None, weights_dir)

    with fresh_dir(base) as out:  # never reused; removed if nothing could be written
        df = block_metrics(capture, final_layer)
        written = {"metrics": write_csv(df, out / "metrics.csv")}
        if has_img:
            if df.attrs["reference"] == "img_state":
                log("Reference prediction: recovered from img_state (the last single block was not captured)")
            else:
                log(f"Reference prediction: {df.attrs['reference']} (the model's own)")
                check_same_weights(df, meta, log)
            for family in FAMILIES:
                written[f"heatmap_{family}"] = out / f"heatmap_{family}.png"
                plot_heatmap(df, family, written[f"heatmap_{family}"])
        written["norms"] = out / "norms.png"
        plot_norms(df, written["norms"])

        if animate:
            reused = len(keys) - len(missing)
            if final_image is not None:
                last = "then the run's image as a final frame"
            elif capture["denoising_context"].get("final_latent") is not None:
                last = "then the final latent, decoded, as a final frame"
            else:
                last = "no final frame (the run was cut short)"
            log(
                f"Animation: {len(keys)} block frames"
                + (f", {reused} from the lens in {jpegs}" if reused else "")
                + (f", {len(missing)} to decode" if missing else "")
                + f"; {last}"
            )
            frames = render_frames(
                capture, keys, final_layer=final_layer, ae=ae, jpeg_dir=jpegs, final_image=final_image,
                progress=progress,
            )  # fmt: skip
            written["animation"] = write_gif(frames, out / "animation.gif", frame_ms)
            if mp4_available():
                written["animation_mp4"] = write_mp4(frames, out / "animation.mp4", frame_ms)
        return written


def analyze_command(
    path: str,
    output_dir: str | None = None,
    device: str | None = None,
    animation: bool = True,
    weights_dir: str | None = None,
    animation_steps: int = ANIMATION_STEPS,
    frame_ms: int = FRAME_MS,
    progress: bool = True,
) -> None:
    """Measure where in the network the image appears, and plot it, for one capture.

    Writes to output_dir (default {capture folder}/analysis/{capture name}/):
    metrics.csv (long format: stream, block, depth, step, t, metric, value; per block and step the cosine
    similarity and relative L2 distance of the block's velocity to the model's prediction and of its x0
    estimate to the final latent, and the mean/max token norm of the image and text streams),
    heatmap_cosine.png and heatmap_rel_l2.png (blocks by depth x steps, a panel each for velocity and x0),
    norms.png, and animation.gif (plus animation.mp4 when imageio-ffmpeg is installed). Loads only the
    final layer of the flow checkpoint, and the autoencoder when frames must be decoded.

    Args:
        path: A capture: a capture_*.pt file or a safetensors capture directory.
        output_dir: Where to write; default {capture folder}/analysis/{capture name}/. A folder that
            exists, given or default, is never written into; _1, _2, ... is added to its name.
        device: Torch device for the final layer and the decoder; cuda when available, else cpu.
        animation: Write the animation of the decoded blocks (default True). JPEGs the lens already wrote
            under {capture folder}/decoded/{capture name}/ with the x0 target are reused (their comment says
            so; older lenses' are not); the rest are decoded.
        weights_dir: A local directory laid out like the model's hub repo, or "hub"; default as for
            generation (FLUX_MODEL/FLUX_AE if set, flux-tiny's generated repo, else the HF cache).
        animation_steps: How many captured steps the animation sweeps through the blocks, evenly spaced
            with the first and last included (default 8; 1 for the last alone; 0 for all).
        frame_ms: Milliseconds per animation frame (default 120); the final image is held 1.5 s (the MP4: the
            nearest whole number of frames).
        progress: Show a progress bar over the animation frames that need decoding (default True).
    """
    written = analyze(
        path,
        output_dir,
        device=device,
        animation=animation,
        weights_dir=weights_dir,
        animation_steps=animation_steps,
        frame_ms=frame_ms,
        progress=progress,
    )
    for what, file in written.items():
        print(f"{what + ':':15} {file}")
