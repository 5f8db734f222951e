"""Causal interventions on FLUX.1 blocks: replay saved denoising steps, and change block outputs with hooks.

A capture holds the whole denoising context (latent fed to the model at every step, T5 and CLIP embeddings,
ids, guidance, timesteps), so any step can be run again without the text encoders. `replay` runs steps
k..m from the stored latent of step k; with no interventions it reproduces the stored block outputs and
final latent bit for bit on the device and dtype the capture was made with.

Interventions change what one block hands on, at chosen steps, through forward hooks installed only
inside an `Intervener` context (removed in `finally`):

    skip   the block is bypassed: output := input, for every token of both streams.
    zero   the block's update is dropped for the chosen tokens only: those output tokens := input tokens,
           the others keep the block's normal output. `zero:...:both` equals `skip`; `zero:...:img` differs
           in that the text tokens are still updated, by an attention that saw the unchanged image tokens.
    patch  the output tokens are replaced by the ones stored in another capture at the same block and step
           (activation patching: e.g. the same seed with another prompt).
    add    scale * direction is added to the block's image tokens (direction (D,) or broadcastable to
           (B, L, D)).

Spec strings (the CLI's `--intervention`), several joined by ';':

    KIND:STREAM:BLOCK[:TOKENS][@STEPS][*SCALE]
    skip:double:3@0-2        bypass double block 3 at steps 0, 1, 2
    zero:single:10:txt       drop single block 10's update of the text tokens at every step
    patch:single:10:img@all  image tokens of single block 10 from the --source capture, every step
    add:double:5@0*4.0       4 x the --direction tensor added to double block 5's image tokens at step 0

TOKENS is img, txt or both (default both; `add` takes img only). STEPS uses the `--steps` syntax
('0,3', '2-5', '0-49:5', 'all'; default all). SCALE only applies to `add` (default 1).
"""

import contextlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flux.capture import (
    CONTEXT_KEYS,
    BlockCapture,
    BufferPool,
    CapturePlan,
    HookSet,
    format_steps,
    parse_steps,
)
from flux.decode import LensKey, as_indices, block_tokens, to_device
from flux.errors import UsageError, UserError
from flux.model import Flux
from flux.sampling import StepInfo, denoise

KINDS = ("skip", "zero", "patch", "add")
STREAMS = ("double", "single")
TOKENS = ("img", "txt", "both")


def default_tokens(kind: str) -> str:
    """The tokens an intervention of `kind` changes when none are named: `add` the image tokens only."""
    return "img" if kind == "add" else "both"


_SPEC = re.compile(
    r"(?P<kind>\w+):(?P<stream>\w+):(?P<block>\d+)(?::(?P<tokens>\w+))?"
    r"(?:@(?P<steps>[^*]+))?(?:\*(?P<scale>[-+0-9.eE]+))?"
)
_SPEC_HELP = (
    "Write KIND:STREAM:BLOCK[:TOKENS][@STEPS][*SCALE], e.g. 'skip:double:3@0-2', 'zero:single:10:img', "
    "'patch:single:10:img@all' or 'add:double:5@0*4.0'; join several with ';'. KIND is skip, zero, patch "
    "or add; STREAM double or single; TOKENS img, txt or both; STEPS like --steps ('0,3', '2-5', 'all')."
)


