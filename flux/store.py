"""Writing captures to disk safely, and reading them back: `.pt` files and streamed safetensors directories.

Every file is written under a temporary name in its final folder and renamed into place when complete, so a
reader never sees half a file. Names are claimed exclusively, so concurrent runs never overwrite each other.
"""

import contextlib
import copy
import errno
import hashlib
import itertools
import json
import math
import os
import queue
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from flux.capture import CONTEXT_KEYS, BufferPool, StepBuffers
from flux.errors import UsageError, UserError, error_chain
from flux.torchsave import torch_save

SCHEMA_VERSION = 1
CAPTURE_KEYS = frozenset({"double_blocks", "single_blocks", "denoising_context", "metadata"})


# ---------------------------------------------------------------------------------------------- files
def file_sha256(path: Path) -> str:
    """The SHA-256 of a (small) file's bytes, in hex: how the metadata names the run's image."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def human_bytes(n: float) -> str:
    """Bytes as a short human figure: 2.00 GB, 12.3 MB, 4.6 kB (a tiny shard is not "0.00 GB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is a full disk or quota.

    Writers report it differently: Python I/O raises OSError(ENOSPC); torch.save raises a RuntimeError
    ("unexpected pos ...") whose __context__ is the OSError of the file it wrote to; safetensors raises a
    SafetensorError whose message ends with "(os error 28)".
    """
    codes = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return any(
        (isinstance(e, OSError) and e.errno in codes) or any(f"(os error {code})" in str(e) for code in codes)
        for e in error_chain(err)
    )


def _disk_full(path: Path, needed: int | Callable[[], int | None] | None) -> UserError:
    if callable(needed):
        needed = needed()
    need = f" about {human_bytes(needed)} is needed," if needed else ""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return UserError(
        f"The disk holding {str(path.parent)!r} is full (or over quota):{need} {human_bytes(free)} is free. "
        "Nothing half-written was left behind; free some space or choose another --output_dir."
    )


def atomic_write(
    path: Path, write: Callable[[Path], None], needed: int | Callable[[], int | None] | None = None
) -> Path:
    """Call write(tmp) on a temporary name beside `path`, then rename it to `path` (replacing it).

    The file gets the permissions of any new file in that folder (as the umask or a default ACL makes
    them): safetensors 0.8 creates its files readable by their owner alone, which would lock a shared
    capture's tensors away from those who can read its index.json. A full disk becomes a UserError naming
    the folder and `needed` bytes (or what `needed()` returns, asked only then), whatever the writer raised.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777  # what a new file gets here
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that made its own file, owner-only
            with contextlib.suppress(OSError):  # a filesystem without modes: nothing to put back
                os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, UserError) and _is_disk_full(e):
            raise _disk_full(path, needed) from e
        raise
    return path


def _strict(obj: Any) -> Any:
    """`obj` with every infinite or NaN float as None: JSON has no Infinity (a PSNR of identical images)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """Strict JSON (non-finite floats become null), written atomically."""
    text = json.dumps(_strict(obj), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), needed=len(text.encode()))


def publish_new(path_for: Callable[[int], Path], write: Callable[[Path], None], start: int = 0) -> Path:
    """Write a file to the first free name path_for(n), n = start, start + 1, ..., never replacing one.

    The content goes to a temporary file first, then is hard-linked to its name, which fails if the name is
    taken, so two runs racing for the same index each get their own.
    """
    first = path_for(start)
    tmp = first.with_name(f".{first.name}.tmp-{secrets.token_hex(4)}")
    try:
        write(tmp)
        n = start
        while True:
            target = path_for(n)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                n += 1
    except OSError as e:
        if _is_disk_full(e):
            raise _disk_full(first, None) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def next_free_index(folder: Path, prefix: str, suffix: str) -> int:
    """The reference CLI's naming: one past the highest n among existing `{prefix}{n}{suffix}` files."""
    used = []
    for p in folder.glob(f"{prefix}*{suffix}"):
        middle = p.name[len(prefix) : len(p.name) - len(suffix)]
        if middle.isdigit():
            used.append(int(middle))
    return max(used) + 1 if used else 0


def new_dir(base: Path) -> Path:
    """`base`, or `base_1`, `base_2`, ...: the first that does not exist yet, created here (so two runs can
    never both take it) and never an existing folder."""
    for n in range(10_000):
        path = base if n == 0 else base.with_name(f"{base.name}_{n}")
        for _ in range(3):  # a parent made here may be taken back by a failed run's fresh_dir meanwhile
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                break
            except FileNotFoundError:
                continue
    raise RuntimeError(f"no free output folder next to {base}")


