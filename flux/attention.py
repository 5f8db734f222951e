"""Where the picture reads the prompt: the attention image tokens pay to text tokens, per block and step.

Every FLUX.1 block runs one attention over the joint sequence [txt; img]. For an image token (one 16x16 pixel
patch) and a text token, the attention weight, averaged over heads, is the share of that patch's attention
that is read from that token: the softmax runs over all T + L keys (text and image), so each value lies in
[0, 1], and one patch's shares over every key sum to 1. A map is one text token's shares over the latent grid.

The maps are measured on a replay of a capture (bit for bit the stored run, on the capture's device and
dtype; no text encoders) with hooks on each block's `attn_probe`, which sees q and k after QK-norm and pe.
RoPE is applied as the block's own attention applies it, then softmax(q k^T / sqrt(d)) in float32. The hooks
observe only: the replayed run is unchanged.

    uv run python capture_sample.py attention CAPTURE                      # every block, step, prompt token
    uv run python capture_sample.py attention CAPTURE --tokens fox,red --steps 0 --blocks single:0-37
"""

import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from flux.capture import CapturePlan, HookSet, format_steps
from flux.errors import UsageError, UserError
from flux.math import apply_rope
from flux.model import Flux
from flux.prompt_tokens import WORD_START, ends_word, is_special, select_tokens
from flux.sampling import StepInfo

SCORE_BYTES = 256 * 2**20  # float32 scores of one chunk of image queries: bounds the extra device memory
LABELLED_CELL = 48  # cells of a step sheet at least this wide carry their map's largest share
# Anchor colours of a dark-to-bright heat scale (black, purple, red, orange, pale yellow), interpolated.
HEAT = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
     (252, 255, 164)],
    dtype=np.float32,
)  # fmt: skip