# ------------------------------------------------------------------------------------- interventions
@dataclass(frozen=True)
class Intervention:
    """One change to one block's output. steps: the step indices it applies at (one index or several;
    None: every step).

    source: a capture (as `flux.load_capture` returns, or its path) for `patch`; direction: a tensor for
    `add`; fn: for kind "fn" (Python only), any change: `fn(img, txt, step) -> (img, txt)` gets the block's
    output tokens, img (B, L, D) and txt (B, T, D), and returns the tokens the next block sees.
    """

    kind: str
    stream: str
    block: int
    steps: tuple[int, ...] | None = None
    tokens: str | None = None  # img, txt or both; None: img for add, both otherwise
    scale: float = 1.0
    source: dict | None = field(default=None, compare=False, repr=False)
    direction: Tensor | None = field(default=None, compare=False, repr=False)
    fn: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.kind == "fn":
            if not callable(self.fn):
                raise UsageError(
                    "An fn intervention needs a function, so it exists in Python only: "
                    "Intervention('fn', 'single', 10, fn=lambda img, txt, step: (img, txt))."
                )
        elif self.kind not in KINDS:
            raise UsageError(f"Unknown intervention {self.kind!r}: use one of {', '.join(KINDS)}.")
        if self.tokens is None:
            object.__setattr__(self, "tokens", default_tokens(self.kind))
        if self.stream not in STREAMS:
            raise UsageError(f"Intervention stream must be double or single; got {self.stream!r}.")
        if self.tokens not in TOKENS:
            raise UsageError(f"Intervention tokens must be img, txt or both; got {self.tokens!r}.")
        if self.kind == "skip" and self.tokens != "both":
            raise UsageError(
                "skip bypasses the whole block, all its tokens; to keep only some tokens' input, use zero "
                "with img or txt tokens (zero:double:3:img in a spec; --intervention zero --tokens img in "
                "a sweep)."
            )
        if self.kind == "add" and self.tokens != "img":
            raise UsageError("add changes image tokens only: leave TOKENS out or write img.")
        if self.kind != "add" and self.scale != 1.0:
            raise UsageError(f"*SCALE only applies to add, not to {self.kind}.")
        if self.steps is not None:
            steps = as_indices(self.steps, "Intervention steps (e.g. (0, 1), or None for all)")
            object.__setattr__(self, "steps", tuple(steps))
            if not self.steps:
                raise UsageError("Intervention steps=() names no step: pass step indices, or None for all.")
        if isinstance(self.source, (str, Path)):  # a path is the natural thing to pass in a notebook
            from flux.store import load_capture

            object.__setattr__(self, "source", load_capture(self.source))
        if isinstance(self.direction, (str, Path)):
            object.__setattr__(self, "direction", load_direction(self.direction))

    @property
    def spec(self) -> str:
        """The spec string that parses back to this intervention (source and direction aside)."""
        text = f"{self.kind}:{self.stream}:{self.block}"
        if self.kind in ("zero", "patch"):
            text += f":{self.tokens}"
        text += f"@{format_steps(self.steps)}"
        return text + (f"*{self.scale:g}" if self.kind == "add" else "")

    def applies_at(self, step: int | None) -> bool:
        if self.steps is None:
            return True
        if step is None:
            raise RuntimeError(
                "Intervener.step is not set: set it, or pass the intervener's on_step as denoise's "
                "before_step."
            )
        return step in self.steps

    def check(
        self,
        model: Flux,
        num_steps: int,
        txt_len: int,
        img_len: int,
        model_name: str | None = None,
        capture: dict | None = None,
    ) -> None:
        """Raise a UserError if this intervention cannot apply to `model` (named `model_name` in the
        capture's metadata, when known) on a run of these sizes (`capture`, when given: that run's, so a
        patch source is also checked for its image size and schedule)."""
        depth = len(self.blocks_of(model))
        if not 0 <= self.block < depth:
            raise UsageError(f"{self.spec}: {self.stream} blocks go from 0 to {depth - 1}.")
        if self.steps is not None and any(not 0 <= k < num_steps for k in self.steps):
            raise UsageError(f"{self.spec}: this run has steps 0 to {num_steps - 1}.")
        if self.kind == "add":
            if self.direction is None:
                raise UsageError(f"{self.spec} needs a direction tensor (--direction FILE).")
            target = (1, img_len, model.hidden_size)
            try:
                fits = torch.broadcast_shapes(self.direction.shape, target) == target
            except RuntimeError:
                fits = False
            if not fits:
                raise UsageError(
                    f"{self.spec}: the direction has shape {tuple(self.direction.shape)}, which does not "
                    f"broadcast to the image tokens (B, {img_len}, {model.hidden_size}). Use a (D,) vector "
                    "or a (1, L, D) tensor of this run's sizes."
                )
        if self.kind == "patch":
            check_patch_source(self, txt_len, img_len, num_steps, model_name, capture)

    def blocks_of(self, model: Flux):
        return model.double_blocks if self.stream == "double" else model.single_blocks


