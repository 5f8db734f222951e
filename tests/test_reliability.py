"""Reliability and safety (issue 7) on flux-tiny, CPU: atomic files, interrupts, a full disk, concurrent runs,
untrusted files, bad values and determinism.

Faults are injected in-process: a write stores half its bytes, then fails with ENOSPC the way each writer
really reports a full disk. Interrupts and races use real `capture_sample.py` subprocesses; they are all
started when this module begins, so their ~20 s of importing overlaps. A run to be interrupted is paused
(SIGSTOP) as soon as it reaches the stage its test interrupts, so that it waits there however late its test
comes on a busy machine, and let go with the test's signal pending.
"""

import ast
import errno
import inspect
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import capture_sample  # noqa: E402
import flux.decode  # noqa: E402
import flux.store  # noqa: E402
import flux.torchsave  # noqa: E402
from flux import load_capture  # noqa: E402
from flux.configs import TINY_PARAMS, get_spec  # noqa: E402
from flux.errors import UserError  # noqa: E402
from flux.pipeline import STREAMING_MAX_SETS, RunOptions, generate, load_models  # noqa: E402
from flux.store import claim_stem  # noqa: E402
from flux.tiny import ensure_tiny_repo  # noqa: E402

TINY = ["--model", "flux-tiny", "--prompt", "a red cube", "--width", "64", "--height", "48"]
N_BLOCKS = 2 + 3  # flux-tiny: 2 double-stream and 3 single-stream blocks
STARTUP_S = 240  # a subprocess imports torch and transformers first: ~20 s alone, much more on a busy machine
STOP_S = 60  # from the signal to the exit, including writing what was queued and interpreter shutdown


# ----------------------------------------------------------------------------------------------- helpers
def cli(*args: str) -> int:
    return capture_sample.run([*args, "--progress", "False"])


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and capture-name claims: none may outlive a run, however it ended."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".claim")]


def flatten(obj, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, leaf) for every tensor and plain value of a capture, reading lazy lists item by item."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}/{key}")
    elif isinstance(obj, Sequence) and not isinstance(obj, str):
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}/{i}")
    else:
        yield prefix, obj