def text_attention(
    q: Tensor,
    k: Tensor,
    pe: Tensor,
    txt_len: int,
    positions: Sequence[int] | Tensor,
    budget: int = SCORE_BYTES,
) -> Tensor:
    """The attention every image token pays to the text tokens at `positions`, averaged over heads.

    q, k: (B, H, T + L, D) after QK-norm and before RoPE, text first; pe: (B, 1, T + L, D / 2, 2, 2).
    Returns (B, N, L) float32 for the N positions. Image queries go in chunks whose float32 scores
    (B, H, chunk, T + L) stay within `budget` bytes.
    """
    q, k = apply_rope(q, k, pe)  # in q's dtype, as the block's attention sees them
    b, h, n, d = q.shape
    keys = k.float().transpose(-1, -2)
    index = torch.as_tensor(positions, dtype=torch.long, device=q.device)  # no copy when already there
    chunk = max(1, budget // (b * h * n * 4))
    shares = []
    for start in range(txt_len, n, chunk):
        shares.append(_chunk_shares(q[:, :, start : start + chunk].float(), keys, index, d**-0.5))
    return torch.cat(shares, dim=1).transpose(1, 2)


def _chunk_shares(q: Tensor, keys: Tensor, index: Tensor, scale: float) -> Tensor:
    """q (B, H, chunk, D) float32 against keys (B, H, D, T + L): the share of each key at `index`, averaged
    over heads. The softmax runs in place, so one (B, H, chunk, T + L) float32 block is the only large one."""
    scores = torch.matmul(q, keys).mul_(scale)  # (B, H, chunk, T + L)
    scores = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return (scores[..., index] / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, chunk, N)


def word_groups(
    positions: Sequence[int], tokens: Sequence[str], prompt: Sequence[str] | None = None
) -> list[tuple[str, list[int]]]:
    """The measured tokens grouped into words, in order: (the word, the indices of its tokens among the
    measured ones). A token begins a new word where T5 marks it as beginning one ('▁'), where it is
    special ('</s>', '<pad>'), where its text position does not follow the one before, and where it is
    punctuation that ends the word before it, as `--tokens` reads words: '▁', 'f', 'o', 'x', ',' are 'fox'
    and ','; "don't" stays one word. Whether punctuation ends a word is read from the `prompt`'s tokens
    when given (what follows may not have been measured), else from the measured tokens up to a gap.
    Words are written without the '▁'; punctuation before a word without a space is part of it, as T5
    spells it ('(fox')."""

    def ends_a_word(n: int) -> bool:
        if prompt is not None and positions[n] <= len(prompt):
            return ends_word(prompt, positions[n])
        run = n
        while run + 1 < len(positions) and positions[run + 1] == positions[run] + 1:
            run += 1
        return ends_word(tokens[: run + 1], n)

    groups: list[tuple[str, list[int]]] = []
    for n, (position, token) in enumerate(zip(positions, tokens)):
        joins = (
            n > 0
            and position == positions[n - 1] + 1
            and not token.startswith(WORD_START)
            and not is_special(token)
            and not is_special(tokens[n - 1])
            and not (any(c.isalnum() for c in groups[-1][0]) and ends_a_word(n))
        )
        if joins:
            groups[-1] = (groups[-1][0] + token, groups[-1][1] + [n])
        else:
            groups.append((token.removeprefix(WORD_START), [n]))
    return groups


def sum_words(maps: Tensor, words: list[tuple[str, list[int]]], positions: Sequence[int], dim: int) -> Tensor:
    """`maps` with its token dimension `dim` (the measured `positions`) summed into one entry per word, in
    one pass into a tensor of the words' size (no copy per word)."""
    index = {position: n for n, position in enumerate(positions)}
    word_of = torch.empty(len(positions), dtype=torch.long)
    for w, (_, word_positions) in enumerate(words):
        word_of[[index[p] for p in word_positions]] = w
    shape = list(maps.shape)
    shape[dim] = len(words)
    return maps.new_zeros(shape).index_add_(dim, word_of.to(maps.device), maps)


def block_names(plan: CapturePlan) -> list[str]:
    """The plan's blocks in the order they run: 'double_blocks.3', ..., 'single_blocks.10', ..."""
    return [f"double_blocks.{i}" for i in plan.double] + [f"single_blocks.{i}" for i in plan.single]


class AttentionRecorder(HookSet):
    """Hooks on the `attn_probe` of each named block that record `text_attention` at `steps`, into
    `self.maps[(step, block name)]` (B, N, L), for the duration of a `with` block; each step's maps move to
    the CPU before the next step (and on `to_host()`).

    Set `step` (or pass `on_step` as denoise's before_step); `offset` is added to the sampler's step index,
    for replays that start past step 0.
    """

    def __init__(
        self,
        model: Flux,
        blocks: Sequence[str],
        steps: Sequence[int],
        txt_len: int,
        positions: Sequence[int],
        offset: int = 0,
    ):
        self.model, self.blocks, self.steps = model, list(blocks), set(steps)
        self.txt_len, self.positions, self.offset = txt_len, list(positions), offset
        self.index: Tensor | None = None  # the positions on the model's device
        self.step: int | None = None
        self.maps: dict[tuple[int, str], Tensor] = {}
        self.handles: list = []

    def install(self) -> None:
        for name in self.blocks:
            probe = self.model.get_submodule(f"{name}.attn_probe")
            self.handles.append(probe.register_forward_hook(self._hook(name)))

    def on_step(self, info: StepInfo) -> None:
        self.to_host()
        self.step = info.index + self.offset

    def to_host(self) -> None:
        """Move the maps recorded on the device to the CPU: once a step (before the next), not once a block,
        as each move waits for the device."""
        for key, value in self.maps.items():
            if value.device.type != "cpu":
                self.maps[key] = value.cpu()

    def _hook(self, name: str):
        def hook(_module, args, _output) -> None:
            if self.step is None:
                raise UsageError(
                    "AttentionRecorder.step is not set: set it, or pass the recorder's on_step as denoise's "
                    "before_step."
                )
            if self.step in self.steps:
                q, k, pe = args
                if self.index is None or self.index.device != q.device:  # made once: each copy to a GPU waits
                    self.index = torch.tensor(self.positions, dtype=torch.long, device=q.device)
                self.maps[(self.step, name)] = text_attention(q, k, pe, self.txt_len, self.index)

        return hook


@dataclass
class AttentionMaps:
    """Attention from image tokens to text tokens: maps[s, b] is steps[s] at blocks[b], (B, N, h, w) for the
    N text tokens `tokens` (at text positions `positions`) over the h x w latent grid (image / 16)."""

    maps: Tensor  # (S, K, B, N, h, w) float32
    steps: list[int]
    blocks: list[str]  # 'double_blocks.3', 'single_blocks.10'
    positions: list[int]
    tokens: list[str]
    replay: object | None = field(default=None, repr=False)  # the ReplayResult the maps were measured on
    metadata: dict | None = field(default=None, repr=False)  # as saved by the `attention` command
    prompt: list[str] | None = field(default=None, repr=False)  # the capture's T5 tokens, where recorded

    def get(self, block: str, step: int, token: int | str) -> Tensor:
        """The (B, h, w) map of one block at one step for one token: its text position, or its string if
        it was measured once (a token at two positions, such as '▁red' in 'a red fox, a red fox', is named
        by position)."""
        if isinstance(token, str):
            if token not in self.tokens:
                raise KeyError(f"{token!r} is not among the measured tokens {self.tokens}")
            if self.tokens.count(token) > 1:
                at = [p for p, t in zip(self.positions, self.tokens) if t == token]
                raise KeyError(f"{token!r} was measured at text positions {at}: name one of them")
            n = self.tokens.index(token)
        elif token in self.positions:
            n = self.positions.index(token)
        else:
            raise KeyError(f"text position {token} is not among the measured positions {self.positions}")
        return self.maps[self.steps.index(step), self.blocks.index(block), :, n]

    def words(self) -> list[tuple[str, list[int]]]:
        """The words the measured tokens spell (`word_groups`), each with its text positions."""
        if self.prompt is None and self.tokens and set(self.tokens) == {"?"}:
            raise UserError(
                "These maps' capture does not record its prompt's T5 tokens (made by an older version), so "
                "its words are unknown: use the maps per token."
            )
        groups = word_groups(self.positions, self.tokens, self.prompt)
        return [(word, [self.positions[n] for n in index]) for word, index in groups]

    def word_maps(self) -> tuple[list[tuple[str, list[int]]], Tensor]:
        """The maps summed over the tokens of each word (`words`): each map is the share of a patch's
        attention that goes to the whole word. Returns the words with their text positions, and the
        (S, K, B, W, h, w) float32 maps of the W words."""
        words = self.words()
        return words, sum_words(self.maps, words, self.positions, dim=3)

    def to_dict(self) -> dict:
        """Plain tensors, lists and strings: what `torch.load(..., weights_only=True)` reads back."""
        return {k: getattr(self, k) for k in ("maps", "steps", "blocks", "positions", "tokens", "prompt")}

    @classmethod
    def load(cls, path: str | Path) -> "AttentionMaps":
        """An attention.pt written by the `attention` command, with its `metadata` (the capture, its run's
        settings, versions)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        fields = ("maps", "steps", "blocks", "positions", "tokens")
        return cls(
            **{k: saved[k] for k in fields}, metadata=saved.get("metadata"), prompt=saved.get("prompt")
        )


def attention_maps(
    model: Flux,
    capture: dict,
    plan: CapturePlan | None = None,
    tokens: str | Sequence[int] | None = None,
    interventions: Sequence = (),
    progress: Callable | None = None,
) -> AttentionMaps:
    """Replay a capture from its first planned step (or, in an interrupted capture, the last step on disk
    before it) to its last, measuring the attention of image tokens to text tokens in the plan's blocks at
    its steps (default: all). `tokens`: text positions, or the --tokens syntax ('fox,0-1' or ['fox', 0]:
    words of the prompt and positions); default the prompt's tokens.

    The replay is the stored run bit for bit on the capture's device and dtype, or, with `interventions`
    (see flux.interventions), the altered run: the maps are then those of the altered blocks.
    """
    from flux.interventions import replay, timesteps_of

    ctx, meta = capture["denoising_context"], capture["metadata"]
    num_steps = len(timesteps_of(capture)) - 1
    plan = plan or CapturePlan.everything(model, num_steps)
    if not plan.steps or not (plan.double or plan.single):
        raise UsageError("The plan names no block or no step to measure.")
    txt_len = int(ctx["txt_seq_len"])
    if not len(ctx["img_state"]):
        raise UserError("The capture was stopped before its first step: there is no stored latent to replay.")
    if tokens is None or isinstance(tokens, str) or any(isinstance(t, str) for t in tokens):
        positions = select_tokens(tokens, meta.get("t5_tokens"), txt_len)  # words, as --tokens takes them
    else:
        positions = list(tokens)
    if bad := [p for p in positions if not 0 <= p < txt_len]:
        raise UsageError(f"Text positions {bad} are outside this capture's 0..{txt_len - 1}.")
    # An interrupted capture holds the latents of its first steps only: start from the last of those.
    start, stop = min(min(plan.steps), len(ctx["img_state"]) - 1), max(plan.steps)
    names = block_names(plan)
    recorder = AttentionRecorder(model, names, plan.steps, txt_len, positions, offset=start)
    result = replay(model, capture, start, stop, interventions, progress=progress, observers=[recorder])
    recorder.to_host()
    ids = ctx["img_ids"][0]  # (L, 3): (0, row, column) of each image token, row by row
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    maps = torch.stack(
        [torch.stack([recorder.maps[(s, name)] for name in names]) for s in plan.steps]
    )  # (S, K, B, N, L)
    # Past the prompt's tokens is padding; a capture that did not record them cannot name any ('?').
    prompt = meta.get("t5_tokens")
    tokens = [("?" if not prompt else prompt[p] if p < len(prompt) else "<pad>") for p in positions]
    return AttentionMaps(
        maps.unflatten(-1, (h, w)), list(plan.steps), names, positions, tokens, result, prompt=prompt or None
    )


# ----------------------------------------------------------------------------------- what is written
def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (h, w) -> (h, w, 3) uint8 on the HEAT scale."""
    x = np.clip(values, 0.0, 1.0) * (len(HEAT) - 1)
    low = np.minimum(x.astype(np.int64), len(HEAT) - 2)
    frac = (x - low)[..., None]
    return np.round(HEAT[low] * (1 - frac) + HEAT[low + 1] * frac).astype(np.uint8)


def share_label(share: float) -> str:
    """A share in [0, 1] as a short percentage: '0.42%', '7.3%', '64%', '100%' (not '1e+02%')."""
    return f"{100 * share:.2g}%" if share < 0.095 else f"{100 * share:.0f}%"


def step_sheet(
    maps: AttentionMaps, s: int, image: Image.Image, cell: tuple[int, int], image_label: str = "final"
) -> Image.Image:
    """Blocks down, tokens across: each map of step maps.steps[s] (batch item 0) scaled to its own maximum
    (bright: where that token is read most at that block), that maximum written in its corner as a percentage
    where the cell is wide enough, then the image."""
    from flux.decode import make_grid

    font = ImageFont.load_default()
    cells = {}
    for b in range(len(maps.blocks)):
        for n in range(len(maps.tokens)):
            values = maps.maps[s, b, 0, n].numpy()
            top = float(values.max())
            tile = Image.fromarray(heat(values / top if top > 0 else values))
            tile = tile.resize(cell, Image.Resampling.NEAREST)  # one square per image token
            if cell[0] >= LABELLED_CELL:
                draw = ImageDraw.Draw(tile)
                text = share_label(top)
                draw.rectangle((0, 0, draw.textlength(text, font=font) + 3, 12), fill="black")
                draw.text((2, 0), text, fill="white", font=font)
            cells[(b, n)] = tile
    cols = [f"{p}:{t.replace(WORD_START, ' ').strip() or '_'}" for p, t in zip(maps.positions, maps.tokens)]
    rows = [name.replace("_blocks.", " ") for name in maps.blocks]
    final = image.resize(cell, Image.Resampling.BICUBIC)
    return make_grid(cells, rows, cols, cell, final=final, final_label=image_label)


def write_shares(maps: AttentionMaps, path: Path) -> None:
    """One row per step, block and token: the mean and the largest share over the image (batch item 0)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "block", "position", "token", "mean_share", "max_share"])
        for s, step in enumerate(maps.steps):
            for b, block in enumerate(maps.blocks):
                for n, (position, token) in enumerate(zip(maps.positions, maps.tokens)):
                    values = maps.maps[s, b, 0, n]
                    out.writerow(
                        [step, block, position, token, f"{values.mean():.6g}", f"{values.max():.6g}"]
                    )


def write_words(maps: AttentionMaps, path: Path) -> None:
    """One row per step, block and word (`AttentionMaps.words`): its text positions, and the mean and the
    largest share over the image (batch item 0) of the attention paid to all of its tokens together."""
    words = maps.words()
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "block", "word", "positions", "mean_share", "max_share"])
        for s, step in enumerate(maps.steps):
            for b, block in enumerate(maps.blocks):
                summed = sum_words(maps.maps[s, b, 0], words, maps.positions, dim=0)  # one step and block
                for (word, positions), values in zip(words, summed):
                    out.writerow(
                        [
                            step,
                            block,
                            word,
                            format_steps(positions),
                            f"{values.mean():.6g}",
                            f"{values.max():.6g}",
                        ]
                    )


def attention_command(
    path: str,
    blocks: str | None = None,
    steps: str | None = None,
    tokens: str | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    weights_dir: str | None = None,
    offload: bool = False,
    progress: bool = True,
) -> None:
    """Measure where the image reads the prompt: the attention image tokens pay to each text token, per
    block and step, from a replay of the capture (bit for bit on its device and dtype; no text encoders).

    Writes {capture folder}/attention/{capture name}/ (_1, _2, ... when taken): attention.pt (the maps,
    (steps, blocks, batch, tokens, height / 16, width / 16) float32, with their steps, blocks, positions,
    tokens and the prompt's tokens), shares.csv (each map's mean and largest share), words.csv (the same
    for each word, its tokens' maps summed; where the capture records its prompt's tokens) and
    step_{k}.jpg for each step (blocks down, tokens across, each map scaled to its own maximum, which its
    corner gives as a percentage in cells 48 px wide or more, the image last).

    Args:
        path: A capture: a capture_*.pt file or a capture_* safetensors directory.
        blocks: Blocks to measure, as for capturing: 'double:0-5,single:10,37' (default all).
        steps: Steps to measure, e.g. '0,3' or '0-49:5' (default all); the replay runs from the first to
            the last (in an interrupted capture, from the last step on disk before the first).
        tokens: Text tokens to measure, default the prompt's: words of the prompt, each selecting the
            tokens that spell it wherever it stands, and positions or ranges such as '0-3' (padding
            included), separated by commas, e.g. 'fox,0-1' ('3-3' is position 3 where '3' is also a word).
        output_dir: Folder for the outputs (default: {capture folder}/attention/{capture name}).
        device: Torch device; cuda when available, else cpu. Exact replays need the capture's device.
        weights_dir: A local directory laid out like the model's hub repo, or "hub"; as for generation.
        offload: Keep the flow model in host memory and move it to the GPU for the replay only.
        progress: Show progress bars (default True).
    """
    from tqdm import tqdm

    from flux.decode import cell_size, decode_latents, save_jpeg, sheet_cell, to_image
    from flux.interventions import timesteps_of
    from flux.options import available_host_memory, check_output_dir
    from flux.store import atomic_write, beside_capture, fresh_dir, torch_save
    from flux.sweep import load_for_replay, open_for_replay, provenance

    capture, spec, dev, dtype = open_for_replay(path, device)
    ctx, meta, p = capture["denoising_context"], capture["metadata"], spec.params
    num_steps = len(timesteps_of(capture)) - 1
    plan = CapturePlan.parse(blocks, steps, "both", None, p.depth, p.depth_single_blocks, num_steps)
    if not plan.steps or not (plan.double or plan.single):
        raise UsageError("--blocks and --steps name nothing to measure.")
    txt_len = int(ctx["txt_seq_len"])
    positions = select_tokens(tokens, meta.get("t5_tokens"), txt_len)
    size = 4 * len(plan.steps) * len(block_names(plan)) * len(positions) * int(ctx["img_ids"].shape[1])
    if (free := available_host_memory()) is not None and size > free // 2:
        raise UsageError(
            f"The maps asked for take {size / 1e9:.1f} GB, more than half the {free / 1e9:.1f} GB of memory "
            "available: name fewer --tokens, --steps or --blocks."
        )
    folder, name = beside_capture(path, "attention")
    base = Path(output_dir) if output_dir else folder / name
    check_output_dir(base)
    flow, ae, visit = load_for_replay(spec, dev, dtype, weights_dir, offload)
    bar = (lambda it: tqdm(it, desc="replay", unit="step")) if progress else None
    began = time.perf_counter()
    with visit():
        maps = attention_maps(flow, capture, plan, positions, progress=bar)
    print(
        f"Measured {len(maps.blocks)} blocks x {len(maps.steps)} steps x {len(positions)} tokens in "
        f"{time.perf_counter() - began:.1f} s",
        file=sys.stderr,
    )
    final = ctx.get("final_latent")
    latent = final if final is not None else maps.replay.x0  # an interrupted run: its last step's estimate
    height, width = int(meta["height"]), int(meta["width"])
    image = to_image(decode_latents(latent.to(dev), ae, height, width)[0])
    # 96 px cells, smaller where the sheet would pass the longest side viewers open (many --tokens)
    cell = min(cell_size(width, height, 96), sheet_cell(width, height, len(maps.blocks), len(positions)))
    record = provenance(
        path, capture, image="the final image" if final is not None else "x0 of the last step replayed"
    )
    with fresh_dir(base) as out:
        atomic_write(
            out / "attention.pt", lambda tmp: torch_save({**maps.to_dict(), "metadata": record}, tmp)
        )
        write_shares(maps, out / "shares.csv")
        if maps.prompt is not None:  # else its words are unknown
            write_words(maps, out / "words.csv")
        for s, step in enumerate(maps.steps):
            label = "final" if final is not None else f"x0 step {maps.replay.stop}"
            save_jpeg(step_sheet(maps, s, image, cell, label), out / f"step_{step}.jpg")
    print(
        f"Attention: {out} (steps {format_steps(maps.steps)}; tokens "
        f"{', '.join(f'{p}:{t}' for p, t in zip(maps.positions, maps.tokens))})"
    )