def parse_interventions(
    text: str | Sequence[str] | None,
    depth: int,
    depth_single: int,
    num_steps: int,
    source: dict | None = None,
    direction: Tensor | None = None,
) -> list[Intervention]:
    """Spec strings (see the module docstring) -> interventions; a UsageError explains a malformed one.

    Block and step indices are checked against the model depth and the run's step count; `source` is
    attached to every patch and `direction` to every add.
    """
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    specs = [s.strip() for item in items for s in str(item).split(";") if s.strip()]
    out = []
    for spec in specs:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise UsageError(f"Cannot read the intervention {spec!r}. {_SPEC_HELP}")
        kind, stream, block = m["kind"], m["stream"], int(m["block"])
        if kind not in KINDS or stream not in STREAMS or (m["tokens"] and m["tokens"] not in TOKENS):
            raise UsageError(f"Cannot read the intervention {spec!r}. {_SPEC_HELP}")
        upper = depth if stream == "double" else depth_single
        if block >= upper:
            raise UsageError(f"Intervention {spec!r}: {stream} blocks go from 0 to {upper - 1}.")
        try:
            scale = float(m["scale"]) if m["scale"] is not None else 1.0
        except ValueError as e:
            raise UsageError(f"Intervention {spec!r}: {m['scale']!r} is not a number.") from e
        if not math.isfinite(scale):  # '1e999' reads as inf: every image would be NaN
            raise UsageError(f"Intervention {spec!r}: the scale must be a finite number; got {m['scale']}.")
        if m["scale"] is not None and kind != "add":
            raise UsageError(f"Intervention {spec!r}: *SCALE only applies to add.")
        steps = parse_steps(m["steps"], num_steps, f"Intervention {spec!r}")
        source_for, direction_for = (
            (source if kind == "patch" else None),
            (direction if kind == "add" else None),
        )
        iv = Intervention(kind, stream, block, steps, m["tokens"], scale, source_for, direction_for)
        if kind == "patch" and source is None:
            raise UsageError(f"Intervention {spec!r} patches from another capture: pass --source CAPTURE.")
        if kind == "add" and direction is None:
            raise UsageError(f"Intervention {spec!r} adds a direction: pass --direction FILE (.pt tensor).")
        out.append(iv)
    return out


def check_patch_source(
    iv: Intervention,
    txt_len: int,
    img_len: int,
    num_steps: int,
    model_name: str | None = None,
    capture: dict | None = None,
) -> None:
    """The source capture must be of the same model (`model_name`, when known) and hold this block, at these
    steps, with the tokens patched, at equal sizes; given the run's `capture`, also at the same width and
    height (not only as many image tokens) and on the same schedule (step k at the same noise level)."""
    if iv.source is None:
        raise UsageError(f"{iv.spec} needs a source capture (--source CAPTURE).")
    meta, ctx = iv.source["metadata"], iv.source["denoising_context"]
    if model_name is not None and meta.get("model") != model_name:
        # flux-dev and Krea share every shape, so the shape checks alone would let them mix.
        raise UsageError(
            f"{iv.spec}: the source capture is of {meta.get('model')}, this one of {model_name}. Patching "
            "needs two captures of the same model."
        )
    src_txt, src_img = int(ctx["txt_seq_len"]), ctx["img_ids"].shape[1]
    if (src_txt, src_img) != (txt_len, img_len):
        raise UserError(
            f"{iv.spec}: the source capture has {src_txt} text and {src_img} image tokens, this run "
            f"{txt_len} and {img_len}. Patching needs captures of the same model at the same width, height "
            f"and text length (source: {meta.get('model')} {meta.get('width')}x{meta.get('height')})."
        )
    if capture is not None:
        run = capture["metadata"]
        source_size, run_size = (meta.get("width"), meta.get("height")), (run.get("width"), run.get("height"))
        if source_size != run_size:
            raise UserError(
                f"{iv.spec}: the source capture is {source_size[0]}x{source_size[1]} and this run "
                f"{run_size[0]}x{run_size[1]}: as many image tokens, but in another grid, so each would land "
                "on another place. Patching needs captures of the same width and height."
            )
        source_times, run_times = timesteps_of(iv.source), timesteps_of(capture)
        if source_times != run_times:
            raise UserError(
                f"{iv.spec}: the source capture ran another schedule ({len(source_times) - 1} steps, "
                f"t = {', '.join(f'{t:.3f}' for t in source_times)}) than this run ({len(run_times) - 1} "
                f"steps, t = {', '.join(f'{t:.3f}' for t in run_times)}), so its step k is at another noise "
                "level. Patching needs captures of the same number of steps (and image size)."
            )
    if f"block_{iv.block}" not in iv.source[f"{iv.stream}_blocks"]:
        raise UserError(f"{iv.spec}: the source capture did not capture {iv.stream} block {iv.block}.")
    captured = set(meta["captured_steps"])
    wanted = set(range(num_steps)) if iv.steps is None else set(iv.steps)
    if missing := sorted(wanted - captured):
        raise UserError(f"{iv.spec}: the source capture has no block outputs at steps {missing}.")
    streams = meta.get("streams", "both")
    if streams != "both" and iv.tokens != streams:
        raise UserError(f"{iv.spec}: the source capture kept only {streams} tokens (--streams {streams}).")


