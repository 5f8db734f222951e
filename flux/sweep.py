"""Intervention sweeps and replays from the command line, and the image scores they rank by.

`sweep` applies one intervention to each block in turn (see `flux.interventions`), replays the run from the
stored latents, decodes each final image and scores it against an unmodified replay: pixel MSE, PSNR and
SSIM on images mapped to [0, 1], and the MSE of the final latent tokens.
"""

import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm.auto import tqdm

from flux.autoencoder import AutoEncoder
from flux.capture import CapturePlan
from flux.errors import UsageError, UserError
from flux.interventions import (
    KINDS,
    TOKENS,
    Intervention,
    check_steps_replayed,
    default_tokens,
    format_steps,
    load_direction,
    parse_interventions,
    parse_steps,
    replay,
    timesteps_of,
)
from flux.model import Flux

# With --offload, the flow model visits the GPU once for this many of a sweep's replays (each visit moves
# its 23.8 GB): an interrupted sweep loses at most this many replays not yet scored.
REPLAYS_PER_VISIT = 8


# ------------------------------------------------------------------------------------------ scores
def to_unit(images: Tensor) -> Tensor:
    """Decoded images in about [-1, 1] -> float32 in [0, 1] (clamped, as the saved JPEGs are)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per image (N,) over (N, C, H, W) images in [0, 1]."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, peak 1: 10 log10(1 / MSE); inf for identical images."""
    return 10 * torch.log10(1 / mse(a, b))


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 0.01,
    K2 0.03, peak 1), averaged over pixels and channels of (N, C, H, W) images in [0, 1]. 1 = identical."""
    a, b = a.double(), b.double()  # float64: E[x^2] - mu^2 cancels badly in float32
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64, device=a.device) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepRow:
    spec: str  # the intervention, as a spec string
    stream: str
    block: int
    mse: float  # pixel MSE against the unmodified image, images in [0, 1]
    psnr: float  # dB; higher = closer to the unmodified image
    ssim: float  # 1 = structurally identical
    latent_mse: float  # MSE of the final latent tokens against the unmodified final latent
    image: Image.Image = field(repr=False)


def sweep(
    model: Flux,
    ae: AutoEncoder,
    capture: dict,
    kind: str = "skip",
    blocks: Sequence[tuple[str, int]] | None = None,
    steps: tuple[int, ...] | None = None,
    tokens: str | None = None,
    scale: float = 1.0,
    source: dict | None = None,
    direction: Tensor | None = None,
    progress: bool = True,
    done: Sequence[SweepRow] = (),
    on_reference: Callable[[Tensor, Image.Image], None] | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
    visit: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    replays_per_visit: int = 1,
) -> tuple[list[SweepRow], Image.Image, Tensor]:
    """Intervene on each block in turn, replay the run to the end, and score the final image.

    blocks: (stream, index) pairs, default every block. steps: where the intervention applies (None: all).
    Replays start from the stored latent of the first intervened step (step 0 when steps is None): the
    steps before it would run exactly as stored. The reference is an unmodified replay from the same step
    on this device (identical to the capture's final latent on the capture's device and dtype). Returns
    the rows in block order, the reference image and the reference's final latent.

    For long sweeps: `done` holds rows already scored (of an interrupted sweep), whose blocks are not
    replayed again; `on_reference(latent, image)` is called once the reference is made (to save it, or to
    check it against the one the done rows were scored against), `on_row(row)` after each new row. The
    replays run inside `visit()`, `replays_per_visit` at a time: with --offload, the flow model visits the
    GPU for them and leaves before their images are decoded (see `flux.pipeline.visiting`), so each visit's
    move is shared by several replays.
    """
    from flux.decode import decode_latents, to_image

    meta = capture["metadata"]
    height, width = int(meta["height"]), int(meta["width"])
    if blocks is None:
        blocks = [("double", i) for i in range(len(model.double_blocks))]
        blocks += [("single", i) for i in range(len(model.single_blocks))]
    ivs = [
        Intervention(kind, s, i, steps, tokens, scale, source=source, direction=direction) for s, i in blocks
    ]
    num_steps = len(timesteps_of(capture)) - 1
    txt_len = int(capture["denoising_context"]["txt_seq_len"])
    img_len = capture["denoising_context"]["img_state"][0].shape[1]
    for iv in ivs:  # fail before the first replay, not after an hour of them
        iv.check(model, num_steps, txt_len, img_len, capture["metadata"].get("model"), capture)

    # Steps before the first intervened one would replay exactly as stored: start both runs there.
    start = min(steps) if steps else 0
    with visit():
        base_latent = replay(model, capture, start).latent
    base_decoded = decode_latents(base_latent, ae, height, width)
    base = to_unit(base_decoded)
    if on_reference is not None:
        on_reference(base_latent, to_image(base_decoded[0]))
    by_spec = {r.spec: r for r in done}  # and each new row as it is scored
    todo = [iv for iv in ivs if iv.spec not in by_spec]
    bar = tqdm(total=len(ivs), desc=f"{kind} sweep", unit="block", disable=not progress)
    bar.update(len(ivs) - len(todo))
    for first in range(0, len(todo), replays_per_visit):
        group = todo[first : first + replays_per_visit]
        with visit():
            latents = [replay(model, capture, start, interventions=[iv]).latent for iv in group]
        for iv, latent in zip(group, latents):
            decoded = decode_latents(latent, ae, height, width)
            img = to_unit(decoded)
            lat_mse = ((latent.float() - base_latent.float()) ** 2).mean()
            by_spec[iv.spec] = SweepRow(
                iv.spec,
                iv.stream,
                iv.block,
                mse=float(mse(img, base)[0]),
                psnr=float(psnr(img, base)[0]),
                ssim=float(ssim(img, base)[0]),
                latent_mse=float(lat_mse),
                image=to_image(decoded[0]),
            )
            if on_row is not None:
                on_row(by_spec[iv.spec])
            bar.update()
    bar.close()
    rows = [by_spec[iv.spec] for iv in ivs]  # in block order
    return rows, to_image(base_decoded[0]), base_latent


def rank(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Most disruptive first: by pixel MSE, ties by latent MSE."""
    return sorted(rows, key=lambda r: (-r.mse, -r.latent_mse))