def assert_readable(folder: Path) -> None:
    """Everything a reader can see under `folder` is complete: JPEGs decode to the last pixel, JSON parses,
    captures load and every tensor in them can be read."""
    for p in folder.rglob("*"):
        if p.name.startswith("."):
            continue
        if p.suffix == ".jpg":
            with Image.open(p) as img:
                img.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt" or (p / "index.json").is_file():
            for _ in flatten(load_capture(p)):
                pass


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def error_line(err: str) -> str:
    """The CLI's last stderr line, which must be its one-paragraph error; no traceback may precede it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def options(out: Path, **overrides) -> RunOptions:
    kw = dict(model="flux-tiny", prompt="a red cube", width=64, height=48, seed=1, device="cpu")
    kw.update(output_dir=str(out), should_decode_intermediates=False)
    kw.update(overrides)
    return RunOptions(**kw).validate()


@pytest.fixture(scope="module")
def models():
    return load_models(get_spec("flux-tiny"), "cpu")


@pytest.fixture(scope="module")
def earlier(models, tmp_path_factory) -> Path:
    """A finished run with the lens (seed 1, 4 steps, .pt): the earlier outputs faults must not touch."""
    out = tmp_path_factory.mktemp("earlier")
    generate(models, options(out, should_decode_intermediates=True), progress=False)
    return out


@pytest.fixture(scope="module")
def st_capture(models, tmp_path_factory) -> Path:
    """A finished safetensors capture of 2 steps, to damage copies of."""
    out = tmp_path_factory.mktemp("st")
    return generate(models, options(out, format="safetensors", num_steps=2), progress=False).capture_path


# ------------------------------------------------------------------------------------------ subprocesses
class Run:
    """`capture_sample.py ARGS` in a subprocess, its stdout and stderr going to files that tests poll."""

    def __init__(self, folder: Path, args: list[str], out: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.out, self.stdout, self.stderr = out, folder / "stdout.txt", folder / "stderr.txt"
        # PYTHONFAULTHANDLER: a run that hangs is ended with SIGABRT, which prints every thread's stack.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        with self.stdout.open("w") as so, self.stderr.open("w") as se:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "capture_sample.py"), *args, "--output_dir", str(out)],
                cwd=ROOT, stdout=so, stderr=se, env=env, start_new_session=True,
                # Python turns SIGINT into KeyboardInterrupt only if it is not ignored when it starts.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )  # fmt: skip

        self.held = threading.Event()

    def hold_when(self, ready: Callable[[], object]) -> None:
        """Pause the process (SIGSTOP) as soon as ready() holds; `stop` lets it go on, its signal pending."""

        def watch():
            while self.proc.poll() is None:
                if ready():
                    self.proc.send_signal(signal.SIGSTOP)
                    self.held.set()
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def wait_until(self, ready, what: str):
        """Poll ready() until it returns something truthy; fail if the run ends or takes too long first."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if value := ready():
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"no {what} after {STARTUP_S} s:\n{self.output()}")

    def stop(self, sig: int) -> tuple[int, float]:
        """Send `sig`; return the exit code and the seconds the run took to exit."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        if self.held.is_set():
            self.proc.send_signal(signal.SIGCONT)
        try:
            rc = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # where each thread is stuck, to stderr
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            pytest.fail(f"the run did not exit within {STOP_S} s of signal {sig}:\n{self.output()}")
        return rc, time.monotonic() - start

    def finish(self) -> int:
        return self.proc.wait(timeout=STARTUP_S)


LONG = [*TINY, "--seed", "1", "--num_steps", "1000", "--should_decode_intermediates", "False"]
# The lens over 12 steps at 256 x 256: ~60 images at ~1 s each on a CPU, slow enough to interrupt; batches
# of 2, so the first JPEGs come early.
LENS = [*TINY[:4], "--width", "256", "--height", "256", "--seed", "1", "--num_steps", "12",
        "--decode_batch_size", "2"]  # fmt: skip
SUBPROCESS_RUNS = {  # test name -> {run name: args}
    "test_interrupt_during_sampling[safetensors-SIGINT]": {"run": [*LONG, "--format", "safetensors"]},
    "test_interrupt_during_sampling[safetensors-SIGTERM]": {"run": [*LONG, "--format", "safetensors"]},
    "test_interrupt_during_sampling[pt-SIGINT]": {"run": LONG},
    "test_a_safetensors_capture_killed_outright_still_decodes_and_replays": {
        "run": [*LONG, "--format", "safetensors"]
    },
    "test_interrupt_during_the_lens_leaves_only_complete_jpegs": {"run": LENS},
    "test_two_runs_in_one_folder_at_once_keep_their_own_files": {
        "a": [*TINY, "--seed", "1", "--num_steps", "2"],
        "b": [*TINY, "--seed", "2", "--num_steps", "2"],
    },
}


@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(request, tmp_path_factory) -> Iterator[dict[str, dict[str, Run]]]:
    """Start every selected subprocess run at once, before any test; kill what is left at the end."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    wanted = [name for name in SUBPROCESS_RUNS if name in selected]
    runs: dict[str, dict[str, Run]] = {}
    if wanted:
        ensure_tiny_repo()  # generate flux-tiny once here rather than in every subprocess at once
    for name in wanted:
        folder = tmp_path_factory.mktemp("subprocess")
        shared = folder / "out"  # the runs of one test share an output folder
        runs[name] = {key: Run(folder / key, args, shared) for key, args in SUBPROCESS_RUNS[name].items()}
        if name in HOLD_WHEN:
            run = runs[name]["run"]
            run.hold_when(lambda run=run, ready=HOLD_WHEN[name]: ready(run))
    yield runs
    for group in runs.values():
        for run in group.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def _steps_on_disk(out: Path) -> list[int] | None:
    for index in (out / "intermediates").glob("capture_*/index.json"):
        return json.loads(index.read_text())["steps_done"]
    return None


def _sampling_progress(run: Run) -> int:
    done = re.findall(r"sampling flux-tiny:[^\r\n]*?(\d+)/1000", run.stderr.read_text())
    return max(map(int, done), default=0)


def _lens_jpegs(run: Run) -> list[Path]:
    return [p for p in (run.out / "intermediates" / "decoded").glob("*/*.jpg") if not p.name.startswith(".")]


def _two_steps_done(run: Run) -> bool:
    if "safetensors" in run.args:
        return len(_steps_on_disk(run.out) or []) >= 2
    return _sampling_progress(run) >= 2


HOLD_WHEN = {  # test name -> where its run is paused to wait for it
    "test_interrupt_during_the_lens_leaves_only_complete_jpegs": _lens_jpegs,
    "test_interrupt_during_sampling[safetensors-SIGINT]": _two_steps_done,
    "test_interrupt_during_sampling[safetensors-SIGTERM]": _two_steps_done,
    "test_interrupt_during_sampling[pt-SIGINT]": _two_steps_done,
    "test_a_safetensors_capture_killed_outright_still_decodes_and_replays": _two_steps_done,
}