def load_direction(path: str | None) -> Tensor | None:
    """A direction tensor from a .pt file (a tensor, or a dict with one) or a .safetensors with one tensor."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"--direction {path!r} is not a file. Save the direction with torch.save(tensor, path)."
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own text would suggest weights_only=False, i.e. running whatever code the file holds
        why = "it holds pickled Python objects, not only tensors" if "weights_only" in str(e) else str(e)
        raise UsageError(
            f"--direction {path!r} is not a readable tensor file ({type(e).__name__}: "
            f"{why.splitlines()[0][:200]}). Save the direction with torch.save(tensor, path) or safetensors' "
            "save_file."
        ) from e
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, Tensor)]
        if len(tensors) != 1:
            raise UsageError(f"--direction {path!r} holds {len(tensors)} tensors; save exactly one.")
        obj = tensors[0]
    if not isinstance(obj, Tensor):
        raise UsageError(f"--direction {path!r} holds a {type(obj).__name__}, not a tensor.")
    obj = obj.float()
    if not obj.isfinite().all():
        raise UsageError(f"--direction {path!r} holds NaN or infinite values; every image would be NaN.")
    return obj


# ----------------------------------------------------------------------------------------- hooks
class Intervener(HookSet):
    """Installs intervention hooks on a Flux model for the duration of a `with` block.

    Set `step` (or pass `on_step` as denoise's before_step) so step ranges apply; `offset` is added to
    the sampler's step index, for replays that start past step 0. Interventions on one block apply in order.
    """

    def __init__(self, model: Flux, interventions: Sequence[Intervention], txt_len: int, offset: int = 0):
        self.model, self.interventions, self.txt_len, self.offset = (
            model,
            list(interventions),
            txt_len,
            offset,
        )
        self.step: int | None = None
        self.handles: list = []
        self.applied: list[tuple[str, int]] = []  # (spec, step) of every change made, for bookkeeping
        self.sources: dict[tuple[int, int], tuple] = {}  # (id(patch), step) -> its (img, txt) on the device

    def install(self) -> None:
        for iv in self.interventions:
            module = iv.blocks_of(self.model)[iv.block]
            self.handles.append(module.register_forward_hook(self._hook(iv), with_kwargs=True))

    def on_step(self, info: StepInfo) -> None:
        """Set the step, and fetch the step's patch tokens now, before the model call: read inside a block's
        hook (from disk, for a safetensors source), they would stall the forward pass between blocks."""
        self.step = info.index + self.offset
        device = info.img.device
        self.sources = {
            (id(iv), self.step): tuple(
                t if t is None else to_device(t, device) for t in source_tokens(iv, self.step)
            )
            for iv in self.interventions
            if iv.kind == "patch" and iv.applies_at(self.step)
        }

    def _hook(self, iv: Intervention):
        def hook(_module, args, kwargs, output):
            if not iv.applies_at(self.step):
                return None
            self.applied.append((iv.spec, self.step))
            if iv.stream == "double":
                img_in = args[0] if args else kwargs["img"]
                txt_in = args[1] if len(args) > 1 else kwargs["txt"]
                img, txt = self._change(iv, img_in, txt_in, *output)
                return img, txt
            x_in = args[0] if args else kwargs["x"]
            t = self.txt_len
            img, txt = self._change(iv, x_in[:, t:], x_in[:, :t], output[:, t:], output[:, :t])
            return torch.cat((txt, img), dim=1)

        return hook

    def _change(self, iv: Intervention, img_in, txt_in, img, txt) -> tuple[Tensor, Tensor]:
        """New (img, txt) output tokens of one block call, from its input and output tokens."""
        do_img, do_txt = iv.tokens in ("img", "both"), iv.tokens in ("txt", "both")
        if iv.kind in ("skip", "zero"):
            return (img_in if do_img else img), (txt_in if do_txt else txt)
        if iv.kind == "add":
            return img + iv.scale * iv.direction.to(img.device, img.dtype), txt
        if iv.kind == "fn":
            out = iv.fn(img, txt, self.step)
            if not (
                isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)
            ):
                raise UserError(
                    f"{iv.spec}: fn must return the pair (img, txt) of tensors; it returned "
                    f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}."
                )
            new_img, new_txt = out
            if new_img.shape != img.shape or new_txt.shape != txt.shape:
                raise UserError(
                    f"{iv.spec}: fn must return (img, txt) of shapes {tuple(img.shape)}, {tuple(txt.shape)}; "
                    f"it returned {tuple(new_img.shape)}, {tuple(new_txt.shape)}."
                )
            return new_img.to(img.dtype), new_txt.to(txt.dtype)
        src_img, src_txt = self.sources.get((id(iv), self.step)) or source_tokens(
            iv, self.step
        )  # step set by hand
        if do_img:
            img = _like(src_img, img, iv, "image")
        if do_txt:
            txt = _like(src_txt, txt, iv, "text")
        return img, txt


def source_tokens(iv: Intervention, step: int) -> tuple[Tensor | None, Tensor | None]:
    """(img, txt) tokens stored in the patch source at iv's block and `step`; None for a stream not kept."""
    position = list(iv.source["metadata"]["captured_steps"]).index(step)
    return block_tokens(iv.source, LensKey(iv.stream, iv.block, step, position))


def _like(src: Tensor | None, out: Tensor, iv: Intervention, what: str) -> Tensor:
    if src is None or src.shape != out.shape:
        got = "none" if src is None else tuple(src.shape)
        raise UserError(
            f"{iv.spec}: the source capture's {what} tokens have shape {got}, the block's "
            f"{tuple(out.shape)}. "
            "Patch between captures of the same model, width, height, steps and text length."
        )
    return src.to(out.device, out.dtype)


# ----------------------------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    latent: Tensor  # (B, L, 64) after the last replayed step (the final latent when it ran to the end)
    x0: Tensor  # (B, L, 64) clean-image estimate of the last replayed step (= latent at the last step)
    start: int
    stop: int  # last replayed step, inclusive
    capture: dict | None = None  # block outputs as the model saw them (after interventions), if recorded
    applied: list[tuple[str, int]] = field(default_factory=list)


def _model_place(model: Flux) -> tuple[torch.device, torch.dtype]:
    weight = model.img_in.weight
    return weight.device, weight.dtype


def timesteps_of(capture: dict) -> list[float]:
    """The num_steps + 1 sampler times of a capture, from its timestep pairs (or the metadata)."""
    pairs = capture["denoising_context"].get("timestep_pairs")
    if pairs:
        return [float(p[0]) for p in pairs] + [float(pairs[-1][1])]
    return [float(t) for t in capture["metadata"]["timesteps"]]


MADE = (
    "timestamp",
    "device",
    "device_name",
    "versions",
)  # a capture's metadata on when and where it was made


def check_steps_replayed(interventions: Sequence[Intervention], start: int, stop: int) -> None:
    """Refuse an intervention at a step before `start` (the replay begins from the stored latent, which that
    step made without it), or one at none of the steps start..stop. Steps after `stop` are just not reached.
    """
    for iv in interventions:
        early = [k for k in iv.steps or () if k < start]
        if early:
            raise UsageError(
                f"{iv.spec} applies at steps {format_steps(early)}, before step {start}, where this replay "
                f"begins from the stored latent, which those steps made without it: replay from step "
                f"{min(early)}, or name steps from {start} on."
            )
        if iv.steps is not None and not any(start <= k <= stop for k in iv.steps):
            raise UsageError(
                f"{iv.spec} applies at steps {format_steps(iv.steps)}, none of which this replay runs "
                f"({start}..{stop}): it would never apply."
            )


@torch.inference_mode()
def replay(
    model: Flux,
    capture: dict,
    start: int = 0,
    stop: int | None = None,
    interventions: Sequence[Intervention] = (),
    record: CapturePlan | None = None,
    progress: Callable | None = None,
    observers: Sequence[HookSet] = (),
) -> ReplayResult:
    """Re-run steps start..stop (inclusive; default to the end) of a captured run from its stored latent.

    Uses only the stored context (img_state[start], txt, txt_ids, img_ids, y, guidance, timesteps): no text
    encoders. `record` captures block outputs at its steps (those within the replay) as the next block
    sees them, i.e. after the interventions, into `result.capture` (the documented capture format, with
    metadata["interventions"]; img_state and vec of steps before `start` are the stored ones). `observers`
    are more hook sets with an `on_step(info)` (such as flux.attention's recorder), installed for the replay
    after the interventions and the record, and told each step before it runs.
    """
    ctx, meta = capture["denoising_context"], capture["metadata"]
    timesteps = timesteps_of(capture)
    num_steps = len(timesteps) - 1
    stop = num_steps - 1 if stop is None else stop
    if not 0 <= start <= stop < num_steps:
        raise UsageError(f"Replay steps {start}..{stop} are not within this run's steps 0..{num_steps - 1}.")
    if start >= len(ctx["img_state"]):
        raise UserError(f"The capture holds the latent of steps 0..{len(ctx['img_state']) - 1} only.")
    device, dtype = _model_place(model)
    img = ctx["img_state"][start].to(device)
    if img.dtype != dtype:
        raise UserError(
            f"This capture ran in {str(img.dtype).removeprefix('torch.')} and the model is "
            f"{str(dtype).removeprefix('torch.')}: load it in the capture's dtype, e.g. "
            f"load_flow_model(spec, device, getattr(torch, capture['metadata']['dtype'])), so the replay "
            "reproduces the run."
        )
    txt_len, img_len = int(ctx["txt_seq_len"]), img.shape[1]
    for iv in interventions:
        iv.check(model, num_steps, txt_len, img_len, meta.get("model"), capture)
    check_steps_replayed(interventions, start, stop)

    recorder = steps = None
    if record is not None:
        plan = replace(record, steps=tuple(k for k in record.steps if start <= k <= stop))
        shapes, dtypes = BlockCapture.shapes_for(model, plan, img.shape[0], txt_len, img_len, img.dtype)
        pool = BufferPool(shapes, dtypes, pin=device.type == "cuda")
        pool.preallocate(full=len(plan.steps), context=stop - start + 1 - len(plan.steps))  # pin up front
        recorder, steps = BlockCapture(model, plan, pool, txt_len), []
    intervener = Intervener(model, interventions, txt_len, offset=start)
    last: dict[str, Any] = {}

    def before_step(info: StepInfo) -> None:
        intervener.on_step(info)
        if recorder is not None:
            recorder.begin_step(info.index + start, info.img)
        for observer in observers:
            observer.on_step(info)

    def after_step(info: StepInfo) -> None:
        last["info"] = info
        if recorder is not None:
            steps.append(recorder.end_step())

    # The recorder is entered second, so its hooks run after the interventions and see their result.
    with contextlib.ExitStack() as hooks:
        for hook_set in (intervener, recorder, *observers):
            if hook_set is not None:
                hooks.enter_context(hook_set)
        latent = denoise(
            model,
            img,
            ctx["img_ids"].to(device),
            ctx["txt"].to(device),
            ctx["txt_ids"].to(device),
            ctx["y"].to(device),
            timesteps[start : stop + 2],
            guidance=float(ctx["guidance"]),
            before_step=before_step,
            after_step=after_step,
            progress=progress,
        )
    info = last["info"]
    x0 = info.img + (0.0 - info.t_curr) * info.pred  # as the lens forms it (flux.decode)
    result = ReplayResult(latent, x0, start, stop, applied=list(intervener.applied))
    if recorder is not None:
        from flux.pipeline import device_name, package_versions
        from flux.store import assemble

        for s in steps:
            s.wait()
        # The run's metadata (model, prompt, size, seed, flags it was made with), with what describes the
        # stored tensors made true of this capture; the source's files and size estimate are not its own.
        new_meta = {k: v for k, v in meta.items() if k not in ("files", "estimated_capture_bytes")}
        new_meta.update(
            plan.describe(img.shape[0], txt_len, img_len, model.hidden_size, img.dtype),
            complete=stop == num_steps - 1,  # only then is there a final latent
            steps_done=list(range(stop + 1)),
            interventions=[iv.spec for iv in interventions],
            applied=[list(pair) for pair in result.applied],
            replayed_steps=[start, stop],
            # When and where this capture was made; the run first captured keeps its own under source_run
            # (a replay of a replay names that run, not the replay in between).
            source_run=meta.get("source_run") or {k: meta.get(k) for k in MADE},
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            device=str(device),
            device_name=device_name(device),
            versions=package_versions(),
        )
        new_ctx = {k: v for k, v in ctx.items() if k not in (*CONTEXT_KEYS, "final_latent")}
        if stop == num_steps - 1:
            new_ctx["final_latent"] = latent.cpu()
        result.capture = assemble(steps, new_ctx, new_meta)
        # Steps before `start` ran as stored: keep their context, so list index = step index again.
        for key in CONTEXT_KEYS:
            if ctx.get(key) is None:  # a capture made before this key was recorded
                del result.capture["denoising_context"][key]
                continue
            result.capture["denoising_context"][key][:0] = [ctx[key][k] for k in range(start)]
    return result
