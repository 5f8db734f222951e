"""Forward hooks that copy block outputs into preallocated buffers, and the plan that says which ones.

The hooks observe only: they never change a block's output. Each captured tensor is copied into a
preallocated buffer, and nothing in a hook waits for the device. The buffers are either in host memory
(pinned on CUDA, so the copy is asynchronous) or on the GPU itself (a `.pt` capture that fits there: a
device-to-device copy queued after the block, with no pinning to pay and nothing to move up again for the
lens). Copies into host buffers run on a side stream that waits for the block's output, so they overlap
the next blocks' compute instead of queueing behind it. A CUDA event recorded at the end of each step tells
the consumer when that step's buffers are complete, so the sampling loop never synchronises for the
capture.
"""

import math
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flux.errors import UsageError
from flux.model import Flux

STREAMS = ("both", "img", "txt")
CAPTURE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flag_text(value) -> str | None:
    """A flag's value as text: Fire turns `--steps 0,3` into the tuple (0, 3) and `--steps 3` into an int."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return None if value is None else str(value)


def means_all(text: str | None) -> bool:
    return text is None or text.strip().lower() in ("all", "*", "")


def parse_ranges(text: str, upper: int, where: str, what: str) -> list[int]:
    """'0,3', '2-5', '0-49:5', 'all' -> sorted unique indices in [0, upper); a UsageError names `where` (the
    flag, or an intervention spec) and `what` the indices are."""
    if means_all(text):
        return list(range(upper))
    picked: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part)
        if not m:
            raise UsageError(
                f"{where}: cannot read {part!r}. Use indices and ranges such as '0,3', '2-5' or '0-49:5'."
            )
        start = int(m[1])
        stop = int(m[2]) if m[2] is not None else start
        stride = int(m[3]) if m[3] is not None else 1
        if m[3] is not None and m[2] is None:
            stop = upper - 1
        if stride < 1:
            raise UsageError(f"{where}: {part!r} has a stride of 0; a stride (after ':') is 1 or more.")
        if stop < start:
            raise UsageError(f"{where}: {part!r} is an empty range (it ends before it starts).")
        if stop >= upper:
            raise UsageError(f"{where}: {part!r} is out of range: {what} go from 0 to {upper - 1}.")
        picked.update(range(start, stop + 1, stride))
    return sorted(picked)


def parse_steps(
    text: str | int | Sequence[int] | None, num_steps: int, where: str = "--steps"
) -> tuple[int, ...] | None:
    """--steps syntax -> step indices, or None for every step."""
    text = flag_text(text)
    return None if means_all(text) else tuple(parse_ranges(text, num_steps, where, "steps"))


def format_steps(steps: Sequence[int] | None) -> str:
    """(0, 1, 2, 5) -> '0-2,5'; None -> 'all'."""
    if steps is None:
        return "all"
    parts, run = [], []
    for k in sorted(steps):
        if run and k != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(k)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


@dataclass(frozen=True)
class CapturePlan:
    """Which block outputs to capture, at which steps, in which dtype."""

    double: tuple[int, ...]
    single: tuple[int, ...]
    steps: tuple[int, ...]
    streams: str = "both"  # "img", "txt" or "both": which tokens of each block output to keep
    dtype: torch.dtype | None = None  # None: the dtype the model runs in

    @classmethod
    def everything(cls, model: Flux, num_steps: int, dtype: torch.dtype | None = None) -> "CapturePlan":
        return cls(
            double=tuple(range(len(model.double_blocks))),
            single=tuple(range(len(model.single_blocks))),
            steps=tuple(range(num_steps)),
            dtype=dtype,
        )

    @classmethod
    def parse(
        cls,
        blocks: str | None,
        steps: str | int | None,
        streams: str,
        capture_dtype: str | None,
        depth: int,
        depth_single: int,
        num_steps: int,
    ) -> "CapturePlan":
        """Read the CLI's plan flags, e.g. blocks='double:0-5,single:10', steps='0-49:5'.

        Fire turns `--steps 0,3` into the tuple (0, 3) and `--steps 3` into an int; both are accepted.
        """
        blocks, steps = flag_text(blocks), flag_text(steps)
        double: set[int] = set()
        single: set[int] = set()
        if means_all(blocks):
            double, single = set(range(depth)), set(range(depth_single))
        else:
            kind = None  # a bare range after a comma goes with the kind before it: single:10,37
            for item in str(blocks).split(","):
                named = re.fullmatch(r"\s*(double|single):\s*(\S.*)", item)
                if named:
                    kind, spec = named[1], named[2]
                elif kind is not None and re.fullmatch(r"\s*\d[\d:-]*\s*", item):
                    spec = item
                else:
                    raise UsageError(
                        f"--blocks: cannot read {item.strip()!r}. Use 'double:RANGES' or 'single:RANGES', "
                        "e.g. 'double:0-5,single:10,37', 'single:0-37:2' or 'single:all', or 'all' alone."
                    )
                upper = depth if kind == "double" else depth_single
                (double if kind == "double" else single).update(
                    parse_ranges(spec, upper, "--blocks", f"{kind} blocks")
                )
        step_list = parse_ranges(steps or "all", num_steps, "--steps", "steps")
        if streams not in STREAMS:
            raise UsageError(f"--streams must be one of {', '.join(STREAMS)}; got {streams!r}.")
        if capture_dtype is None or capture_dtype == "auto":
            dtype = None
        elif capture_dtype in CAPTURE_DTYPES:
            dtype = CAPTURE_DTYPES[capture_dtype]
        else:
            raise UsageError(
                f"--capture_dtype must be one of auto, {', '.join(CAPTURE_DTYPES)}; got {capture_dtype!r}."
            )
        return cls(tuple(sorted(double)), tuple(sorted(single)), tuple(step_list), streams, dtype)

    def keys_and_shapes(self, batch: int, txt_len: int, img_len: int, hidden: int) -> dict[str, tuple]:
        """Flat key -> shape of one captured step, in the safetensors shard naming."""
        out: dict[str, tuple] = {}
        for i in self.double:
            if self.streams in ("both", "img"):
                out[f"double_blocks.{i}.img"] = (batch, img_len, hidden)
            if self.streams in ("both", "txt"):
                out[f"double_blocks.{i}.txt"] = (batch, txt_len, hidden)
        tokens = {"both": txt_len + img_len, "img": img_len, "txt": txt_len}[self.streams]
        for i in self.single:
            out[f"single_blocks.{i}"] = (batch, tokens, hidden)
        return out

    def describe(self, batch: int, txt_len: int, img_len: int, hidden: int, run_dtype: torch.dtype) -> dict:
        """What a capture made with this plan holds, for its metadata: blocks, steps, streams, the stored
        dtype (`run_dtype`, the model's, unless the plan names one) and every key's shape."""
        return {
            "captured_blocks": {"double": list(self.double), "single": list(self.single)},
            "captured_steps": list(self.steps),
            "streams": self.streams,
            "capture_dtype": str(self.dtype or run_dtype).removeprefix("torch."),
            "shapes": {k: list(v) for k, v in self.keys_and_shapes(batch, txt_len, img_len, hidden).items()},
        }

    def bytes_per_step(
        self, batch: int, txt_len: int, img_len: int, hidden: int, itemsize: int, pinned: bool = False
    ) -> int:
        """Bytes of one captured step's block outputs: as stored, or (`pinned`) in pinned host buffers."""
        shapes = self.keys_and_shapes(batch, txt_len, img_len, hidden).values()
        return sum(host_nbytes(itemsize * torch.Size(s).numel(), pinned) for s in shapes)


def host_nbytes(nbytes: int, pinned: bool) -> int:
    """Host memory a buffer of `nbytes` takes: torch's pinned (CUDA host) allocator rounds blocks up to a
    power of two, so a pinned buffer can take up to twice what it holds."""
    return 1 << (nbytes - 1).bit_length() if pinned and nbytes > 0 else nbytes


CONTEXT_KEYS = ("img_state", "vec", "pred")  # recorded at every step, captured or not


@dataclass
class StepBuffers:
    """One step's buffers, keyed like the shard keys, and the event that marks them complete.

    A captured step holds the context (`img_state`, `vec`, `pred`) and the planned block outputs; any other
    step holds the context only.
    """

    step: int
    tensors: dict[str, Tensor]
    captured: bool
    ready: "torch.cuda.Event | None" = None

    def wait(self) -> None:
        """Block until every copy into these buffers has landed (a no-op off CUDA)."""
        if self.ready is not None:
            self.ready.synchronize()


class BufferPool:
    """Buffer sets, allocated up front and reused once released: in host memory, or on `device`.

    Full sets (context and block outputs) serve the steps the plan captures; the others get small
    context-only sets. Of each kind at most `limit` exist (None: no limit); with a limit `acquire` blocks
    until a consumer releases one, which bounds host memory to `limit` steps however long the run, and
    however far the disk falls behind. Host buffers for a CUDA model are pinned (`pin`), so copies into them
    are asynchronous; allocate them with `preallocate` before sampling, as pinning is slow.
    """

    def __init__(
        self,
        shapes: dict[str, tuple],
        dtypes: dict[str, torch.dtype],
        pin: bool,
        limit: int | None = None,
        device: torch.device | None = None,
    ):
        if pin and device is not None:
            raise ValueError("only host buffers are pinned; device buffers take pin=False")
        self.shapes, self.dtypes, self.pin, self.limit, self.device = shapes, dtypes, pin, limit, device
        # Captured (full) sets and context-only sets. SimpleQueue: a Ctrl-C cannot stop its C code halfway
        # with its lock held, which hung the writer thread handing a set back (see flux/interrupts.py).
        self.free = {True: queue.SimpleQueue(), False: queue.SimpleQueue()}
        self.count = {True: 0, False: 0}  # sets allocated and not drained, of each kind
        self.lock = threading.Lock()

    @property
    def allocated(self) -> int:
        """Full sets allocated and not drained."""
        return self.count[True]

    def _new(self, full: bool) -> dict[str, Tensor]:
        keys = self.shapes if full else CONTEXT_KEYS
        return {
            k: torch.empty(self.shapes[k], dtype=self.dtypes[k], device=self.device, pin_memory=self.pin)
            for k in keys
        }

    def _room(self, full: bool) -> int | float:
        return math.inf if self.limit is None else self.limit - self.count[full]

    def preallocate(self, full: int, context: int = 0) -> None:
        """Allocate sets now, outside the sampling loop."""
        for kind, n in ((True, full), (False, context)):
            for _ in range(int(min(n, self._room(kind)))):
                self.count[kind] += 1
                self.free[kind].put(self._new(kind))

    def acquire(self, captured: bool = True) -> dict[str, Tensor]:
        with self.lock:
            grow = self.free[captured].empty() and self._room(captured) > 0
            if grow:
                self.count[captured] += 1
        return self._new(captured) if grow else self.free[captured].get()

    def release(self, tensors: dict[str, Tensor]) -> None:
        self.free[len(tensors) > len(CONTEXT_KEYS)].put(tensors)

    def drain(self) -> None:
        """Drop the free sets, so their (pinned or device) memory can go back once nothing else holds it."""
        for kind, free in self.free.items():
            while not free.empty():
                free.get_nowait()
                with self.lock:
                    self.count[kind] -= 1  # so a limited pool can grow again if it is used after all


class HookSet:
    """Forward hooks that exist only inside a `with` block: `install` registers them (appending the handles
    to `self.handles`), and they are removed on exit, on an exception, and if installing fails halfway."""

    handles: list

    def install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@dataclass
class BlockCapture(HookSet):
    """Installs the capture hooks on a Flux model for the duration of a `with` block.

    Call `begin_step(k, img_state)` before each model call and `end_step()` after it; `end_step` returns the
    step's StepBuffers (context tensors `img_state`, `vec` and the model's prediction `pred`, plus the planned
    block outputs).
    """

    model: Flux
    plan: CapturePlan
    pool: BufferPool
    txt_len: int
    handles: list = field(default_factory=list)
    current: StepBuffers | None = None

    def __post_init__(self) -> None:
        self._captured_steps = frozenset(self.plan.steps)
        self._stream: torch.cuda.Stream | None = None  # the side stream for device-to-host copies
        self._event: torch.cuda.Event | None = None  # marks each block's output as made, for that stream

    @staticmethod
    def shapes_for(
        model: Flux, plan: CapturePlan, batch: int, txt_len: int, img_len: int, model_dtype: torch.dtype
    ) -> tuple[dict[str, tuple], dict[str, torch.dtype]]:
        """Shapes and dtypes of one step's buffers (block outputs in the plan, then the context)."""
        hidden = model.hidden_size
        shapes = plan.keys_and_shapes(batch, txt_len, img_len, hidden)
        dtypes = dict.fromkeys(shapes, plan.dtype or model_dtype)
        shapes["img_state"] = (batch, img_len, model.in_channels)
        shapes["vec"] = (batch, hidden)
        shapes["pred"] = (batch, img_len, model.out_channels)
        dtypes["img_state"] = dtypes["vec"] = dtypes["pred"] = model_dtype
        return shapes, dtypes

    def install(self) -> None:
        for i in self.plan.double:
            self.handles.append(self.model.double_blocks[i].register_forward_hook(self._double_hook(i)))
        for i in self.plan.single:
            self.handles.append(self.model.single_blocks[i].register_forward_hook(self._single_hook(i)))
        self.handles.append(self.model.final_layer.register_forward_pre_hook(self._vec_hook))
        self.handles.append(self.model.final_layer.register_forward_hook(self._pred_hook))

    def _copy(self, *items: tuple[str, Tensor]) -> None:
        """Copy (key, tensor) pairs into the current step's buffers; keys the step does not hold are skipped.

        A hook passes all of its block's tensors at once: one wait and one stream switch for them all, as
        at 256 and 512 px the sampler is bound by the CPU launching kernels, so every call here counts.
        """
        step = self.current
        if step is None:
            return
        pairs = [(step.tensors[key], value) for key, value in items if key in step.tensors]
        if not pairs:
            return
        device = pairs[0][1].device
        if device.type != "cuda" or not self.pool.pin:
            # On the CPU a synchronous copy: nothing to overlap. Into buffers on the GPU, a device-to-device
            # copy queued on the compute stream after the block (about 20 us for a single block's output
            # at 1024 px on an H200, under 1% of a step), which needs neither a side stream nor
            # record_stream: the stream's order alone keeps it after the block and before any reuse.
            for buffer, value in pairs:
                buffer.copy_(value)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        if self._stream.device != device:  # a model split over GPUs: copy in order, on its own stream
            for buffer, value in pairs:
                buffer.copy_(value, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            return
        # The copies wait for everything queued so far (the block that made the values), then run beside
        # the next blocks. record_stream keeps each value's memory from being reused until its copy has
        # read it; nothing writes into a block output in place, so its contents cannot change meanwhile.
        # This is wait_stream and `with torch.cuda.stream(...)` spelled out, with one event reused (a wait
        # applies to the event's record as it stands when the wait is queued, so re-recording it later is
        # safe): each hook is spared a new Event and a stream context's Python at every block. set_stream
        # also makes the stream's GPU current, so the caller's current GPU is put back after.
        compute, current = torch.cuda.current_stream(device), torch.cuda.current_device()
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(compute)
        self._stream.wait_event(self._event)
        try:
            torch.cuda.set_stream(self._stream)
            for buffer, value in pairs:
                buffer.copy_(value, non_blocking=True)
                value.record_stream(self._stream)
        finally:
            torch.cuda.set_stream(compute)
            if current != device.index:
                torch.cuda.set_device(current)

    def _double_hook(self, i: int):
        img_key, txt_key = f"double_blocks.{i}.img", f"double_blocks.{i}.txt"

        def hook(_module, _args, output):
            img, txt = output
            self._copy((img_key, img), (txt_key, txt))

        return hook

    def _single_hook(self, i: int):
        key = f"single_blocks.{i}"

        def hook(_module, _args, output):
            if self.plan.streams == "img":
                output = output[:, self.txt_len :]
            elif self.plan.streams == "txt":
                output = output[:, : self.txt_len]
            self._copy((key, output))

        return hook

    def _vec_hook(self, _module, args):
        self._copy(("vec", args[1]))

    def _pred_hook(self, _module, _args, output):
        self._copy(("pred", output))  # the model's own velocity: the reference for every lens comparison

    def begin_step(self, step: int, img_state: Tensor) -> None:
        captured = step in self._captured_steps
        self.current = StepBuffers(step, self.pool.acquire(captured), captured)
        self._copy(("img_state", img_state))

    def end_step(self) -> StepBuffers:
        step, self.current = self.current, None
        stream = self._stream
        if stream is None and self.pool.device is not None and self.pool.device.type == "cuda":
            stream = torch.cuda.current_stream(self.pool.device)  # where the device-to-device copies ran
        if stream is not None:
            step.ready = torch.cuda.Event(blocking=True)  # waiting on it sleeps instead of spinning a core
            step.ready.record(stream)
        return step
