"""The lens: decode any captured block output as if it were the last block, to JPEGs and contact sheets.

For a block output h at step k, the image tokens go through the final layer with that step's vec, giving a
velocity pred (B, L, 64). The latent is then formed exactly as the sampler's Euler update
`img + (t_prev - t_curr) * pred` forms it, with t_prev replaced by 0 for the clean-image estimate:

    x0:   img_state_k + (0.0 - t_curr) * pred      (what the image would be if this block were the last)
    next: img_state_k + (t_prev - t_curr) * pred   (the latent the sampler would step to)

so the last single block at the last step reproduces the sampler's final latent bit for bit. Latents are
unpacked and run through the VAE decoder in batches sized to the free device memory, while a thread pool
encodes and writes the JPEGs of the previous batch.
"""

import contextlib
import errno
import io
import math
import operator
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.configs import ModelSpec
from flux.errors import UsageError, UserError
from flux.layers import LastLayer
from flux.loading import check_state_dict, read_flow_tensors, read_tensors
from flux.model import FluxParams
from flux.options import DECODE_TARGETS, available_host_memory
from flux.sampling import image_tokens, latent_size, unpack
from flux.store import atomic_write

TARGETS = DECODE_TARGETS  # x0, next
STREAMS = ("double", "single")
CPU_BATCH = 8  # CPU convolutions gain little from bigger batches, and progress stays visible
MAX_CUDA_BATCH = 64  # past this a bigger batch barely helps, and JPEG writing overlaps less
MAX_CELL = 256  # longest side of a contact-sheet thumbnail, in pixels
MAX_SHEET = 16_384  # longest side of a contact sheet: JPEG stops at 65,535, most viewers far sooner
LABEL_SPACE = 52  # pixels a column label needs ("step 12" over "(t=0.96)")
# Contact-sheet layout, in pixels: row-label column, column-label band, space after each cell, space
# before the final image's column.
LABEL_W, LABEL_H, PAD, FINAL_GAP = 56, 28, 4, 16


# ----------------------------------------------------------------------------- block outputs -> latents


@dataclass(frozen=True)
class LensKey:
    """One decodable block output: stream ("double" or "single"), block index, step index (from 0)."""

    stream: str
    block: int
    step: int
    position: int  # index into the block's list of captured steps

    @property
    def filename(self) -> str:
        return f"{self.stream}_block_{self.block}_step_{self.step}.jpg"


LENS_COMMENT = "flux lens: {stream} block {block}, step {step}, target {target}"


def lens_comment(key: LensKey, target: str) -> str:
    """What a lens JPEG shows, in its JPEG comment, so that nothing reads an x0 image as a `next` one."""
    return LENS_COMMENT.format(stream=key.stream, block=key.block, step=key.step, target=target)


def jpeg_comment(path: str | Path) -> str:
    """The text of a JPEG's comment ("" when it has none)."""
    with Image.open(path) as img:
        comment = img.info.get("comment", b"")
    return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)


def lens_target(path: str | Path) -> str | None:
    """The decode target a lens JPEG was written with (its comment), or None for any other image."""
    head, _, target = jpeg_comment(path).rpartition(", target ")
    return target if head.startswith("flux lens: ") and target in TARGETS else None


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def _index(k) -> int:
    """`k` as an int: an int, numpy int or one-element integer tensor; a TypeError for anything else,
    bools included (most likely a mistake, such as a boolean mask)."""
    if isinstance(k, bool) or getattr(k, "dtype", None) in (torch.bool, np.bool_):
        raise TypeError("a bool is not an index")
    return operator.index(k)


def as_indices(value: int | Iterable[int], what: str) -> list[int]:
    """Indices as plain ints, from one index or an iterable of them (see `_index`)."""
    try:
        with contextlib.suppress(TypeError):
            return [_index(value)]
        return [_index(k) for k in list(value)]
    except TypeError as e:
        raise UsageError(f"{what} must be an index or a list of indices; got {value!r}.") from e