def write_csv(rows: Sequence[SweepRow], path: Path) -> None:
    from flux.store import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "intervention", "stream", "block", "mse", "psnr", "ssim", "latent_mse"])
            for n, r in enumerate(rank(rows), 1):
                w.writerow(
                    [
                        n,
                        r.spec,
                        r.stream,
                        r.block,
                        f"{r.mse:.6g}",
                        f"{r.psnr:.4f}",
                        f"{r.ssim:.5f}",
                        f"{r.latent_mse:.6g}",
                    ]
                )

    atomic_write(path, write)


def write_chart(rows: Sequence[SweepRow], path: Path, title: str):
    """Bar chart of pixel MSE per block, in block order (double then single), PSNR below; returns the
    Figure. An unchanged image (PSNR infinite) gets a hatched bar above the others, marked ∞: left empty, it
    would read as 0 dB, the most disruptive of all."""
    from flux.analysis import require
    from flux.store import atomic_write

    require("matplotlib")
    from matplotlib.figure import Figure

    labels = [f"{r.stream[0]}{r.block}" for r in rows]
    colors = ["tab:blue" if r.stream == "double" else "tab:orange" for r in rows]
    fig = Figure(figsize=(max(6.0, 0.22 * len(rows) + 1.5), 5.5), layout="constrained")
    ax_mse, ax_psnr = fig.subplots(2, 1, sharex=True)
    ax_mse.bar(range(len(rows)), [r.mse for r in rows], color=colors)
    ax_mse.set_ylabel("pixel MSE vs unmodified")
    ax_mse.set_title(title)
    top = 1.1 * max((r.psnr for r in rows if math.isfinite(r.psnr)), default=50.0)
    bars = ax_psnr.bar(range(len(rows)), [min(r.psnr, top) for r in rows], color=colors)
    for bar, r in zip(bars, rows, strict=True):
        if not math.isfinite(r.psnr):
            bar.set_hatch("//")
            bar.set_alpha(0.5)
            ax_psnr.text(bar.get_x() + bar.get_width() / 2, top, "∞", ha="center", va="bottom", fontsize=8)
    ax_psnr.set_ylabel("PSNR (dB; ∞: unchanged)")
    ax_psnr.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax_psnr.set_xlabel("block (d = double, s = single)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def contact_sheet(
    rows: Sequence[SweepRow], reference: Image.Image, columns: int = 8, max_cell: int = 192
) -> Image.Image:
    """The unmodified image, then each altered image in rank order, each captioned with block and MSE."""
    from flux.decode import cell_size

    cell_w, cell_h = cell_size(*reference.size, max_cell=max_cell)
    caption, pad = 26, 4
    items = [
        ("unmodified", reference),
        *((f"{r.stream} {r.block}\nmse {r.mse:.4g}", r.image) for r in rank(rows)),
    ]
    columns = min(columns, len(items))
    n_rows = math.ceil(len(items) / columns)
    sheet = Image.new(
        "RGB", (columns * (cell_w + pad) + pad, n_rows * (cell_h + caption + pad) + pad), "white"
    )
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for n, (label, img) in enumerate(items):
        x = pad + (n % columns) * (cell_w + pad)
        y = pad + (n // columns) * (cell_h + caption + pad)
        sheet.paste(img.resize((cell_w, cell_h), Image.Resampling.BICUBIC), (x, y + caption))
        draw.multiline_text((x, y), label, fill="black", font=font, spacing=1)
    return sheet


# -------------------------------------------------------------------------------------- commands
def open_for_replay(path: str, device: str | None):
    """The capture, its model spec, and the device and dtype to replay in; checks all, loads no model."""
    from flux.configs import get_spec
    from flux.options import check_device, check_replay_fits, compute_dtype
    from flux.pipeline import device_name
    from flux.store import load_capture

    device = check_device(device)
    capture = load_capture(path)
    meta = capture["metadata"]
    try:
        spec = get_spec(meta["model"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path!r} does not name a known model in its metadata ({e}).") from e
    ctx = capture["denoising_context"]
    if not len(ctx.get("img_state") or ()):
        raise UserError(f"{path!r} was stopped before its first step: there is no stored latent to replay.")
    if missing := [k for k in ("txt", "txt_ids", "img_ids", "y") if k not in ctx]:
        raise UserError(
            f"{path!r} was killed before its context was written (older versions wrote it at the end), so "
            f"it lacks {', '.join(missing)}, which a replay needs. `decode` still shows its steps."
        )
    if "final_latent" not in capture["denoising_context"]:
        print(
            f"note: {path} is an interrupted capture (steps {format_steps(meta.get('steps_done', []))} on "
            "disk): replays start from a step on disk, and there is no stored final image to compare with.",
            file=sys.stderr,
        )
    check_replay_fits(spec, device)
    if meta.get("interventions"):
        print(
            "note: this capture was made by a replay with interventions "
            f"({'; '.join(meta['interventions'])}), which are not applied again, so an unmodified replay of "
            "it does not reproduce it: its stored latents are those of the altered run from the step that "
            f"replay began at ({meta.get('replayed_steps', [0])[0]}), the first run's before.",
            file=sys.stderr,
        )
    dtype = compute_dtype(spec)
    dtype_name, here = str(dtype).removeprefix("torch."), device_name(device)
    ran_on = meta.get("device_name", here)  # captures made before device_name was recorded: unknown
    if (
        device.type != torch.device(meta.get("device", "cpu")).type
        or meta.get("dtype") != dtype_name
        or ran_on != here
    ):
        print(
            f"note: the capture ran on {meta.get('device')} ({ran_on}) in {meta.get('dtype')}; replaying on "
            f"{device} ({here}) in {dtype_name}, so an unmodified replay may differ slightly from the stored "
            "run.",
            file=sys.stderr,
        )
    return capture, spec, device, dtype


def check_on_disk(capture: dict, start: int, flag: str) -> None:
    """An interrupted capture replays only from a step whose latent reached the disk."""
    if start >= (on_disk := len(capture["denoising_context"]["img_state"])):
        raise UsageError(
            f"{flag}: the replay would start at step {start}, but this interrupted capture holds the latents "
            f"of steps 0..{on_disk - 1} only."
        )


def _check_before_loading(interventions: Sequence[Intervention], spec, capture: dict) -> None:
    """Every intervention checked against the capture's sizes (a patch source's shapes, a direction's)
    on a model built on the meta device, so a mismatch costs no 24 GB load."""
    with torch.device("meta"):
        shape_model = Flux(spec.params)
    ctx = capture["denoising_context"]
    num_steps = len(timesteps_of(capture)) - 1
    for iv in interventions:
        iv.check(shape_model, num_steps, int(ctx["txt_seq_len"]), ctx["img_ids"].shape[1], spec.name, capture)


def _check_record_fits(spec, capture: dict, device: torch.device, out: Path, steps: int) -> None:
    """Refuse, before loading, a --save_capture whose capture of every block at the `steps` replayed steps
    the host memory (it is held there until written, pinned on CUDA) or the disk cannot hold: 80 GB for
    flux-dev at 1024 px."""
    from flux.options import _existing_parent, available_host_memory, compute_dtype, model_host_bytes
    from flux.sampling import image_tokens

    p, meta = spec.params, capture["metadata"]
    plan = CapturePlan.parse(None, None, "both", None, p.depth, p.depth_single_blocks, steps)
    txt_len = int(capture["denoising_context"]["txt_seq_len"])
    img_len = image_tokens(int(meta["height"]), int(meta["width"]))
    itemsize = compute_dtype(spec).itemsize

    def size(pinned: bool) -> int:
        return steps * plan.bytes_per_step(1, txt_len, img_len, p.hidden_size, itemsize, pinned)

    held, stored = size(device.type == "cuda"), size(False)
    available, free = available_host_memory(), shutil.disk_usage(_existing_parent(out)).free
    if available is not None and device.type != "cuda":
        available -= model_host_bytes(spec)  # the flow model and the AE live in host memory too
    if (available is not None and held > 0.8 * available) or stored > free:
        raise UserError(
            f"--save_capture keeps every block output of the {steps} replayed steps: {stored / 1e9:.1f} GB, "
            f"held in host memory until written ({held / 1e9:.1f} GB there; "
            f"{'unknown' if available is None else f'{available / 1e9:.1f} GB'} available) and then on the "
            f"disk of {str(out)!r} ({free / 1e9:.1f} GB free). Replay without it, or record fewer blocks or "
            "steps from Python: replay(..., record=CapturePlan.parse(blocks, steps, ...))."
        )


def load_for_replay(
    spec, device: torch.device, dtype: torch.dtype, weights_dir: str | None, offload: bool = False
):
    """The flow model and AE (never the text encoders), once every flag has been checked, and the context
    manager each replay runs in: with `offload` the flow model lives in host memory and visits `device`
    for each replay only, leaving the GPU to the VAE while images are decoded."""
    from flux.loading import load_ae, load_flow_model
    from flux.pipeline import visiting

    where = f"the flow model on the CPU, visiting {device}" if offload else str(device)
    print(f"Loading {spec.name} (flow model, autoencoder) on {where}...", file=sys.stderr)
    flow = load_flow_model(spec, "cpu" if offload else device, dtype, weights_dir)
    visit = visiting(flow, device) if offload else contextlib.nullcontext
    return flow, load_ae(spec, device, weights_dir=weights_dir), visit


def provenance(path: str, capture: dict, **extra) -> dict:
    from flux.pipeline import package_versions

    meta = capture["metadata"]
    keep = ("model", "prompt", "width", "height", "num_steps", "seed", "guidance", "dtype", "device")
    return {
        "capture": str(Path(path).resolve()),
        "capture_metadata": {k: meta.get(k) for k in keep},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        **extra,
    }


def sweep_command(
    path: str,
    intervention: str = "skip",
    blocks: str | None = None,
    steps: str | None = None,
    tokens: str | None = None,
    scale: float = 1.0,
    source: str | None = None,
    direction: str | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    weights_dir: str | None = None,
    resume: str | None = None,
    offload: bool = False,
    progress: bool = True,
) -> None:
    """Intervene on each block in turn, replay the captured run, and rank blocks by how much it changes.

    For every block (all 57, or --blocks) the run is replayed with that one block altered, from the stored
    latent of the first step the intervention applies at (step 0 by default), and the final image is decoded
    and compared with an unmodified replay. Writes into
    {capture folder}/sweeps/{capture name}_{intervention}[_{tokens}][_steps{steps}]/ (a new folder each
    time): sweep.csv (ranked, most disruptive first), sweep.json (every row's intervention spec and scores,
    plus provenance), sweep.png (bar chart; needs the analysis extra), contact_sheet.jpg, unmodified.jpg
    and one JPEG per altered image. sweep.csv, sweep.json and the JPEGs are written as each block
    finishes, so a sweep that stops keeps its finished blocks (sweep.json: "complete": false) and --resume
    goes on from there. Only the flow model and the autoencoder are loaded, never the text encoders.

    Args:
        path: A capture: a capture_*.pt file or a capture_* safetensors directory.
        intervention: skip (default; the block passes its input through), zero (drop the block's update of
            --tokens only), patch (--tokens from the --source capture at the same block and step) or add
            (--scale x the --direction tensor added to the image tokens).
        blocks: Blocks to sweep, e.g. "double:0-5,single:10" (default: all).
        steps: Steps at which the intervention applies, e.g. "0", "0-2" (default: all).
        tokens: img, txt or both, for zero and patch (default both; add uses img).
        scale: Multiplier of the direction for add (default 1).
        source: The capture to patch from (same model, width, height, steps and text length; e.g. another
            prompt or seed).
        direction: A .pt (or .safetensors) file holding one tensor of shape (D,) or (1, L, D), for add.
        output_dir: Folder for the results (default: beside the capture, as above). A folder that exists
            is never written into; _1, _2, ... is added to its name.
        device: Torch device; cuda when available, else cpu. Exact replays need the capture's device.
        weights_dir: A local directory laid out like the model's hub repo, or "hub"; as for generation.
        resume: The folder of a sweep that stopped: its finished blocks are kept and the others run, into
            that folder. The other flags must be those it was started with; the unmodified replay must
            come out the same (the same device and versions), or the sweep is refused.
        offload: Keep the flow model in host memory and move it to the GPU for the replays only, so that the
            VAE has the GPU to itself while decoding (a 24 GB card at 1024 px). Each move takes seconds and
            serves up to 8 replays (those of 8 blocks), whose images are then decoded.
        progress: Show progress bars (default True).
    """
    from flux.store import load_capture

    scale = _check_sweep_flags(intervention, tokens, scale, source, direction)
    capture, spec, device, dtype = open_for_replay(path, device)
    p = spec.params
    num_steps = len(timesteps_of(capture)) - 1
    plan = CapturePlan.parse(blocks, None, "both", None, p.depth, p.depth_single_blocks, num_steps)
    chosen = [("double", i) for i in plan.double] + [("single", i) for i in plan.single]
    step_set = parse_steps(steps, num_steps, "--steps")
    src = load_capture(source) if source is not None else None
    direction_tensor = load_direction(direction)
    planned = [
        Intervention(
            intervention, stream, block, step_set, tokens, scale, source=src, direction=direction_tensor
        )
        for stream, block in chosen
    ]
    _check_before_loading(planned, spec, capture)
    check_on_disk(capture, min(step_set) if step_set else 0, "--steps")
    settings = {
        "capture": str(Path(path).resolve()),
        "kind": intervention,
        "steps": format_steps(step_set),
        "tokens": tokens or default_tokens(intervention),
        "scale": scale,
        "source": str(Path(source).resolve()) if source else None,
        "direction": str(Path(direction).resolve()) if direction else None,
        "blocks": [f"{stream}:{block}" for stream, block in chosen],
    }
    if resume is not None:
        if output_dir is not None:
            raise UsageError("--resume writes into the sweep's own folder: leave out --output_dir.")
        files = _SweepFiles.resumed(Path(resume), path, capture, settings)
    else:
        label = (
            intervention + (f"_{tokens}" if tokens else "") + (f"_steps{settings['steps']}" if steps else "")
        )
        files = _SweepFiles.new(path, capture, settings, output_dir, label)
    chart = importlib.util.find_spec("matplotlib") is not None
    if not chart:
        print(
            "matplotlib is not installed (the analysis extra: `uv sync --extra analysis`), so this sweep is "
            "written without sweep.png.",
            file=sys.stderr,
        )
    # Now that every flag is checked:
    flow, ae, visit = load_for_replay(spec, device, dtype, weights_dir, offload)
    files.replay_device = ae.decoder.conv_in.weight.device
    try:
        rows, reference, _ = sweep(
            flow,
            ae,
            capture,
            intervention,
            chosen,
            step_set,
            tokens,
            scale,
            source=src,
            direction=direction_tensor,
            progress=progress,
            done=list(files.rows),
            on_reference=files.start,
            on_row=files.add,
            visit=visit,
            replays_per_visit=REPLAYS_PER_VISIT if offload else 1,
        )
    except BaseException:
        if files.out is not None:
            print(
                f"The sweep stopped after {len(files.rows)} of {len(planned)} blocks; their results are in "
                f'{files.out} (sweep.json says "complete": false). To go on, run the same command with '
                f"--resume {files.out}",
                file=sys.stderr,
            )
        raise
    title = (
        f"{intervention} sweep{f' of {tokens} tokens' if tokens else ''}: {capture['metadata'].get('model')} "
        f"(steps {settings['steps']})"
    )
    files.finish(rows, reference, title if chart else None)
    top = ", ".join(f"{r.stream} {r.block} (mse {r.mse:.4g})" for r in rank(rows)[:5])
    print(f"Most disruptive: {top}")
    print(f"Sweep:    {files.out}")


def _check_sweep_flags(
    intervention: str, tokens: str | None, scale, source: str | None, direction: str | None
) -> float:
    """The sweep's flags checked against each other before anything is read; returns --scale as a float."""
    if intervention not in KINDS:
        raise UsageError(f"--intervention must be one of {', '.join(KINDS)}; got {intervention!r}.")
    if tokens is not None and tokens not in TOKENS:
        raise UsageError(f"--tokens must be img, txt or both; got {tokens!r}.")
    if intervention == "patch" and source is None:
        raise UsageError(
            "--intervention patch needs --source CAPTURE (the capture to take activations from)."
        )
    if intervention == "add" and direction is None:
        raise UsageError("--intervention add needs --direction FILE (a .pt file holding one tensor).")
    try:
        scale = float(scale)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--scale must be a number; got {scale!r}.") from e
    if not math.isfinite(scale):  # every image would be NaN, and its scores NaN too
        raise UsageError(f"--scale must be a finite number; got {scale}.")
    # A flag the intervention would ignore is refused: the results would be recorded as if it had applied.
    for flag, given, kind in (
        ("scale", scale != 1.0, "add"),
        ("direction", direction, "add"),
        ("source", source, "patch"),
    ):
        if given and intervention != kind:
            raise UsageError(f"--{flag} applies only to --intervention {kind}, not {intervention}.")
    return scale


@dataclass(eq=False)
class _SweepFiles:
    """A sweep's folder as the sweep runs. The folder is made once the unmodified replay is scored
    (`start`), and sweep.csv and sweep.json are rewritten after every block (`add`), so a sweep that stops
    keeps what it has done and `--resume` goes on from there; `finish` adds the chart and contact sheet."""

    path: str  # the capture swept
    capture: dict
    settings: dict  # the flags that define the sweep, recorded and compared on --resume
    target: Path  # the folder to write into: new (made by `start`), or a stopped sweep's own
    resuming: bool
    rows: list[SweepRow] = field(default_factory=list)  # finished, in the order they finished
    resumed_digest: str | None = None  # the reference the resumed rows were scored against
    replay_device: torch.device | None = None
    out: Path | None = None  # the folder, once made
    digest: str | None = None  # SHA-256 of this run's unmodified final latent
    vs_stored: float | None = None  # its MSE against the stored final latent

    @classmethod
    def new(
        cls, path: str, capture: dict, settings: dict, output_dir: str | None, label: str
    ) -> "_SweepFiles":
        from flux.options import check_output_dir
        from flux.store import beside_capture

        sweeps, stem = beside_capture(path, "sweeps")
        target = Path(output_dir) if output_dir else sweeps / f"{stem}_{label}"
        check_output_dir(target)
        return cls(path, capture, settings, target, resuming=False)

    @classmethod
    def resumed(cls, folder: Path, path: str, capture: dict, settings: dict) -> "_SweepFiles":
        out, done, digest = _resumable(folder, settings)
        return cls(path, capture, settings, out, resuming=True, rows=done, resumed_digest=digest)

    def start(self, latent: Tensor, image: Image.Image) -> None:
        """The unmodified replay is done: check it against a resumed sweep's, make the folder, save it."""
        from flux.decode import save_jpeg
        from flux.store import new_dir

        self.digest = latent_digest(latent)
        if self.resumed_digest is not None and self.digest != self.resumed_digest:
            raise UserError(
                f"The unmodified replay differs from the one the sweep in {str(self.target)!r} was scored "
                "against (another device, dtype or library version?), so new rows would not compare with its "
                "rows. Start a new sweep: leave out --resume."
            )
        final = self.capture["denoising_context"].get("final_latent")  # none in an interrupted capture
        self.vs_stored = (
            None if final is None else float(((latent.float().cpu() - final.float()) ** 2).mean())
        )
        self.out = self.target if self.resuming else new_dir(self.target)
        save_jpeg(image, self.out / "unmodified.jpg")
        self.save(complete=False)

    def add(self, row: SweepRow) -> None:
        from flux.decode import save_jpeg

        save_jpeg(row.image, self.out / f"{row.stream}_block_{row.block}.jpg")
        self.rows.append(row)
        self.save(complete=False)

    def finish(self, rows: list[SweepRow], reference: Image.Image, chart_title: str | None) -> None:
        """Every block is done: the chart (when matplotlib is there), the contact sheet, and the record."""
        from flux.decode import save_jpeg

        self.rows = rows  # in block order
        if chart_title is not None:
            write_chart(rows, self.out / "sweep.png", chart_title)
        save_jpeg(contact_sheet(rows, reference), self.out / "contact_sheet.jpg")
        self.save(complete=True)

    def save(self, complete: bool) -> None:
        """sweep.csv and sweep.json as they stand."""
        from flux.pipeline import device_name
        from flux.store import write_json

        write_csv(self.rows, self.out / "sweep.csv")
        record = {k: v for k, v in self.settings.items() if k != "capture"}
        write_json(
            self.out / "sweep.json",
            provenance(
                self.path,
                self.capture,
                **record,
                complete=complete,
                blocks_done=len(self.rows),
                reference="unmodified replay on this device",
                reference_latent_sha256=self.digest,
                reference_vs_stored_latent_mse=self.vs_stored,
                replay_device=str(self.replay_device),
                replay_device_name=device_name(self.replay_device),
                rows=[
                    {
                        "rank": n,
                        "intervention": r.spec,
                        "stream": r.stream,
                        "block": r.block,
                        "mse": r.mse,
                        "psnr": r.psnr,
                        "ssim": r.ssim,
                        "latent_mse": r.latent_mse,
                        "image": f"{r.stream}_block_{r.block}.jpg",
                    }
                    for n, r in enumerate(rank(self.rows), 1)
                ],
            ),
        )


def latent_digest(latent: Tensor) -> str:
    """SHA-256 of a latent's bytes: how a resumed sweep knows its reference is the one its rows were
    scored against."""
    data = latent.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _resumable(out: Path, settings: dict) -> tuple[Path, list[SweepRow], str]:
    """(folder, rows already done, reference digest) of an interrupted sweep that `settings` continue;
    UsageError when it is not one, or was made with other flags."""
    try:
        state = json.loads((out / "sweep.json").read_text())
        recorded = {**{k: state[k] for k in settings if k != "capture"}, "capture": state["capture"]}
        rows = [
            SweepRow(
                r["intervention"],
                r["stream"],
                int(r["block"]),
                mse=float(r["mse"]),
                psnr=math.inf if r["psnr"] is None else float(r["psnr"]),
                ssim=float(r["ssim"]),
                latent_mse=float(r["latent_mse"]),
                image=_read_image(out / r["image"]),
            )
            for r in state["rows"]
        ]
        complete, digest = bool(state["complete"]), str(state["reference_latent_sha256"])
    except FileNotFoundError as e:
        raise UsageError(f"--resume {str(out)!r}: no sweep to resume there ({e.filename} is missing).") from e
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UsageError(
            f"--resume {str(out)!r}: its sweep.json or images cannot be read ({type(e).__name__}: {e})."
        ) from e
    if complete:
        raise UsageError(f"--resume {str(out)!r}: that sweep is complete; there is nothing to resume.")
    if differ := [k for k in settings if settings[k] != recorded[k]]:
        said = [f"{k}: {recorded[k]!r} there, {settings[k]!r} now" for k in differ if k != "blocks"]
        said += ["other --blocks"] * ("blocks" in differ)
        raise UsageError(
            f"--resume {str(out)!r}: that sweep was made with other settings ({'; '.join(said)}). Give the "
            "flags it was started with."
        )
    return out, rows, digest


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def replay_command(
    path: str,
    step: int = 0,
    until: int | None = None,
    intervention: str | None = None,
    source: str | None = None,
    direction: str | None = None,
    output_dir: str | None = None,
    save_capture: bool = False,
    device: str | None = None,
    weights_dir: str | None = None,
    offload: bool = False,
    progress: bool = True,
) -> None:
    """Re-run steps of a captured run from the stored latent, optionally with interventions; save the image.

    Writes {capture folder}/replays/replay_{n}.jpg (next free n) and replay_{n}.json with the interventions
    and scores against the stored final image; with --save_capture also replay_{n}.pt, a capture of the
    replayed steps whose metadata["interventions"] lists the specs. Intervention specs:
    KIND:STREAM:BLOCK[:TOKENS][@STEPS][*SCALE], several joined by ';', e.g. "skip:double:3@0-2",
    "zero:single:10:img", "patch:single:10:img@all", "add:double:5@0*4.0".

    Args:
        path: A capture: a capture_*.pt file or a capture_* safetensors directory.
        step: First step to replay (default 0: from the stored initial noise).
        until: Last step to replay, inclusive (default: the last step). Before the last step the image is
            the clean-image estimate of step `until`, as the lens shows it.
        intervention: Intervention specs (see above); default none, which reproduces the stored run.
        source: The capture to patch from, for patch.
        direction: A .pt (or .safetensors) file holding one tensor of shape (D,) or (1, L, D), for add.
        output_dir: Folder for the outputs (default: {capture folder}/replays).
        save_capture: Also write a capture of the replayed steps (needs the replay to run to the last step).
        device: Torch device; cuda when available, else cpu. Exact replays need the capture's device.
        weights_dir: A local directory laid out like the model's hub repo, or "hub"; as for generation.
        offload: Keep the flow model in host memory and move it to the GPU for the replay only, so that the
            VAE has the GPU to itself while decoding (a 24 GB card at 1024 px).
        progress: Show progress bars (default True).
    """
    from flux.decode import decode_latents, to_image
    from flux.options import check_output_dir
    from flux.store import beside_capture, load_capture

    step = 0 if step is None else step  # `--step None` asks for the default, as for any other flag
    for flag, value in (("step", step), ("until", until)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"--{flag} must be a step index (a whole number); got {value!r}.")
    capture, spec, device, dtype = open_for_replay(path, device)
    p, meta = spec.params, capture["metadata"]
    num_steps = len(timesteps_of(capture)) - 1
    _check_replay_steps(step, until, num_steps, save_capture)
    ivs = parse_interventions(
        intervention,
        p.depth,
        p.depth_single_blocks,
        num_steps,
        source=load_capture(source) if source is not None else None,
        direction=load_direction(direction),
    )
    kinds = {iv.kind for iv in ivs}
    for flag, given, kind in (("source", source, "patch"), ("direction", direction, "add")):
        if given and kind not in kinds:  # the replay's record would name a file that played no part
            raise UsageError(
                f"--{flag} is used only by {kind}:... interventions, and --intervention names none."
            )
    _check_before_loading(ivs, spec, capture)
    check_steps_replayed(ivs, step, num_steps - 1 if until is None else until)
    check_on_disk(capture, step, "--step")
    out = Path(output_dir) if output_dir else beside_capture(path, "replays")[0]
    check_output_dir(out)
    if save_capture:
        _check_record_fits(spec, capture, device, out, num_steps - step)
    # Now that every flag is checked:
    flow, ae, visit = load_for_replay(spec, device, dtype, weights_dir, offload)
    record = CapturePlan.everything(flow, num_steps) if save_capture else None
    bar = (lambda steps: tqdm(steps, desc="replay", unit="step")) if progress else None
    with visit():
        result = replay(flow, capture, step, until, ivs, record=record, progress=bar)
    height, width = int(meta["height"]), int(meta["width"])
    decoded = decode_latents(result.x0, ae, height, width)
    image = to_unit(decoded)
    final = capture["denoising_context"].get("final_latent")  # none in an interrupted capture
    stored = None if final is None else to_unit(decode_latents(final, ae, height, width))
    record_meta = provenance(
        path,
        capture,
        replayed_steps=[result.start, result.stop],
        interventions=[iv.spec for iv in ivs],
        source=str(Path(source).resolve()) if source else None,
        direction=str(Path(direction).resolve()) if direction else None,
        applied=[list(pair) for pair in result.applied],  # [spec, step] of every change made
        vs_stored_final=None
        if stored is None
        else {"mse": float(mse(image, stored)[0]), "psnr": float(psnr(image, stored)[0])},
    )
    _write_replay(out, to_image(decoded[0]), record_meta, result.capture)


def _check_replay_steps(step: int, until: int | None, num_steps: int, save_capture: bool) -> None:
    """--step and --until within the capture's steps and in order; --save_capture only to the last step."""
    for flag, value in (("step", step), ("until", until)):
        if value is not None and not 0 <= value < num_steps:
            raise UsageError(f"--{flag} must be a step of this capture, 0..{num_steps - 1}; got {value}.")
    if until is not None and until < step:
        raise UsageError(
            f"--until {until} comes before --step {step}: the replay runs from --step to --until, both "
            "included."
        )
    if save_capture and until is not None and until != num_steps - 1:
        raise UsageError("--save_capture needs the replay to run to the last step: leave --until out.")


def _write_replay(out: Path, image: Image.Image, record: dict, capture: dict | None) -> None:
    """replay_{n}.jpg, its record replay_{n}.json and (a recorded replay) its capture replay_{n}.pt, under
    a number none of the three has: an image deleted by hand must not hand its number, and so its old
    .json, to this replay."""
    from flux.decode import save_jpeg
    from flux.store import atomic_write, file_sha256, next_free_index, publish_new, torch_save, write_json

    out.mkdir(parents=True, exist_ok=True)
    image_path = publish_new(
        lambda n: out / f"replay_{n}.jpg",
        lambda tmp: save_jpeg(image, tmp),
        start=max(next_free_index(out, "replay_", suffix) for suffix in (".jpg", ".json", ".pt")),
    )
    base = image_path.with_suffix("")
    record["image"] = str(image_path)
    if capture is not None:
        capture_path = base.with_suffix(".pt")
        capture["metadata"]["files"] = {
            "image": str(image_path), "image_sha256": file_sha256(image_path), "capture": str(capture_path)
        }  # fmt: skip
        capture["metadata"]["format"] = "pt"
        capture["metadata"]["replayed_from"] = {
            "capture": record["capture"],
            "source": record["source"],
            "direction": record["direction"],
        }
        atomic_write(capture_path, lambda tmp: torch_save(capture, tmp))
        record["capture_file"] = str(capture_path)
        print(f"Capture:  {capture_path}")
    write_json(base.with_suffix(".json"), record)
    print(f"Image:    {image_path}")
    print(f"Metadata: {base.with_suffix('.json')}")
    print(_replay_summary(record))


def _replay_summary(record: dict) -> str:
    """One line on what a replay changed: how many changes it made, and its image against the stored one."""
    made = len(record["applied"])
    changes = f"{made} change{'' if made == 1 else 's'} made"
    score = record["vs_stored_final"]
    if score is None:
        return f"{changes}; the capture holds no final image to compare with (its run stopped early)."
    if score["mse"] == 0:
        return f"{changes}; the image is the stored final image, exactly."
    return f"{changes}; against the stored final image: PSNR {score['psnr']:.1f} dB (MSE {score['mse']:.3g})."