def test_interrupt_during_the_lens_leaves_only_complete_jpegs(subprocess_runs, request):
    run = subprocess_runs[request.node.name]["run"]
    decoded = run.out / "intermediates" / "decoded"
    run.wait_until(run.held.is_set, "a lens JPEG")
    rc, _ = run.stop(signal.SIGINT)
    output = run.output()
    assert rc == 130, output
    jpegs = _lens_jpegs(run)
    assert 1 <= len(jpegs) < 12 * N_BLOCKS and not list(decoded.glob("*/grid_*.jpg"))  # stopped midway
    for p in jpegs:
        with Image.open(p) as img:
            img.load()
            assert img.size == (256, 256)
    assert leftovers(run.out) == []
    # The run's own outputs were complete before the lens began, and the message says where they are.
    capture = only(run.out / "intermediates", "capture_*.pt")
    assert "while decoding the lens" in output and str(capture) in output
    assert json.loads(only(run.out / "intermediates", "metadata_*.json").read_text())["complete"] is True
    assert_readable(run.out)


@pytest.mark.parametrize(
    ("fmt", "sig", "rc_expected"),
    [
        pytest.param("safetensors", signal.SIGINT, 130, id="safetensors-SIGINT"),
        pytest.param("safetensors", signal.SIGTERM, 143, id="safetensors-SIGTERM"),
        pytest.param("pt", signal.SIGINT, 130, id="pt-SIGINT"),
    ],
)
def test_interrupt_during_sampling(subprocess_runs, request, fmt, sig, rc_expected):
    run = subprocess_runs[request.node.name]["run"]
    inter = run.out / "intermediates"
    run.wait_until(run.held.is_set, "2 steps done")
    seen = len(_steps_on_disk(run.out) or [])
    rc, seconds = run.stop(sig)
    output = run.output()
    assert rc == rc_expected, output
    assert seconds < STOP_S
    assert leftovers(run.out) == []
    assert not list(run.out.glob("img_*.jpg"))  # the image comes after sampling

    if fmt == "pt":
        assert "none was saved" in output and "Interrupted" in output
        assert not list(inter.glob("*.pt")) and not list(inter.glob("metadata_*.json"))
        return

    directory = only(inter, "capture_*_flux-tiny")
    assert f"saved in {directory}" in output and "incomplete" in output and "Interrupted" in output
    capture = load_capture(directory)
    meta = capture["metadata"]
    done = meta["steps_done"]
    # Stopped within a step: at most the steps already computed into the writer's buffers were added.
    assert seen <= len(done) <= seen + STREAMING_MAX_SETS + 1 and len(done) < 1000
    assert meta["complete"] is False and done == list(range(len(done))) and meta["captured_steps"] == done
    assert json.loads(only(inter, "metadata_*.json").read_text())["complete"] is False
    for entries in capture["single_blocks"].values():
        assert len(entries) == len(done) and all(x.shape == (1, 32 + 12, 64) for x in entries)
    for entries in capture["double_blocks"].values():
        assert all(img.shape == (1, 12, 64) and txt.shape == (1, 32, 64) for img, txt in entries)
    ctx = capture["denoising_context"]
    assert len(ctx["img_state"]) == len(ctx["vec"]) == len(done)
    assert ctx["txt"].shape == (1, 32, TINY_PARAMS.context_in_dim)  # the context is saved on the way out
    assert ctx["y"].shape == (1, TINY_PARAMS.vec_in_dim)


def test_a_safetensors_capture_killed_outright_still_decodes_and_replays(subprocess_runs, request, capsys):
    """SIGKILL (the OOM killer's signal) gives no chance to clean up: the context written before the first
    step is what lets the finished steps decode and replay."""
    run = subprocess_runs[request.node.name]["run"]
    run.wait_until(run.held.is_set, "2 steps on disk")
    assert run.stop(signal.SIGKILL)[0] == -signal.SIGKILL
    directory = only(run.out / "intermediates", "capture_*_flux-tiny")
    capture = load_capture(directory)
    done = capture["metadata"]["steps_done"]
    assert capture["metadata"]["complete"] is False and len(done) >= 2
    ctx = capture["denoising_context"]
    assert ctx["txt"].shape == (1, 32, TINY_PARAMS.context_in_dim) and ctx["txt_seq_len"] == 32
    assert "final_latent" not in ctx
    assert capture_sample.run(["decode", str(directory), "--progress", "False"]) == 0
    lens = only(run.out / "intermediates" / "decoded", "capture_*")
    assert len(list(lens.glob("*_block_*_step_*.jpg"))) == N_BLOCKS * len(done)
    capsys.readouterr()
    # Replaying the finished steps needs the text embeddings, ids and guidance: they were on disk already.
    from flux.interventions import replay
    from flux.loading import load_flow_model

    flow = load_flow_model(get_spec("flux-tiny"), "cpu", torch.float32)
    last = len(done) - 1  # replaying up to the step before it gives its stored latent
    assert torch.equal(replay(flow, capture, 0, last - 1).latent, ctx["img_state"][last])
    # The commands too, from the steps on disk, with nothing stored to compare the final image with.
    replays, sweeps = run.out / "replays", run.out / "sweeps"
    argv = ["replay", str(directory), "--output_dir", str(replays), "--progress", "False"]
    assert capture_sample.run(argv) == 0
    said = capsys.readouterr()
    assert "is an interrupted capture" in said.err
    assert said.out.splitlines()[-1] == (
        "0 changes made; the capture holds no final image to compare with (its run stopped early)."
    )
    assert json.loads((replays / "replay_0.json").read_text())["vs_stored_final"] is None
    assert capture_sample.run([*argv, "--step", str(len(done))]) == 2
    assert f"holds the latents of steps 0..{last} only" in capsys.readouterr().err
    argv = [
        "sweep",
        str(directory),
        "--blocks",
        "double:0",
        "--output_dir",
        str(sweeps),
        "--progress",
        "False",
    ]
    assert capture_sample.run(argv) == 0
    state = json.loads((sweeps / "sweep.json").read_text())
    assert state["complete"] is True and state["reference_vs_stored_latent_mse"] is None