def lens_plan(
    capture: dict, blocks: dict[str, Iterable[int]] | None = None, steps: Iterable[int] | None = None
) -> list[LensKey]:
    """The block outputs to decode, ordered by stream, block number, step; reads no tensors.

    blocks: None for every captured block, or e.g. {"double": [0, 3], "single": 37} (a stream left out
    is skipped). steps: None for every captured step, or real step indices (or one); negative ones count
    from the run's end, as in Python (-1: the last step).
    """
    meta = capture["metadata"]
    if meta.get("streams", "both") == "txt":
        raise UserError(
            "This capture holds only text tokens (--streams txt), so no block can be decoded to an image. "
            "Capture again with --streams img or --streams both."
        )
    if blocks is not None and (unknown := sorted(set(blocks) - set(STREAMS))):
        raise UsageError(f"blocks keys must be 'double' and/or 'single'; got {unknown}.")
    captured_steps = list(meta["captured_steps"])
    if not captured_steps:
        raise UserError(
            "No captured step of this capture reached the disk (the run stopped before its first captured "
            "step), so the lens has nothing to decode."
        )
    wanted_steps = captured_steps
    if steps is not None:
        wanted_steps = [k + int(meta["num_steps"]) if k < 0 else k for k in as_indices(steps, "steps")]
    if missing := sorted(set(wanted_steps) - set(captured_steps)):
        raise UsageError(
            f"Steps {missing} (--steps) were not captured; this capture holds steps {captured_steps}."
        )
    plan, wanted_set = [], set(wanted_steps)  # a set: `in` a list made this O(steps^2) per block
    for stream in STREAMS:
        captured = {int(name.removeprefix("block_")): name for name in capture[f"{stream}_blocks"]}
        wanted = captured if blocks is None else as_indices(blocks.get(stream, []), f"blocks[{stream!r}]")
        if missing := sorted(set(wanted) - set(captured)):
            raise UsageError(
                f"{stream} blocks {missing} (--blocks) were not captured; this capture holds "
                f"{sorted(captured)}."
            )
        for block in sorted(wanted):
            for position, step in enumerate(captured_steps):
                if step in wanted_set:
                    plan.append(LensKey(stream, block, step, position))
    return plan


def block_tokens(capture: dict, key: LensKey) -> tuple[Tensor | None, Tensor | None]:
    """(image tokens (B, L, D), text tokens (B, T, D)) of one captured block output; None for a stream
    the capture left out (single-block entries hold [txt; img], or one stream with --streams)."""
    out = capture[f"{key.stream}_blocks"][f"block_{key.block}"][key.position]
    if key.stream == "double":
        return out
    meta, n_txt = capture["metadata"], int(capture["denoising_context"]["txt_seq_len"])
    n_img = image_tokens(int(meta["height"]), int(meta["width"]))  # reading img_state would read a shard
    if out.shape[1] == n_txt + n_img:
        return out[:, n_txt:], out[:, :n_txt]  # text first
    if meta.get("streams", "both") == "txt" or out.shape[1] != n_img:
        if out.shape[1] != n_txt:
            raise ValueError(
                f"single block output has {out.shape[1]} tokens; expected {n_img} or {n_txt + n_img}"
            )
        return None, out
    return out, None


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """`t` on `device` (in `dtype`) without making the host wait for the device.

    A plain copy from pageable host memory waits for all work queued on the stream (on CUDA it is
    synchronous), which would stall the lens between decoder batches; from pinned memory it is queued
    like a kernel. The dtype is converted on the device: converting first would stage through pageable
    memory again.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        t = (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device, dtype)


@torch.inference_mode()
def lens_velocity(capture: dict, key: LensKey, final_layer: LastLayer, img: Tensor | None = None) -> Tensor:
    """The velocity (B, L, 64) the final layer reads from a block's image tokens with that step's vec, on
    the final layer's device and in its dtype. `img` may pass the tokens if already read."""
    if img is None:
        img, _ = block_tokens(capture, key)
    weight = final_layer.linear.weight
    vec = to_device(capture["denoising_context"]["vec"][key.step], weight.device, weight.dtype)
    return final_layer(to_device(img, weight.device, weight.dtype), vec)


def latent_from(img_state: Tensor, pred: Tensor, t_curr: float, t_to: float) -> Tensor:
    """img_state + (t_to - t_curr) * pred, in img_state's dtype: the sampler's own Euler expression, so the
    last block at the last step (t_to = t_prev = 0) gives the final latent bit for bit."""
    return to_device(img_state, pred.device) + (t_to - t_curr) * pred.to(img_state.dtype)