@contextlib.contextmanager
def fresh_dir(base: Path) -> Iterator[Path]:
    """`new_dir(base)` for the outputs written inside the block; removed again if that fails before writing
    anything, so a failed command leaves no empty folder (and the next run does not get `_1`)."""
    made = [base, *(p for p in base.parents if not p.exists())]  # what new_dir may create, deepest first
    path = new_dir(base)
    made[0] = path
    try:
        yield path
    except BaseException:
        for folder in made:  # rmdir fails on a folder with anything in it: what was written stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def metadata_path_for(stem: str, folder: Path) -> Path:
    """capture_{stamp}_{model} -> folder/metadata_{stamp}_{model}.json"""
    return folder / f"metadata_{stem.removeprefix('capture_')}.json"


def claim_stem(folder: Path, model: str) -> str:
    """A unique `capture_{YYYYmmdd_HHMMSS}_{model}` stem in `folder`, claimed with an exclusive lock file.

    A stem counts as taken if its .pt, directory, metadata or claim exists; a short random suffix is added
    when the plain stem is taken. Call `release_stem` once the outputs are in place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = f"capture_{time.strftime('%Y%m%d_%H%M%S')}_{model}"
    stem = base
    for _ in range(100):
        taken = any(
            path.exists() for path in (folder / f"{stem}.pt", folder / stem, metadata_path_for(stem, folder))
        )
        if not taken:
            try:
                fd = os.open(folder / f".{stem}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                os.close(fd)
                return stem
            except FileExistsError:
                pass
        stem = f"{base}_{secrets.token_hex(2)}"
    raise RuntimeError(f"could not find a free capture name in {folder}")


def release_stem(folder: Path, stem: str) -> None:
    (folder / f".{stem}.claim").unlink(missing_ok=True)


def beside_capture(path: str | Path, folder: str) -> tuple[Path, str]:
    """(`{the capture's folder}/{folder}`, the capture's stem `capture_{stamp}_{model}`): where the lens,
    analyze, sweep and replay write by default. The path is made absolute first, so `.` (run inside a
    safetensors capture) names that capture, not its own folder as the parent; a symlink stays the name
    and place the user gave (its target may be in someone else's read-only folder)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return path.parent / folder, path.stem if path.suffix == ".pt" else path.name


# --------------------------------------------------------------------------------- capture structure
class LazyList(Sequence):
    """A read-only list whose items are produced (read from disk) when indexed."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)

    def __repr__(self) -> str:
        return f"LazyList(len={self._n})"

    def __copy__(self) -> "LazyList":
        return LazyList(self._n, self._get)

    def __deepcopy__(self, memo) -> "LazyList":
        """A list that reads the same items through a deep copy of the reader: a capture's reader reopens
        its shards, so the copy's tensors share no memory with the original's (as in a deep-copied .pt)."""
        return LazyList(self._n, copy.deepcopy(self._get, memo))

    def __reduce__(self):  # pickle would fail on the reader function, naming only a lambda
        raise TypeError(
            "A lazy list of a safetensors capture cannot be pickled (e.g. by torch.save): make it a list "
            "first, list(...), which reads its tensors from disk."
        )


def nest_blocks(
    meta: dict, get: Callable[[int, str], Tensor], lazy: bool
) -> tuple[dict[str, Sequence], dict[str, Sequence]]:
    """Build `double_blocks` / `single_blocks` from flat keys: get(step, key) -> tensor.

    Lists run over metadata["captured_steps"]; a double entry is (img, txt) with None for a stream not kept.
    """
    steps = meta["captured_steps"]
    streams = meta.get("streams", "both")

    def seq(fn: Callable[[int], Any]) -> Sequence:
        lst = LazyList(len(steps), fn)
        return lst if lazy else list(lst)

    # Readers are partials, not closures, so that a deep copy of a lazy list copies `get` with them.
    double = {
        f"block_{i}": seq(partial(_double_entry, get, steps, streams, i))
        for i in meta["captured_blocks"]["double"]
    }
    single = {
        f"block_{i}": seq(partial(_step_entry, get, steps, f"single_blocks.{i}"))
        for i in meta["captured_blocks"]["single"]
    }
    return double, single


def _double_entry(
    get: Callable[[int, str], Tensor], steps: list[int], streams: str, i: int, pos: int
) -> tuple:
    k = steps[pos]
    img = get(k, f"double_blocks.{i}.img") if streams in ("both", "img") else None
    txt = get(k, f"double_blocks.{i}.txt") if streams in ("both", "txt") else None
    return img, txt


def _step_entry(get: Callable[[int, str], Tensor], steps: list[int], key: str, pos: int) -> Tensor:
    return get(steps[pos], key)


def assemble(steps: list[StepBuffers], context: dict, metadata: dict) -> dict[str, Any]:
    """The `.pt` dict (see docs/capture_format.md) from a run's step buffers and context."""
    by_step = {s.step: s.tensors for s in steps}
    double, single = nest_blocks(metadata, lambda k, key: by_step[k][key], lazy=False)
    ctx = dict(context)
    for key in CONTEXT_KEYS:
        ctx[key] = [by_step[k][key] for k in sorted(by_step)]
    return {"double_blocks": double, "single_blocks": single, "denoising_context": ctx, "metadata": metadata}


# ---------------------------------------------------------------------------------------------- sinks
def drop_buffers(capture: dict[str, Any]) -> None:
    """Empty, in place, the parts of an `assemble`d capture that hold its step buffers (the block outputs and
    the per-step context), so that whatever still holds the dict, such as a failed run's traceback, holds
    no buffer; the rest (its metadata, the run's context) is left as it is."""
    for stream in ("double_blocks", "single_blocks"):
        for outputs in capture.get(stream, {}).values():
            outputs.clear()
    for key in CONTEXT_KEYS:
        capture.get("denoising_context", {}).get(key, []).clear()


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def on_host(obj: Any) -> Any:
    """`obj` (dicts, lists and tuples of tensors and plain values, as a capture is) with every tensor that is
    not in host memory copied there; host tensors and all else are the same objects.

    A GPU's tensors are copied on a side stream: on the stream the lens decodes on, each copy would wait for
    every decoder batch queued before it. What made them must have finished (`PtSink.collect` waits). The
    calling thread's current GPU is switched to the tensor's for the copy and back: a stream context alone
    would, on its way out, make GPU 0 current (creating a context there, hundreds of MB) in a thread that
    never chose one, for a run on another GPU.
    """
    streams: dict[torch.device, torch.cuda.Stream] = {}

    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.device.type == "cpu":
                return x
            if x.device.type != "cuda":
                return x.cpu()
            with torch.cuda.device(x.device):
                if x.device not in streams:
                    streams[x.device] = torch.cuda.Stream(x.device)
                with torch.cuda.stream(streams[x.device]):
                    return x.cpu()
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x

    return move(obj)


class PtSink:
    """Keeps every step in memory (host, or the GPU's where the capture fits there) and writes one `.pt` at
    the end (fine for small runs)."""

    def __init__(self, path: Path, pool: BufferPool, estimated_bytes: int | None = None):
        self.path, self.pool, self.estimated_bytes = path, pool, estimated_bytes
        self.steps: list[StepBuffers] = []

    def add_step(self, step: StepBuffers) -> None:
        self.steps.append(step)

    def collect(self, context: dict, metadata: dict) -> dict[str, Any]:
        """The capture in memory (its tensors are the buffers), once every copy into them has landed."""
        for step in self.steps:
            step.wait()
        return assemble(self.steps, context, metadata)

    def write(self, capture: dict[str, Any]) -> Path:
        """Write a collected capture to the `.pt` (atomically); safe to run in a thread beside readers.

        Tensors on a GPU are written from host copies made here, so that the file loads on any machine."""
        on_disk = on_host(capture)
        try:
            path = atomic_write(self.path, lambda tmp: torch_save(on_disk, tmp), needed=self.estimated_bytes)
        finally:
            # A failed write's traceback keeps frames that hold this copy (on a CPU, the buffers).
            drop_buffers(on_disk)
        self.steps.clear()  # the sink's hold on the buffers; they are freed with the last reference
        return path

    def finish(self, context: dict, metadata: dict) -> Path:
        capture = self.collect(context, metadata)
        try:
            return self.write(capture)
        finally:
            drop_buffers(capture)  # a failed write's traceback keeps `write`'s frame, which holds it

    def abort(self, context: dict | None = None) -> list[int]:
        """Nothing was written; a .pt is all or nothing."""
        self.steps.clear()
        return []


class SafetensorsSink:
    """Streams one safetensors shard per step from a background thread, with an index kept up to date.

    Host memory stays bounded by the buffer pool's limit: the sampler blocks for a free buffer set if the
    disk falls behind. `index.json` says which steps are on disk and whether the run completed.
    """

    def __init__(self, directory: Path, pool: BufferPool, metadata: dict, context: dict | None = None):
        """`context`: the run's context as far as it is known before sampling (all but `final_latent`),
        written at once, so that a run killed without a chance to clean up (SIGKILL, the OOM killer) still
        leaves steps that decode and replay."""
        self.dir, self.pool = directory, pool
        self.index: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "format": "safetensors",
            "complete": False,
            "steps_done": [],
            "metadata": metadata,
            "shapes": {},
            "dtypes": {},
        }
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.error: BaseException | None = None
        # SimpleQueue: its put and get are C code, which a Ctrl-C cannot leave half done with a lock held.
        self.queue: queue.SimpleQueue[StepBuffers | None] = queue.SimpleQueue()
        if context:
            self._write_context(context)
        write_json(self.dir / "index.json", self.index)
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def _write_index(self) -> None:
        write_json(self.dir / "index.json", self.index)

    def _write_context(self, context: dict) -> None:
        """context.safetensors (its tensors) and the index's "context" (the rest); the index is written by
        the caller."""
        tensors = {k: v.contiguous() for k, v in context.items() if isinstance(v, Tensor)}
        atomic_write(self.dir / "context.safetensors", lambda tmp: save_file(tensors, tmp), _nbytes(tensors))
        self.index["context"] = {k: v for k, v in context.items() if not isinstance(v, Tensor)}

    def _run(self) -> None:
        while (step := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self._write_step(step)
            except BaseException as e:  # reported to the sampling thread at its next call
                self.error = e
            finally:
                self.pool.release(step.tensors)

    def _write_step(self, step: StepBuffers) -> None:
        step.wait()
        tensors = step.tensors
        nbytes = _nbytes(tensors)
        start = time.perf_counter()
        atomic_write(
            self.dir / f"step_{step.step:04d}.safetensors", lambda tmp: save_file(tensors, tmp), nbytes
        )
        self.write_seconds += time.perf_counter() - start
        self.bytes_written += nbytes
        for k, t in tensors.items():
            self.index["shapes"][k] = list(t.shape)
            self.index["dtypes"][k] = str(t.dtype).removeprefix("torch.")
        self.index["steps_done"].append(step.step)
        self._write_index()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def add_step(self, step: StepBuffers) -> None:
        self._raise_if_failed()
        self.queue.put(step)

    def _drain(self) -> None:
        if self.thread.is_alive():  # once only: finish or abort may follow wait_for_steps
            self.queue.put(None)
            self.thread.join()

    def wait_for_steps(self) -> None:
        """Block until every queued step is on disk, its buffers back in the pool (which the caller may then
        empty); the context and the index's last word are still to come, from `finish` or `abort`."""
        self._drain()
        self._raise_if_failed()

    def finish(self, context: dict, metadata: dict) -> Path:
        self._drain()
        self._raise_if_failed()
        self._write_context(context)
        self.index["metadata"] = metadata
        self.index["complete"] = True
        self._write_index()
        return self.dir

    def abort(self, context: dict | None = None) -> list[int]:
        """Write what is queued, keep the index marked incomplete; returns the steps on disk."""
        self._drain()
        if context:
            self._write_context(context)
        self._write_index()
        return list(self.index["steps_done"])


# -------------------------------------------------------------------------------------------- loading
def _load_pt(path: Path) -> dict:
    zipped = zipfile.is_zipfile(path)  # torch's legacy (non-zip) format loads, but cannot be memory-mapped
    try:
        capture = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in str(e).lower():
            raise UserError(
                f"Refusing to load {str(path)!r}: it contains pickled Python objects, not only tensors. "
                "Capture files are opened with weights_only=True, so code inside a file never runs; this "
                "file was not written by this tool or has been tampered with."
            ) from e
        if isinstance(e, PermissionError):
            raise UserError(f"Could not read the capture {str(path)!r}: permission denied.") from e
        if not zipped:
            raise UserError(
                f"{str(path)!r} is not a complete capture: this file ({human_bytes(path.stat().st_size)}) is "
                "neither a torch zip archive, as captures are, nor a torch file in the legacy format. It is "
                "empty, corrupt, cut short while being written (was the run interrupted?), or another format."
            ) from e
        raise UserError(
            f"Could not read the capture {str(path)!r} ({type(e).__name__}: {e}). It is corrupt or "
            "truncated (was the run interrupted while writing?)."
        ) from e
    if not isinstance(capture, dict) or not capture.keys() >= CAPTURE_KEYS:
        found = sorted(map(str, capture)) if isinstance(capture, dict) else type(capture).__name__
        raise UserError(
            f"{str(path)!r} is a torch file but not a capture: expected a dict with keys "
            f"{sorted(CAPTURE_KEYS)}, found {found}."
        )
    meta = capture["metadata"]
    if isinstance(meta, dict):  # say what a safetensors capture's metadata says; a .pt is all or nothing
        meta.setdefault("complete", True)
        if "num_steps" in meta:
            meta.setdefault("steps_done", list(range(int(meta["num_steps"]))))
    return capture


class _Shards:
    """Open safetensors shards of a capture directory, read lazily (memory-mapped) key by key."""

    def __init__(self, directory: Path):
        self.dir = directory.absolute()  # read later, perhaps after the notebook has changed directory
        self.handles: dict[Path, Any] = {}

    def __deepcopy__(self, memo) -> "_Shards":
        """The same shards, opened anew when read: their tensors share no memory with this one's."""
        return _Shards(self.dir)

    def step(self, k: int, key: str) -> Tensor:
        """`key` of step k's shard."""
        return self.get(f"step_{k:04d}.safetensors", key)

    def get(self, name: str, key: str) -> Tensor:
        path = self.dir / name
        try:
            if path not in self.handles:
                self.handles[path] = safe_open(str(path), framework="pt", device="cpu")
            return self.handles[path].get_tensor(key)
        except (FileNotFoundError, PermissionError) as e:  # safetensors 0.8 says "not found" for both
            why = (
                "is not readable (permission denied)"
                if path.exists()
                else "is missing (moved or deleted), though the capture's index.json lists its step as "
                "written"
            )
            raise UserError(f"Could not read {key!r}: the shard {str(path)!r} {why}.") from e
        except (SafetensorError, OSError) as e:
            raise UserError(f"Could not read {key!r} from {str(path)!r}: {e}. The shard is corrupt.") from e


def _context_from(meta: dict) -> dict:
    """The non-tensor context of a run, as far as its metadata holds it."""
    ctx = {k: meta[k] for k in ("txt_seq_len", "guidance") if k in meta}
    if "timesteps" in meta:
        ctx["timestep_pairs"] = list(itertools.pairwise(meta["timesteps"]))
    return ctx


def _read_all(obj: Any) -> Any:
    """`obj` with every LazyList read into a list, in nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _read_all(v) for k, v in obj.items()}
    if isinstance(obj, (LazyList, list)):
        return [_read_all(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_read_all(v) for v in obj)
    return obj


def _load_dir(directory: Path) -> dict:
    index_path = directory / "index.json"
    try:
        index = json.loads(index_path.read_text())
        version = index.get("schema_version")
        done, complete = sorted(index["steps_done"]), bool(index["complete"])
        meta = dict(index["metadata"], complete=complete, steps_done=done)
        # A run killed before it could write its context (by a version that wrote it only at the end)
        # still has what the lens needs of it in its metadata.
        ctx: dict[str, Any] = dict(index.get("context") or _context_from(meta))
        if "timestep_pairs" in ctx:  # JSON has no tuples; a .pt holds (t_curr, t_prev) tuples
            ctx["timestep_pairs"] = [(float(a), float(b)) for a, b in ctx["timestep_pairs"]]
        # Touch every key used below now, so a damaged index is one clear error, not a KeyError later.
        meta["captured_blocks"]["double"], meta["captured_blocks"]["single"], list(meta["captured_steps"])
    except FileNotFoundError as e:
        raise UserError(f"{str(directory)!r} is not a capture directory: it has no index.json.") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON or UTF-8
        raise UserError(f"The capture index {str(index_path)!r} is corrupt ({type(e).__name__}: {e}).") from e
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{str(index_path)!r} has schema version {version}; this tool reads version {SCHEMA_VERSION}."
        )
    shards = _Shards(directory)
    if not complete:
        # An interrupted run: expose only the captured steps that reached the disk.
        on_disk = set(done)
        meta["captured_steps"] = [k for k in meta["captured_steps"] if k in on_disk]
    double, single = nest_blocks(meta, shards.step, lazy=True)
    context_path = directory / "context.safetensors"
    if context_path.exists():
        try:
            with safe_open(str(context_path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    ctx[key] = f.get_tensor(key)
        except (FileNotFoundError, PermissionError) as e:  # it exists: safetensors 0.8 says "not found"
            raise UserError(f"Could not read {str(context_path)!r}: permission denied.") from e
        except (SafetensorError, OSError) as e:
            raise UserError(f"Could not read {str(context_path)!r}: {e}. The file is corrupt.") from e
    # Context keys written by this version; captures made before `pred` was recorded simply lack it.
    present = [k for k in CONTEXT_KEYS if k in index.get("shapes", {}) or not done]
    for key in present:
        ctx[key] = LazyList(len(done), partial(_step_entry, shards.step, done, key))
    return {"double_blocks": double, "single_blocks": single, "denoising_context": ctx, "metadata": meta}


def load_capture(path: str | Path, lazy: bool = True) -> dict:
    """Open a capture (`.pt` file or safetensors directory) as the documented nested dict.

    `.pt` files are read with `weights_only=True` (memory-mapped; a file in torch's legacy non-zip format is
    read whole); a file that pickles code is refused.
    Safetensors captures are lazy: block lists read a tensor from disk only when it is indexed. With
    `lazy=False` every tensor is read now, into plain lists, as a `.pt` capture holds them (one that
    `torch.save` can write, or `copy.deepcopy` keep apart from the files).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "index.json").exists():
            _refuse_other_folders(path)
        capture = _load_dir(path)
        return capture if lazy else _read_all(capture)
    if not path.exists():
        raise UsageError(
            f"No capture at {str(path)!r}: pass a .pt capture file or a safetensors capture directory "
            "(output/intermediates/capture_...)."
        )
    if path.suffix == ".json":
        if path.name == "index.json":  # a safetensors capture's own index: the capture is its folder
            raise UsageError(
                f"{str(path)!r} is the index of a capture: pass its folder, {str(path.parent)!r}."
            )
        try:
            named = json.loads(path.read_text())["files"]["capture"]
        except (OSError, ValueError, KeyError, TypeError):
            named = "the capture_... file or folder beside it"
        raise UsageError(f"{str(path)!r} is a run's metadata, not its capture: pass {named}.")
    _refuse_other_formats(path)
    return _load_pt(path)


def _refuse_other_folders(path: Path) -> None:
    """A folder that holds captures (output/intermediates) or is a lens folder gets a sentence that says so
    and names a capture, where reading it would only say that it has no index.json."""
    inside = sorted(p for p in path.glob("capture_*") if p.suffix == ".pt" or (p / "index.json").is_file())
    if inside:
        newest = max(inside, key=lambda p: p.stat().st_mtime)
        raise UsageError(
            f"{str(path)!r} is a folder of {len(inside)} capture(s), not a capture: pass one of them, e.g. "
            f"the newest, {str(newest)!r}."
        )
    if path.parent.name in ("decoded", "analysis", "attention", "sweeps"):
        # Named {capture stem}, then _1, _2 for a second run or a sweep's _{kind}: the longest stem that fits.
        beside = sorted(path.parent.parent.glob("capture_*"), key=lambda p: len(p.name), reverse=True)
        for capture in beside:
            stem = capture.name.removesuffix(".pt")
            made = path.name == stem or path.name.startswith(f"{stem}_")
            is_capture = capture.is_file() if capture.suffix == ".pt" else (capture / "index.json").is_file()
            if made and is_capture:
                raise UsageError(
                    f"{str(path)!r} holds outputs made from a capture, not a capture: pass {str(capture)!r}."
                )


_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8")  # JPEG, PNG, GIF: what runs and analyses write beside
_CAPTURES_ARE = "a capture is a capture_*.pt file or a capture_* folder (output/intermediates/)"


def _refuse_other_formats(path: Path) -> None:
    """A file that is plainly something else (an image, a safetensors shard or checkpoint) gets a sentence
    that names it, where torch.load would call it pickled objects or not a capture."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return  # _load_pt says why it cannot be read
    if head.startswith(_IMAGE_MAGIC) or path.suffix.lower() in (".jpg", ".jpeg", ".png", ".gif", ".mp4"):
        raise UsageError(f"{str(path)!r} is an image, not a capture: {_CAPTURES_ARE}.")
    if path.suffix == ".safetensors":
        if (path.parent / "index.json").is_file():
            raise UsageError(
                f"{str(path)!r} is one file of a capture: pass its folder, {str(path.parent)!r}."
            )
        raise UsageError(f"{str(path)!r} is a safetensors file, not a capture: {_CAPTURES_ARE}.")