def test_two_runs_in_one_folder_at_once_keep_their_own_files(subprocess_runs, request):
    runs = subprocess_runs[request.node.name]
    for run in runs.values():
        assert run.finish() == 0, run.output()
    out = runs["a"].out
    inter = out / "intermediates"
    assert sorted(p.name for p in out.glob("img_*.jpg")) == ["img_0.jpg", "img_1.jpg"]
    metas = [json.loads(p.read_text()) for p in sorted(inter.glob("metadata_*.json"))]
    assert len(metas) == 2 and len(list(inter.glob("capture_*.pt"))) == 2
    assert {m["seed"] for m in metas} == {1, 2}
    assert {m["files"]["image"] for m in metas} == {str(out / "img_0.jpg"), str(out / "img_1.jpg")}
    for m in metas:  # each metadata file names its own capture, which holds that run's seed
        assert load_capture(m["files"]["capture"])["metadata"]["seed"] == m["seed"]
    decoded = sorted((inter / "decoded").iterdir())
    assert len(decoded) == 2
    for folder in decoded:
        assert len(list(folder.glob("*_block_*_step_*.jpg"))) == 2 * N_BLOCKS
        assert len(list(folder.glob("grid_*.jpg"))) == 2
    assert leftovers(out) == []
    assert_readable(out)


# ------------------------------------------------------------------------------- faults while writing
class FullDisk(io.FileIO):
    """A real file that takes `room` bytes and then fails like a full disk: a short write, then ENOSPC (or
    the `error` given, such as the KeyboardInterrupt of Ctrl-C arriving mid-write)."""

    def __init__(self, path, mode: str, room: int, error: BaseException | None = None):
        super().__init__(path, mode)
        self.room, self.error = room, error

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise self.error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


class FullDiskNoFd(FullDisk):
    """As FullDisk, for Pillow: without a file descriptor it writes through `write`, which fails as a full
    disk does. With one, its C encoder writes to the descriptor: a failed write raises the same
    OSError(ENOSPC), and a short one is caught by save_jpeg's end-marker check (test_decode.py)."""

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def _jpeg_full_disk(match: str):
    """`open` for flux.decode: a JPEG whose temporary name contains `match` meets a full disk."""

    def open_(path, mode="r", *args, **kwargs):
        if match in Path(path).name:
            return FullDiskNoFd(path, mode, 4096)
        return open(path, mode, *args, **kwargs)

    return open_


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_full(real, match: str):
    """Path.write_text/write_bytes that, for a file whose name contains `match`, writes half and fails."""

    def write(self, data, *args, **kwargs):
        if match in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise _enospc()
        return real(self, data, *args, **kwargs)

    return write