@torch.inference_mode()
def lens_latent(capture: dict, key: LensKey, final_layer: LastLayer, target: str = "x0") -> Tensor:
    """The latent tokens (B, L, 64) that block output `key` decodes to, in img_state's dtype, on the final
    layer's device: x0 = img_state - t_curr * pred, next = img_state + (t_prev - t_curr) * pred."""
    _check_target(target)
    ctx = capture["denoising_context"]
    pred = lens_velocity(capture, key, final_layer)
    t_curr, t_prev = (float(t) for t in ctx["timestep_pairs"][key.step])
    return latent_from(ctx["img_state"][key.step], pred, t_curr, 0.0 if target == "x0" else t_prev)


def block_latents(
    capture: dict,
    final_layer: LastLayer,
    target: str = "x0",
    blocks: dict[str, Iterable[int]] | None = None,
    steps: Iterable[int] | None = None,
) -> Iterator[tuple[LensKey, Tensor]]:
    """Yield (key, latent tokens (B, L, 64)) for each block output in `lens_plan` order."""
    for key in lens_plan(capture, blocks, steps):
        yield key, lens_latent(capture, key, final_layer, target)


# ----------------------------------------------------------------------------- latents -> pixels -> files


def decode_latents(latents: Tensor, ae: AutoEncoder, height: int, width: int, decoder=None) -> Tensor:
    """Latent tokens (N, L, 64) -> images (N, 3, H', W'), roughly in [-1, 1], on the decoder's device.

    As the reference CLI: unpack in float32, then decode under bf16 autocast on CUDA (float32 on CPU).
    `decoder` may be a compiled `ae.decoder`; H', W' are height, width rounded up to multiples of 16.
    """
    device = ae.decoder.conv_in.weight.device
    z = unpack(latents.to(device).float(), height, width)
    decoder = ae.decoder if decoder is None else decoder
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return decoder(z / ae.scale_factor + ae.shift_factor)  # = ae.decode(z)


def to_uint8(x: Tensor) -> Tensor:
    """Images (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3), truncated like the reference's `.byte()`."""
    return rearrange((127.5 * (x.float().clamp(-1, 1) + 1)).byte(), "... c h w -> ... h w c")


def to_image(x: Tensor) -> Image.Image:
    """One decoded image (3, H, W) in [-1, 1] -> PIL RGB image."""
    return Image.fromarray(to_uint8(x).cpu().numpy())


JPEG = {"format": "JPEG", "quality": 95, "subsampling": 0}  # no chroma subsampling: sharp colour edges


def save_jpeg(img: Image.Image, path: str | Path, comment: str | None = None) -> None:
    """JPEG at quality 95 without chroma subsampling, written atomically (temp file, then os.replace), with
    `comment` in its COM segment if given.

    Encoded straight into the file: Pillow lets go of the GIL while it encodes into a real file (into memory
    it holds it), so the lens's writer threads encode in parallel and leave the sampling thread alone. On a
    full disk the size it needed is measured by encoding again in memory.
    """

    options = JPEG if comment is None else {**JPEG, "comment": comment}

    def write(tmp: Path) -> None:
        with open(tmp, "w+b") as f:
            img.save(f, **options)
            # Pillow writes to the descriptor itself and takes a short write (the last bytes that fitted on
            # a filling disk) for success: a whole JPEG ends with its end-of-image marker.
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2))
            complete = f.read(2) == b"\xff\xd9"
        if not complete:
            raise OSError(errno.ENOSPC, f"{tmp.name} was cut short: the disk is full or over quota")

    def needed() -> int | None:
        try:
            buf = io.BytesIO()
            img.save(buf, **options)
            return buf.tell()
        except Exception:  # the disk-full error matters, not the size in it
            return None

    atomic_write(Path(path), write, needed=needed)


def decoder_bytes_per_image(params: AutoEncoderParams, height: int, width: int) -> int:
    """Rough peak activation memory of one image in the VAE decoder under bf16 autocast.

    The widest activation is at some resolution level l: ch * ch_mult[l + 1] channels (the input of that
    level) over (H / 2^l) x (W / 2^l) pixels. About 8 such tensors of 4 bytes (GroupNorm runs in float32
    under autocast) are alive at once; full-size FLUX at 1024 px gives ~8.6 GB. Measured on an H200 (eager,
    bench_decode): 3.76 GB at 1024 px and 0.24 GB at 256 px, so the estimate keeps a margin of about 2.3x.
    """
    levels = len(params.ch_mult)
    widest = max(
        params.ch * params.ch_mult[min(level + 1, levels - 1)] * (height >> level) * (width >> level)
        for level in range(levels)
    )
    return 8 * 4 * widest