def inject_full_disk(kind: str, monkeypatch) -> None:
    """Make one write of `kind` fail halfway with a full disk, as that writer reports it for real."""
    if kind == "pt":  # torch.save reports a RuntimeError whose context is the file's OSError
        monkeypatch.setattr(
            flux.torchsave, "open", lambda path, mode: FullDisk(path, mode, 4096), raising=False
        )
    elif kind == "pt-beside-lens":  # the same, but only once the lens has written a JPEG: mid-lens
        lens_started, write_image = threading.Event(), flux.decode._write_image

        def first_jpeg_then_go_on(*args, **kwargs):
            lens_started.set()
            return write_image(*args, **kwargs)

        def full_once_the_lens_runs(path, mode):
            assert lens_started.wait(60), "the lens never started"
            return FullDisk(path, mode, 4096)

        monkeypatch.setattr(flux.decode, "_write_image", first_jpeg_then_go_on)
        monkeypatch.setattr(flux.torchsave, "open", full_once_the_lens_runs, raising=False)
    elif kind in ("shard", "shard-rust"):  # the 2nd step's shard, in the writer thread
        real_save_file = flux.store.save_file

        def save_file(tensors, path, *args, **kwargs):
            if ".step_0001.safetensors" in Path(path).name:
                Path(path).write_bytes(b"\0" * 100)
                if kind == "shard":
                    raise _enospc()
                # What safetensors really raises on a full disk.
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            return real_save_file(tensors, path, *args, **kwargs)

        monkeypatch.setattr(flux.store, "save_file", save_file)
    elif kind == "json":
        monkeypatch.setattr(Path, "write_text", _half_then_full(Path.write_text, ".metadata_"))
    elif kind == "image":
        monkeypatch.setattr(flux.decode, "open", _jpeg_full_disk(".img_"), raising=False)
    elif kind == "lens-jpeg":
        monkeypatch.setattr(flux.decode, "open", _jpeg_full_disk("single_block_1_step_2"), raising=False)
    else:
        raise ValueError(kind)


FAULTS = {  # kind: (run options, folder of the failed write, check that nothing of it is visible)
    "pt": ({}, "intermediates", lambda new: not [p for p in new if p.suffix == ".pt"]),
    "shard": (
        {"format": "safetensors"},
        "intermediates/capture_*",
        lambda new: not [p for p in new if p.name == "step_0001.safetensors"],
    ),
    "json": ({}, "intermediates", lambda new: not [p for p in new if p.suffix == ".json"]),
    "image": ({}, ".", lambda new: not [p for p in new if p.name.startswith("img_")]),
    "lens-jpeg": (
        {"should_decode_intermediates": True},
        "intermediates/decoded/capture_*",
        lambda new: not [p for p in new if p.name == "single_block_1_step_2.jpg"],
    ),
}
FAULTS["shard-rust"] = FAULTS["shard"]
FAULTS["pt-beside-lens"] = (  # the .pt write fails in its thread while the lens decodes: no lens is left
    {"should_decode_intermediates": True},
    "intermediates",
    # `new` lists every folder (the earlier run's lens folder too) but only new files: no new file in any
    # lens folder, and no empty lens folder left.
    lambda new: (
        not [
            p
            for p in new
            if p.suffix == ".pt" or ("decoded" in p.parent.parts and (p.is_file() or not any(p.iterdir())))
        ]
    ),
)


@pytest.mark.parametrize("kind", list(FAULTS))
def test_full_disk_during_each_kind_of_write(kind, models, earlier, tmp_path, monkeypatch, capsys):
    """A full disk: a UserError naming the folder and the bytes needed; no partial file, no temp file; what
    was there before is untouched; everything left is readable."""
    overrides, folder_glob, failed_target_absent = FAULTS[kind]
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = snapshot(out)
    inject_full_disk(kind, monkeypatch)
    with pytest.raises(UserError, match="is full") as err:
        generate(models, options(out, **overrides), progress=False)
    monkeypatch.undo()
    message = str(err.value)
    # The folder the failed write was in: for a capture or lens folder, the one this run made.
    folder = out / folder_glob if folder_glob in (".", "intermediates") else None
    if folder is None:
        made = [p for p in out.glob(folder_glob) if p.is_dir() and not any(p in q.parents for q in before)]
        assert len(made) == 1, made
        folder = made[0]
    assert repr(str(folder)) in message and "is needed" in message, message
    assert snapshot(out).items() >= before.items()  # earlier outputs byte for byte
    new = [p for p in out.rglob("*") if p not in before]
    assert failed_target_absent(new), new
    assert leftovers(out) == []
    assert_readable(out)
    printed = capsys.readouterr().err  # reports of what was saved go to stderr with the errors
    assert "Interrupted" not in printed
    if kind.startswith("shard"):
        capture = load_capture(folder)
        assert capture["metadata"]["complete"] is False and capture["metadata"]["steps_done"] == [0]
        assert capture["single_blocks"]["block_0"][0].shape == (1, 44, 64)
        assert f"Stopped by an error (UserError): steps 0 are saved in {folder}" in printed