def free_gpu_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what torch's caching allocator holds unused as free."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def auto_batch_size(params: AutoEncoderParams, height: int, width: int, device: torch.device) -> int:
    """Images per VAE decoder call: what fits in 70% of the free GPU memory; on the CPU, CPU_BATCH where
    half the available host memory holds that many (a 1024 px image takes gigabytes: a laptop decoding a
    capture on its CPU must not be pushed into swap or the OOM killer), else fewer, one at least."""
    if device.type != "cuda":
        available = available_host_memory()
        if available is None:
            return CPU_BATCH
        return max(1, min(CPU_BATCH, available // 2 // decoder_bytes_per_image(params, height, width)))
    free = free_gpu_bytes(device)
    return max(1, min(MAX_CUDA_BATCH, int(0.7 * free) // decoder_bytes_per_image(params, height, width)))


# Eager bf16 decode time per image on an H200 at 256x256, scaling with the pixel count (PERF_ANCHORS.md:
# 3.13 ms at 256 px, 70 ms at 1024 px); compiling costs ~30 s once per shape, less from inductor's cache.
EAGER_SECONDS_PER_256PX_IMAGE = 3.2e-3
COMPILE_PAYS_AFTER_SECONDS = 60.0
STABLE_BATCH_BYTES = 16 * 2**30  # the memory a GPU batch plans for, so it is the same shape on every run


def compile_pays(n: int, height: int, width: int) -> bool:
    """Whether compiling the decoder (~30 s) is likely to pay for `n` images: when eager decoding would
    take over a minute (e.g. flux-dev's 2,851 images at 1024 px, not flux-schnell's 229 at 256 px)."""
    eager = n * EAGER_SECONDS_PER_256PX_IMAGE * (height * width) / (256 * 256)
    return eager > COMPILE_PAYS_AFTER_SECONDS


def stable_batch_size(params: AutoEncoderParams, height: int, width: int, limit: int) -> int:
    """A GPU batch that depends on the image size alone (a power of two under a fixed memory budget, and under
    `limit`, the batch that fits now): capture-time and later decodes then run the same shapes, so they reuse
    one compiled graph and pick the same kernels, giving the same files."""
    fits = min(
        limit, MAX_CUDA_BATCH, max(1, STABLE_BATCH_BYTES // decoder_bytes_per_image(params, height, width))
    )
    return 2 ** int(math.log2(fits))


def chunk_sizes(n: int, batch_size: int) -> list[int]:
    """Split n items into the fewest chunks of at most batch_size, as even as possible (largest first)."""
    if n == 0:
        return []
    n_chunks = math.ceil(n / batch_size)
    base, extra = divmod(n, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


# ----------------------------------------------------------------------------- contact sheets


def cell_size(width: int, height: int, max_cell: int = MAX_CELL) -> tuple[int, int]:
    """Thumbnail (w, h) of a width x height image: the longest side capped at max_cell, aspect kept."""
    scale = min(1.0, max_cell / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def sheet_cell(width: int, height: int, n_rows: int, n_cols: int, final: bool = True) -> tuple[int, int]:
    """The thumbnail size of a contact sheet of n_rows x n_cols images of width x height (and the final
    image): `cell_size`'s, made smaller where the sheet would pass MAX_SHEET pixels (from 62 steps on)."""
    for max_cell in range(MAX_CELL, 0, -1):
        cell = cell_size(width, height, max_cell)
        if max(grid_size(n_rows, n_cols, *cell, final)) <= MAX_SHEET:
            return cell
    raise ValueError(f"a contact sheet of {n_rows} x {n_cols} images cannot fit {MAX_SHEET} pixels")


def grid_size(n_rows: int, n_cols: int, cell_w: int, cell_h: int, final: bool = True) -> tuple[int, int]:
    """Pixel (width, height) of a contact sheet.

    A LABEL_W column of row labels, then n_cols cells each followed by PAD pixels; with the final image,
    FINAL_GAP more, one cell and PAD. Vertically a LABEL_H band of column labels, then n_rows cells each
    followed by PAD.
    """
    width = LABEL_W + n_cols * (cell_w + PAD) + (FINAL_GAP + cell_w + PAD if final else 0)
    return width, LABEL_H + n_rows * (cell_h + PAD)


def make_grid(
    cells: dict[tuple[int, int], Image.Image],
    row_labels: list[str],
    col_labels: list[str],
    cell: tuple[int, int],
    final: Image.Image | None = None,
    final_label: str = "final",
) -> Image.Image:
    """A labelled contact sheet; cells maps (row, column) to a thumbnail of size `cell`, then `final`."""
    cell_w, cell_h = cell
    size = grid_size(len(row_labels), len(col_labels), cell_w, cell_h, final is not None)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for (row, col), thumb in cells.items():
        sheet.paste(thumb, (LABEL_W + col * (cell_w + PAD), LABEL_H + row * (cell_h + PAD)))
    for row, label in enumerate(row_labels):
        draw.text((2, LABEL_H + row * (cell_h + PAD) + cell_h // 2 - 6), label, fill="black", font=font)
    every = math.ceil(LABEL_SPACE / (cell_w + PAD))  # narrow cells (many steps): label every n-th column
    for col, label in enumerate(col_labels):
        if col % every:
            continue
        if draw.textlength(label, font=font) > cell_w:
            label = label.replace(" (", "\n(")  # "step k" over "(t=...)" when the cell is narrow
        draw.multiline_text((LABEL_W + col * (cell_w + PAD), 2), label, fill="black", font=font)
    if final is not None:
        x = LABEL_W + len(col_labels) * (cell_w + PAD) + FINAL_GAP
        sheet.paste(final, (x, LABEL_H))
        draw.text((x, 2), final_label, fill="black", font=font)
    return sheet


def _thumbnail(img: Image.Image, cell: tuple[int, int]) -> Image.Image:
    return img if img.size == cell else img.resize(cell, Image.Resampling.BICUBIC)


def _write_image(pixels: np.ndarray, path: Path | None, cell: tuple[int, int], comment: str) -> Image.Image:
    img = Image.fromarray(pixels)
    if path is not None:
        save_jpeg(img, path, comment)
    return _thumbnail(img, cell)


# ----------------------------------------------------------------------------- the whole lens


@dataclass
class DecodeReport:
    n_images: int  # images decoded, including the final image when decoded from final_latent
    decode_seconds: float  # final layer + VAE + JPEG writes, after the one-time warm-up
    compile_seconds: float  # one-time torch.compile and warm-up of the decoder (0 when there was none)
    seconds_per_image: float
    batch_size: int
    compiled: bool = False  # whether the decoder ran compiled (False also when compiling failed)
    files: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_size_arg(batch_size) -> int | None:
    """decode_capture's batch_size as an int (numpy ints too), or None for the default."""
    if batch_size is None:
        return None
    try:
        count = _index(batch_size)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(
            f"batch_size must be a whole number >= 1 (or None for the default); got {batch_size!r}"
        )
    return count


def _ready_decoder(
    ae: AutoEncoder,
    height: int,
    width: int,
    device: torch.device,
    compile: bool,
    batch_size: int,
    sizes: list[int],
) -> tuple[torch.nn.Module, bool, float]:
    """The decoder to run the lens with: compiled for `batch_size` if asked (falling back to eager when the
    compiler fails), and warmed up, on CUDA or when compiled, so that the compile or cuDNN's set-up happens
    once, outside the timed decode. Returns (decoder, compiled, seconds spent)."""
    if not (compile or device.type == "cuda"):
        return ae.decoder, False, 0.0
    h_lat, w_lat = latent_size(height, width)

    def warm_up(batch: int, decoder) -> None:
        decode_latents(torch.zeros(batch, h_lat * w_lat // 4, 64), ae, height, width, decoder)

    start, decoder = time.perf_counter(), ae.decoder
    if compile:
        try:
            decoder = torch.compile(ae.decoder, dynamic=False)
            warm_up(batch_size, decoder)
        except torch.cuda.OutOfMemoryError:
            raise  # not the compiler's fault: the batch does not fit, eagerly either
        except Exception as e:  # no C compiler or Triton, an inductor bug: any of them, decode eagerly
            if "out of memory" in str(e).lower():  # the compiler's wrapping of the same
                raise torch.cuda.OutOfMemoryError(str(e)) from e
            print(
                f"Compiling the VAE decoder failed, so it runs uncompiled ({type(e).__name__}: {e}).",
                file=sys.stderr,
            )
            decoder, compile = ae.decoder, False
    if not compile:
        warm_up(max(sizes, default=1), decoder)
    _sync(device)
    return decoder, compile, time.perf_counter() - start


@torch.inference_mode()
def decode_capture(
    capture: dict,
    final_layer: LastLayer,
    ae: AutoEncoder,
    out_dir: str | Path,
    *,
    target: str = "x0",
    blocks: dict[str, Iterable[int]] | None = None,
    steps: Iterable[int] | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
    progress: bool = True,
    workers: int | None = None,
    between_batches: Callable[[], None] | None = None,
) -> DecodeReport:
    """Decode captured block outputs to `{out_dir}/{stream}_block_{i}_step_{k}.jpg` plus labelled contact
    sheets `grid_double.jpg` and `grid_single.jpg` (rows: blocks, columns: steps, then the final image).

    device: where the VAE decodes (default: where ae.decoder is; it is moved there otherwise).
    batch_size: images per decoder call (default on CUDA: a power of two set by the image size within what
    the free memory allows, see `stable_batch_size`; on CPU `auto_batch_size`'s); 1 decodes one at a time.
    compile: torch.compile the decoder (default: on CUDA where it pays, see `compile_pays`). The sheets' last
    column is final_latent, decoded along with the blocks (none for a capture cut short).
    between_batches: called before each batch; it may raise to stop the lens (a failed capture write).
    """
    _check_target(target)
    batch_size = _batch_size_arg(batch_size)
    meta, ctx = capture["metadata"], capture["denoising_context"]
    height, width = int(meta["height"]), int(meta["width"])
    if (batch := ctx["img_state"][0].shape[0]) != 1:
        raise UserError(f"The lens decodes captures of one image; this one holds a batch of {batch}.")
    plan = lens_plan(capture, blocks, steps)
    device = torch.device(device) if device is not None else ae.decoder.conv_in.weight.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ae.decoder.to(device)
    decode_final = ctx.get("final_latent") is not None
    n = len(plan) + decode_final
    if compile is None:
        compile = device.type == "cuda" and compile_pays(n, height, width)
    if batch_size is None:
        batch_size = auto_batch_size(ae.params, height, width, device)
        if (
            device.type == "cuda"
        ):  # the same batch at capture time and later: one compiled graph, same kernels
            batch_size = stable_batch_size(ae.params, height, width, batch_size)
    h_lat, w_lat = latent_size(height, width)
    scale = 2 ** (len(ae.params.ch_mult) - 1)
    blocks = {stream: {key.block for key in plan if key.stream == stream} for stream in STREAMS}
    steps = {stream: {key.step for key in plan if key.stream == stream} for stream in STREAMS}
    n_rows, n_cols = max(map(len, blocks.values())), max(map(len, steps.values()))
    cell = sheet_cell(w_lat * scale, h_lat * scale, n_rows, n_cols, decode_final)

    sizes = chunk_sizes(n, batch_size)
    decoder, compile, compile_seconds = _ready_decoder(ae, height, width, device, compile, batch_size, sizes)
    if not compile:
        batch_size = max(sizes, default=1)

    # The final image comes first (it is a column of every contact sheet), then the streams, the biggest
    # sheet's first: each sheet is built and encoded as soon as its stream's images are, beside the decoding
    # of the rest, so only the last (smaller) sheet is left after the last batch. Files are named by key;
    # the order decides only which images share a decoder batch (capture-time and later decodes use the
    # same order, so they agree), and a lens stopped midway may leave the sheet of a stream it finished.
    by_stream = {stream: [key for key in plan if key.stream == stream] for stream in STREAMS}
    order = sorted((stream for stream in STREAMS if by_stream[stream]), key=lambda s: -len(by_stream[s]))
    left = {stream: len(by_stream[stream]) for stream in order}

    def latents() -> Iterator[tuple[LensKey | None, Tensor]]:
        if decode_final:
            yield None, ctx["final_latent"]
        for stream in order:
            for key in by_stream[stream]:
                yield key, lens_latent(capture, key, final_layer, target)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs: dict[LensKey | None, Future] = {}
    sheets: dict[str, Future] = {}

    def contact_sheet(stream: str) -> Path:
        """Runs in the pool after the tasks of its thumbnails (FIFO), so waiting for them cannot deadlock."""
        keys = by_stream[stream]
        rows = sorted({key.block for key in keys})
        cols = sorted({key.step for key in keys})
        row_of, col_of = {b: i for i, b in enumerate(rows)}, {k: i for i, k in enumerate(cols)}
        cells = {(row_of[key.block], col_of[key.step]): thumbs[key].result() for key in keys}
        col_labels = [f"step {k} (t={float(ctx['timestep_pairs'][k][0]):.2f})" for k in cols]
        last = thumbs[None].result() if None in thumbs else None
        sheet = make_grid(cells, [f"block {i}" for i in rows], col_labels, cell, last)
        save_jpeg(sheet, out_dir / f"grid_{stream}.jpg")
        return out_dir / f"grid_{stream}.jpg"

    start = time.perf_counter()
    items = latents()
    with (
        ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool,
        tqdm(total=n, disable=not progress, unit="img", desc="decoding blocks") as bar,
    ):

        def write(keys, pixels: Tensor, ready) -> None:
            if ready is not None:
                ready.synchronize()
            for key, px in zip(keys, pixels.numpy()):
                path, comment = (
                    (out_dir / key.filename, lens_comment(key, target)) if key is not None else (None, "")
                )
                thumbs[key] = pool.submit(_write_image, px, path, cell, comment)
                if key is not None:
                    left[key.stream] -= 1
                    if left[key.stream] == 0:  # a 38-row sheet is a 14-megapixel JPEG: start it now
                        sheets[key.stream] = pool.submit(contact_sheet, key.stream)
            bar.update(len(keys))

        # On CUDA each batch's pixels come back by an asynchronous copy, and are written only after the
        # next batch is queued: the device decodes while the host prepares latents and encodes JPEGs.
        pending = None
        for size in sizes:
            if between_batches is not None:
                between_batches()
            keys, chunk = zip(*(next(items) for _ in range(size)))
            x = torch.cat([to_device(c, device) for c in chunk])
            if compile and size < batch_size:  # one static shape: pad rather than compile again
                x = torch.cat((x, x[-1:].expand(batch_size - size, -1, -1)))
            pixels, ready = to_uint8(decode_latents(x, ae, height, width, decoder)[:size]), None
            if device.type == "cuda":
                host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                pixels, ready = host.copy_(pixels, non_blocking=True), torch.cuda.Event(blocking=True)
                ready.record(torch.cuda.current_stream(device))  # the copy's stream, on any cuda:N
            else:
                pixels = pixels.cpu()
            if pending is not None:
                write(*pending)
            pending = keys, pixels, ready
        if pending is not None:
            write(*pending)
        for thumb in thumbs.values():
            thumb.result()
        decode_seconds = time.perf_counter() - start
        grids = [sheets[stream].result() for stream in STREAMS if stream in sheets]
    return DecodeReport(
        n_images=n,
        decode_seconds=decode_seconds,
        compile_seconds=compile_seconds,
        seconds_per_image=decode_seconds / max(n, 1),
        batch_size=batch_size,
        compiled=compile,
        files=[out_dir / key.filename for key in plan],
        grids=grids,
    )


# ----------------------------------------------------------------------------- loading


def final_layer_from(
    tensors: dict[str, torch.Tensor],
    params: FluxParams,
    where: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LastLayer:
    """A LastLayer of `params` holding `tensors` ({"final_layer.<name>": tensor}, read from `where`).

    Strict: every key of the layer must be there with its shape, and no other `final_layer.*` key may be.
    """
    with torch.device("meta"):
        layer = LastLayer(params.hidden_size, 1, params.out_channels)
    state = {key.removeprefix("final_layer."): t for key, t in tensors.items()}
    check_state_dict(layer, {name: t.shape for name, t in state.items()}, where, "final layer of this model")
    layer.load_state_dict({k: t.to(device, dtype) for k, t in state.items()}, strict=True, assign=True)
    return layer.eval()


def load_final_layer(
    flow_path: str | Path,
    params: FluxParams,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LastLayer:
    """Only the `final_layer.*` tensors of a local flow checkpoint, read with safe_open (never the whole
    file)."""
    tensors = read_tensors(Path(flow_path), "final_layer.")
    return final_layer_from(tensors, params, str(flow_path), device, dtype)


def load_model_final_layer(
    spec: ModelSpec,
    weights_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LastLayer:
    """The final layer of `spec`'s flow checkpoint from wherever its weights are (a local file, the HF cache,
    or range requests to the hub): the lens over a saved capture never needs the other 24 GB."""
    tensors, where = read_flow_tensors(spec, "final_layer.", weights_dir)
    return final_layer_from(tensors, spec.params, where, device, dtype)