def test_an_interrupt_during_the_lens_waits_for_the_pt_written_beside_it(
    models, tmp_path, monkeypatch, capsys
):
    """The .pt is still being written when Ctrl-C stops the lens: the run waits for it, so the capture and
    its metadata are complete, and says so."""
    real_save, calls, said_waiting = flux.store.torch_save, [], threading.Event()

    class Stderr:
        """sys.stderr (capsys's), noting when the run says that it waits for the write."""

        def __init__(self, stream):
            self.stream = stream

        def write(self, text: str) -> int:
            if "Waiting for the capture to finish writing" in text:
                said_waiting.set()
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def slow_save(obj, path):
        # The write ends only once the run, interrupted, has said it waits for it: however slow the machine,
        # the lens is interrupted while the .pt is still being written (a sleep could end first).
        assert said_waiting.wait(STOP_S), "the run never said that it waits for the capture"
        real_save(obj, path)
        calls.append(path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stderr", Stderr(sys.stderr))
    monkeypatch.setattr(flux.store, "torch_save", slow_save)
    monkeypatch.setattr(flux.decode, "lens_latent", interrupt)  # the lens only, not the image
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        generate(models, options(out, should_decode_intermediates=True), progress=False)
    printed = capsys.readouterr().err
    assert calls and "Waiting for the capture to finish writing" in printed
    capture = only(out / "intermediates", "capture_*.pt")
    assert "Interrupted while decoding the lens. Saved and complete: the image" in printed
    assert str(capture) in printed
    assert load_capture(capture)["metadata"]["model"] == "flux-tiny"
    assert json.loads(only(out / "intermediates", "metadata_*.json").read_text())["complete"] is True
    assert leftovers(out) == [] and not list((out / "intermediates").glob(".*.claim"))


@pytest.mark.parametrize(
    ("interrupt", "rc_expected"), [(KeyboardInterrupt(), 130), (KeyboardInterrupt("signal 15"), 143)]
)
def test_an_interrupt_while_the_pt_is_written_stops_the_run(
    interrupt, rc_expected, earlier, tmp_path, monkeypatch, capsys
):
    """Ctrl-C or SIGTERM during the .pt's write: torch's zip writer must not turn it into a crash (exit 1)."""
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = snapshot(out)
    monkeypatch.setattr(
        flux.torchsave,
        "open",
        lambda path, mode: FullDisk(path, mode, 4096, interrupt),
        raising=False,
    )
    # Without the lens, as in the CI run that found this: the .pt is written in the main thread, where
    # signals arrive. (Beside the lens a thread writes it, and the main thread is the one interrupted.)
    args = [*TINY, "--seed", "1", "--num_steps", "2", "--should_decode_intermediates", "False"]
    rc = cli(*args, "--output_dir", str(out))
    printed = capsys.readouterr()
    assert rc == rc_expected, printed
    assert "Interrupted: a .pt capture is written only at the end, so none was saved." in printed.err
    assert "Traceback" not in printed.err
    assert snapshot(out).items() >= before.items()
    assert not [p for p in out.rglob("*") if p not in before and p.suffix == ".pt"]
    assert leftovers(out) == []


def test_full_disk_in_the_writer_thread_is_one_paragraph_from_the_cli(tmp_path, monkeypatch, capsys):
    inject_full_disk("shard", monkeypatch)
    out = tmp_path / "out"
    args = [*TINY, "--seed", "1", "--num_steps", "6", "--format", "safetensors"]
    rc = cli(*args, "--should_decode_intermediates", "False", "--output_dir", str(out))
    captured = capsys.readouterr()
    assert rc == 1
    directory = only(out / "intermediates", "capture_*_flux-tiny")
    line = error_line(captured.err)
    assert "is full" in line and repr(str(directory)) in line and "is needed" in line
    assert "Interrupted" not in captured.out + captured.err
    assert f"Stopped by an error (UserError): steps 0 are saved in {directory}" in captured.err
    assert json.loads((directory / "index.json").read_text())["complete"] is False
    assert leftovers(out) == []


def test_claims_are_unique_when_runs_race_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(flux.store.time, "strftime", lambda fmt: "20250101_000000")
    barrier, stems = threading.Barrier(8), []

    def claim():
        barrier.wait()
        stems.append(claim_stem(tmp_path, "flux-tiny"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(stems)) == 8
    assert stems.count("capture_20250101_000000_flux-tiny") == 1


# ------------------------------------------------------------------------------------- untrusted files
def decode(path: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = capture_sample.run(["decode", str(path), "--output_dir", str(tmp_path / "decoded"), *extra])
    return rc, capsys.readouterr().err


def test_torch_load_is_only_ever_called_with_weights_only():
    """Every torch.load in the library and the CLI passes weights_only=True; nothing unpickles directly."""
    for path in [ROOT / "capture_sample.py", *sorted((ROOT / "flux").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert not name.startswith(("pickle.", "dill.", "cloudpickle.")), f"{path.name}: {name}"
            if name == "torch.load" or name.endswith(".torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, (
                    f"{path.name}:{node.lineno}"
                )


def test_decode_reads_pt_with_weights_only(earlier, tmp_path, monkeypatch, capsys):
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    rc, _ = decode(only(earlier / "intermediates", "capture_*.pt"), tmp_path, capsys)
    assert rc == 0 and calls and all(kw.get("weights_only") is True for kw in calls)


def test_a_pt_that_pickles_code_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "capture_evil.pt"
    torch.save({"metadata": Evil(), "double_blocks": {}, "single_blocks": {}, "denoising_context": {}}, evil)
    rc, err = decode(evil, tmp_path, capsys)
    assert rc == 1 and "Refusing" in error_line(err) and repr(str(evil)) in error_line(err)
    assert not marker.exists()
    assert not (tmp_path / "decoded").exists()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 8)


PT_DAMAGE = {
    "truncated": (_truncate, "corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "is not a complete capture"),
    "a tensor, not a capture": (lambda p: torch.save(torch.zeros(3), p), "not a capture"),
    "a dict of other things": (lambda p: torch.save({"weight": torch.zeros(3)}, p), "not a capture"),
}


@pytest.mark.parametrize("damage", list(PT_DAMAGE))
def test_damaged_pt_is_a_clear_error_naming_the_file(damage, earlier, tmp_path, capsys):
    pt = tmp_path / "capture_x.pt"
    shutil.copy(only(earlier / "intermediates", "capture_*.pt"), pt)
    spoil, words = PT_DAMAGE[damage]
    spoil(pt)
    rc, err = decode(pt, tmp_path, capsys)
    line = error_line(err)
    assert rc == 1 and words in line and repr(str(pt)) in line
    assert not (tmp_path / "decoded").exists()


def test_a_file_of_another_kind_is_named_not_called_tampered_with(earlier, st_capture, tmp_path, capsys):
    """An image or a safetensors file passed as a capture: a sentence saying what it is and what to pass
    (exit 2), where torch.load's failure read as pickled code or a torch file of other things."""
    image = only(earlier, "img_*.jpg")
    png = tmp_path / "figure.bin"  # named by its bytes, not its suffix
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    weights = tmp_path / "weights.safetensors"
    shutil.copy(st_capture / "context.safetensors", weights)
    for path, words in (
        (image, "is an image, not a capture: a capture is a capture_*.pt file or a capture_* folder"),
        (png, "is an image, not a capture"),
        (
            st_capture / "step_0001.safetensors",
            f"is one file of a capture: pass its folder, {str(st_capture)!r}",
        ),
        (weights, "is a safetensors file, not a capture"),
    ):
        rc, err = decode(path, tmp_path, capsys)
        assert rc == 2 and words in error_line(err), err
    assert not (tmp_path / "decoded").exists()


def _drop_steps_done(p: Path) -> None:
    index = json.loads(p.read_text())
    del index["steps_done"]
    p.write_text(json.dumps(index))


DIR_DAMAGE = {  # what to spoil, how, and whether the error comes before the output folder is made
    "garbage shard": ("step_0001.safetensors", _garbage),
    "truncated shard": ("step_0000.safetensors", _truncate),
    "missing shard": ("step_0001.safetensors", Path.unlink),
    "garbage context": ("context.safetensors", _garbage),
    "truncated index": ("index.json", _truncate),
    "binary index": ("index.json", _garbage),
    "index without steps_done": ("index.json", _drop_steps_done),
}


@pytest.mark.parametrize("damage", list(DIR_DAMAGE))
def test_damaged_safetensors_capture_is_a_clear_error_naming_the_file(damage, st_capture, tmp_path, capsys):
    directory = tmp_path / st_capture.name
    shutil.copytree(st_capture, directory)
    name, spoil = DIR_DAMAGE[damage]
    spoil(directory / name)
    rc, err = decode(directory, tmp_path, capsys)
    line = error_line(err)
    assert rc == 1 and repr(str(directory / name)) in line, line
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--guidance", "-1"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "1e999"], "--guidance"),
        (["--device", "foo"], "--device"),
        (["--decode_batch_size", "0"], "--decode_batch_size"),
        (["--decode_batch_size", "2.5"], "--decode_batch_size"),
        (["--offload", "3"], "--offload"),
        (["--analyze", "maybe"], "--analyze"),
        (["--compile_decoder", "2"], "--compile_decoder"),
        (["--num_steps", "1001"], "--num_steps"),
        (["--seed", "-1"], "--seed"),
        (["--width", "0"], "--width"),
        (["--height", "8192"], "--height"),
    ],
)
def test_more_bad_values_exit_2_naming_the_flag(args, flag, tmp_path, capsys):
    out = tmp_path / "never"
    rc = cli("--model", "flux-tiny", "--output_dir", str(out), *args)
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and flag in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("path", "args", "flag"),
    [
        (None, ["--decode_target", "x1"], "--decode_target"),
        (None, ["--decode_batch_size", "0"], "--decode_batch_size"),
        (None, ["--device", "foo"], "--device"),
        ("no/such/capture.pt", [], "No capture at"),
    ],
)
def test_bad_values_for_decode_exit_2_naming_the_flag(path, args, flag, earlier, tmp_path, capsys):
    path = path or str(only(earlier / "intermediates", "capture_*.pt"))
    out = tmp_path / "never"
    rc = capture_sample.run(["decode", path, "--output_dir", str(out), *args])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and flag in line
    assert not out.exists()


def test_a_gpu_number_past_the_last_gpu_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as --device sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "never"
    rc = cli("--model", "flux-tiny", "--output_dir", str(out), "--device", "cuda:1")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--device cuda:1" in line and "1 CUDA GPU(s)" in line
    assert not out.exists()


# ----------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_shards_and_image(models, tmp_path):
    a = generate(models, options(tmp_path / "a", format="safetensors"), progress=False)
    b = generate(models, options(tmp_path / "b", format="safetensors"), progress=False)
    assert a.image_path.read_bytes() == b.image_path.read_bytes()
    shards = sorted(p.name for p in a.capture_path.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.capture_path.glob("*.safetensors"))
    assert len(shards) == 4 + 1  # a shard per step, and the context
    for name in shards:
        assert (a.capture_path / name).read_bytes() == (b.capture_path / name).read_bytes(), name


def test_same_seed_gives_equal_tensors_everywhere_in_the_capture(models, earlier, tmp_path):
    again = generate(models, options(tmp_path), progress=False)  # as `earlier`, without the lens
    a = dict(flatten(load_capture(only(earlier / "intermediates", "capture_*.pt"))))
    b = dict(flatten(load_capture(again.capture_path)))
    assert a.keys() == b.keys()
    tensors = 0
    for key, x in a.items():
        if key.startswith("/metadata"):
            continue
        if isinstance(x, torch.Tensor):
            tensors += 1
            assert x.dtype == b[key].dtype and torch.equal(x, b[key]), key
        else:
            assert x == b[key], key
    # 4 steps of (img, txt) for 2 double blocks and x for 3 single ones, img_state, vec and pred per step,
    # and y, txt, txt_ids, img_ids, final_latent.
    assert tensors == 4 * (2 * 2 + 3) + 4 * 3 + 5


def test_metadata_records_everything_needed_to_reproduce_the_run(tmp_path):
    first = tmp_path / "first"
    # No --seed: a random one, which the metadata must record. --force: a flag that has no effect here (the
    # disk has room), to check that all flags are recorded, not only those that matter.
    assert cli(*TINY, "--force", "--should_decode_intermediates", "False", "--output_dir", str(first)) == 0
    meta = json.loads(only(first / "intermediates", "metadata_*.json").read_text())
    for key in ("model", "prompt", "width", "height", "num_steps", "timesteps", "seed", "guidance", "dtype",
                "capture_dtype", "device", "versions", "flags", "schema_version", "timestamp"):  # fmt: skip
        assert key in meta, key
    assert {"python", "torch", "transformers", "safetensors", "numpy"} <= meta["versions"].keys()
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and isinstance(meta["seed"], int)
    assert set(inspect.signature(capture_sample.main).parameters) - {"progress"} <= meta["flags"].keys()
    assert meta["flags"]["force"] is True and meta["flags"]["seed"] is None

    flags = {k: v for k, v in meta["flags"].items() if v is not None and k != "output_dir"}
    argv = [arg for k, v in flags.items() for arg in (f"--{k}", str(v))]
    assert cli(*argv, "--seed", str(meta["seed"]), "--output_dir", str(tmp_path / "again")) == 0
    assert (tmp_path / "again" / "img_0.jpg").read_bytes() == (first / "img_0.jpg").read_bytes()


def test_seed_0_is_that_seed_and_a_deleted_images_number_is_not_reused(models, tmp_path):
    """`--seed 0` is the seed 0, not "draw one"; an image takes one past the highest img_N.jpg in the folder;
    and with --should_decode_intermediates False there is no lens."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "img_3.jpg").write_bytes(b"")  # img_0 to img_2 were deleted by hand
    a = generate(models, options(out, seed=0), progress=False)
    b = generate(models, options(out, seed=0, capture=False), progress=False)
    assert (a.image_path.name, b.image_path.name) == ("img_4.jpg", "img_5.jpg")
    assert a.metadata["seed"] == b.metadata["seed"] == json.loads(a.metadata_path.read_text())["seed"] == 0
    assert a.image_path.read_bytes() == b.image_path.read_bytes()
    assert a.decoded_dir is None and not (out / "intermediates" / "decoded").exists()
