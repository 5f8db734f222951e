"""Capture files: atomic writes, unique names, both formats, lazy loading, incomplete runs, bad files."""

import copy
import errno
import gc
import io
import json
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux import load_capture
from flux.capture import BlockCapture, BufferPool, CapturePlan
from flux.configs import TINY_PARAMS
from flux.errors import UserError
from flux.model import Flux
from flux.sampling import denoise, get_noise, get_schedule, prepare
from flux.store import (
    LazyList,
    PtSink,
    SafetensorsSink,
    atomic_write,
    beside_capture,
    claim_stem,
    fresh_dir,
    next_free_index,
    publish_new,
    write_json,
)

NUM_STEPS = 3


@pytest.fixture(scope="module")
def model() -> Flux:
    torch.manual_seed(0)
    return Flux(TINY_PARAMS).eval().requires_grad_(False)


def _capture(model, sink_factory, plan: CapturePlan, stop_after: int | None = None, limit: int | None = 2):
    """Run the sampler with capture into a sink; optionally raise KeyboardInterrupt after some steps.

    A .pt sink keeps every step, so its pool must be unbounded (limit=None); the streaming sink recycles.
    """
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(1, 5, TINY_PARAMS.context_in_dim, generator=g)
    y = torch.randn(1, TINY_PARAMS.vec_in_dim, generator=g)
    inp = prepare(get_noise(1, 48, 64, "cpu", torch.float32, 7), txt, y)
    timesteps = get_schedule(NUM_STEPS, inp["img"].shape[1])
    shapes, dtypes = BlockCapture.shapes_for(model, plan, 1, 5, inp["img"].shape[1], torch.float32)
    meta = {
        "captured_steps": list(plan.steps),
        "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
        "streams": plan.streams,
        "height": 48,
        "width": 64,
    }
    pool = BufferPool(shapes, dtypes, pin=False, limit=limit)
    sink = sink_factory(pool, meta)
    context = {"y": y, "txt": inp["txt"], "txt_seq_len": 5, "guidance": 3.5}

    def after(info):
        sink.add_step(cap.end_step())
        if stop_after is not None and info.index + 1 == stop_after:
            raise KeyboardInterrupt

    with BlockCapture(model, plan, pool, 5) as cap:
        try:
            out = denoise(
                model, **{k: inp[k] for k in ("img", "img_ids", "txt", "txt_ids", "vec")},
                timesteps=timesteps, guidance=3.5,
                before_step=lambda info: cap.begin_step(info.index, info.img), after_step=after,
            )  # fmt: skip
        except KeyboardInterrupt:
            return sink.abort(context), pool
    context["final_latent"] = out
    return sink.finish(context, meta), pool


def test_pt_and_safetensors_load_to_identical_tensors(model, tmp_path):
    plan = CapturePlan.everything(model, NUM_STEPS)
    pt, _ = _capture(model, lambda pool, meta: PtSink(tmp_path / "c.pt", pool), plan, limit=None)
    (tmp_path / "st").mkdir()
    st, pool = _capture(model, lambda pool, meta: SafetensorsSink(tmp_path / "st", pool, meta), plan)
    a, b = load_capture(pt), load_capture(st)
    assert a["metadata"]["complete"] is b["metadata"]["complete"] is True
    assert set(a["double_blocks"]) == set(b["double_blocks"]) and set(a["single_blocks"]) == set(
        b["single_blocks"]
    )
    for name, steps in a["double_blocks"].items():
        assert len(steps) == len(b["double_blocks"][name]) == NUM_STEPS
        for (ai, at), (bi, bt) in zip(steps, b["double_blocks"][name]):
            assert torch.equal(ai, bi) and torch.equal(at, bt)
    for name, steps in a["single_blocks"].items():
        for x, z in zip(steps, b["single_blocks"][name]):
            assert torch.equal(x, z)
    for key in ("img_state", "vec", "pred"):
        for x, z in zip(a["denoising_context"][key], b["denoising_context"][key]):
            assert torch.equal(x, z)
    for key in ("y", "txt", "final_latent"):
        assert torch.equal(a["denoising_context"][key], b["denoising_context"][key])
    assert isinstance(b["single_blocks"]["block_0"], LazyList)
    with pytest.raises(TypeError, match=r"make it a list first, list\(...\)"):
        torch.save(b["single_blocks"], io.BytesIO())
    torch.save({name: list(steps) for name, steps in b["single_blocks"].items()}, io.BytesIO())
    lazy = b["single_blocks"]["block_0"]
    for copied in (copy.copy(lazy), copy.deepcopy(b["single_blocks"])["block_0"]):
        assert len(copied) == NUM_STEPS and torch.equal(copied[1], lazy[1])
    assert pool.allocated <= 2  # the writer reused at most two host buffer sets for three steps
    # Read whole, a safetensors capture is what the .pt holds, and torch.save writes it as it is.
    whole = load_capture(st, lazy=False)
    buffer = io.BytesIO()
    torch.save(whole, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for name, steps in a["double_blocks"].items():
        assert [
            [torch.equal(x, y) for x, y in zip(p, q)] for p, q in zip(steps, saved["double_blocks"][name])
        ] == [[True, True]] * NUM_STEPS
    assert all(isinstance(v, list) for v in saved["single_blocks"].values())
    for key in ("img_state", "vec", "pred"):
        assert all(
            torch.equal(x, z) for x, z in zip(a["denoising_context"][key], saved["denoising_context"][key])
        )


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's maps (Linux)")
def test_a_lazy_capture_maps_what_it_reads_until_it_is_dropped_and_never_writes_the_file(model, tmp_path):
    """As docs/capture_format.md says: a change made in place is seen by later reads of the same loaded
    capture, not by a fresh load, and never reaches the file; a shard read stays mapped until the capture
    is dropped."""
    plan = CapturePlan.everything(model, NUM_STEPS)
    _capture(model, lambda pool, meta: SafetensorsSink(tmp_path, pool, meta), plan)
    shard = tmp_path / "step_0001.safetensors"
    before = shard.read_bytes()

    def mapped() -> set[str]:
        lines = Path("/proc/self/maps").read_text().splitlines()
        return {Path(line.split(maxsplit=5)[5]).name for line in lines if str(tmp_path) in line}

    capture = load_capture(tmp_path)
    assert "step_0001.safetensors" not in mapped()  # opening reads the index and the context only
    first = capture["single_blocks"]["block_0"][1].clone()
    assert mapped() >= {"step_0001.safetensors"} and "step_0002.safetensors" not in mapped()
    capture["single_blocks"]["block_0"][1].add_(1)
    assert torch.equal(capture["single_blocks"]["block_0"][1], first + 1)
    assert torch.equal(load_capture(tmp_path)["single_blocks"]["block_0"][1], first)
    assert shard.read_bytes() == before
    del capture
    gc.collect()
    assert "step_0001.safetensors" not in mapped()


def test_a_deep_copy_of_a_lazy_capture_shares_no_tensor_with_it(model, tmp_path):
    """copy.deepcopy of a safetensors capture is apart from it, as one of a .pt is: a tensor changed in place
    in either is unchanged in the other (both read the same shards, the copy through maps of its own)."""
    plan = CapturePlan.everything(model, NUM_STEPS)
    (tmp_path / "st").mkdir()
    st, _ = _capture(model, lambda pool, meta: SafetensorsSink(tmp_path / "st", pool, meta), plan)
    capture = load_capture(st)
    copied = copy.deepcopy(capture)
    single = capture["single_blocks"]["block_0"][1].clone()
    img, txt = (t.clone() for t in capture["double_blocks"]["block_1"][2])
    state = capture["denoising_context"]["img_state"][0].clone()
    capture["single_blocks"]["block_0"][1].add_(1)
    capture["double_blocks"]["block_1"][2][1].add_(1)
    copied["denoising_context"]["img_state"][0].zero_()
    assert torch.equal(copied["single_blocks"]["block_0"][1], single)
    assert torch.equal(copied["double_blocks"]["block_1"][2][0], img)
    assert torch.equal(copied["double_blocks"]["block_1"][2][1], txt)
    assert torch.equal(capture["denoising_context"]["img_state"][0], state)
    assert len(copied["denoising_context"]["vec"]) == NUM_STEPS


def test_interrupted_safetensors_capture_keeps_finished_steps(model, tmp_path):
    plan = CapturePlan.everything(model, NUM_STEPS)
    steps_saved, _ = _capture(
        model, lambda pool, meta: SafetensorsSink(tmp_path, pool, meta), plan, stop_after=2
    )
    assert steps_saved == [0, 1]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["complete"] is False and index["steps_done"] == [0, 1]
    capture = load_capture(tmp_path)
    assert capture["metadata"]["complete"] is False
    assert len(capture["single_blocks"]["block_0"]) == 2
    assert capture["single_blocks"]["block_0"][1].shape == (1, 17, 64)
    assert not list(tmp_path.glob(".*tmp*"))


def test_capture_files_get_the_permissions_of_any_new_file(model, tmp_path):
    # safetensors 0.8 creates its files 0o600: a capture shared with a group would show its index.json to
    # the group and hide its tensors. Every file gets 0o666 less the umask, like any other new file.
    plan = CapturePlan.everything(model, NUM_STEPS)
    old = os.umask(0o027)
    try:
        (tmp_path / "st").mkdir()
        _capture(model, lambda pool, meta: SafetensorsSink(tmp_path / "st", pool, meta), plan)
        _capture(model, lambda pool, meta: PtSink(tmp_path / "c.pt", pool), plan, limit=None)
        stem = claim_stem(tmp_path, "flux-tiny")  # the claim a run holds while it writes (not executable)
    finally:
        os.umask(old)
    files = [*(tmp_path / "st").iterdir(), tmp_path / "c.pt", tmp_path / f".{stem}.claim"]
    assert len(files) == NUM_STEPS + 4  # the shards, context.safetensors, index.json, the .pt, the claim
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o640" for f in files}


def _set_default_acl(folder, entries: list[tuple[int, int]]) -> None:
    """`setfacl -d -m` without the acl package: the system.posix_acl_default attribute in the kernel's
    format (version 2, then tag, permissions, id per entry, little-endian), entries in tag order."""
    undefined_id = 0xFFFFFFFF  # for the owner, owning group, mask and other entries
    data = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, undefined_id) for tag, perm in entries
    )
    os.setxattr(folder, "system.posix_acl_default", data)


@pytest.mark.skipif(not hasattr(os, "setxattr"), reason="POSIX ACLs are a Linux feature")
def test_a_folder_shared_by_a_default_acl_keeps_sharing_the_capture_files(tmp_path):
    # A default ACL, not the umask, decides a new file's mode in such a folder: a team's shared folder. The
    # files of a capture (here one from safetensors, which makes its own file owner-only) follow the folder.
    shared = tmp_path / "shared"
    shared.mkdir()
    user_obj, group_obj, mask, other = 0x01, 0x04, 0x10, 0x20  # the kernel's ACL tags
    try:  # u::rw,g::rw,m::rw,o::-
        _set_default_acl(shared, [(user_obj, 6), (group_obj, 6), (mask, 6), (other, 0)])
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        pytest.skip(f"this filesystem takes no ACLs: {e}")
    old = os.umask(0o077)
    try:
        atomic_write(shared / "a.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
        write_json(shared / "index.json", {"x": 1})
    finally:
        os.umask(old)
    for name in ("a.safetensors", "index.json"):
        assert oct((shared / name).stat().st_mode & 0o777) == "0o660", name  # group rw, as the ACL says


def test_an_unreadable_shard_is_called_unreadable(model, tmp_path, monkeypatch):
    import flux.store

    plan = CapturePlan.everything(model, NUM_STEPS)
    _capture(model, lambda pool, meta: SafetensorsSink(tmp_path, pool, meta), plan)

    def not_permitted(path, *args, **kwargs):  # what safetensors 0.8 raises for a file it may not open
        raise FileNotFoundError(f"No such file or directory: {path}")

    monkeypatch.setattr(flux.store, "safe_open", not_permitted)
    with pytest.raises(UserError, match=r"context.safetensors': permission denied"):
        load_capture(tmp_path)
    (tmp_path / "context.safetensors").unlink()
    capture = load_capture(tmp_path)
    with pytest.raises(UserError, match=r"step_0000.safetensors' is not readable \(permission denied\)"):
        capture["single_blocks"]["block_0"][0]
    (tmp_path / "step_0001.safetensors").unlink()
    with pytest.raises(UserError, match=r"step_0001.safetensors' is missing \(moved or deleted\)"):
        capture["single_blocks"]["block_0"][1]


def test_a_lazy_capture_reads_its_shards_after_a_change_of_directory(model, tmp_path, monkeypatch):
    plan = CapturePlan.everything(model, NUM_STEPS)
    (tmp_path / "st").mkdir()
    _capture(model, lambda pool, meta: SafetensorsSink(tmp_path / "st", pool, meta), plan)
    monkeypatch.chdir(tmp_path)
    capture = load_capture("st")  # relative, as a notebook beside it would open it
    monkeypatch.chdir(tmp_path.parent)
    assert capture["single_blocks"]["block_0"][1].shape == (1, 17, 64)
    # A shard that is gone is named as missing, not as corrupt.
    (tmp_path / "st" / "step_0002.safetensors").unlink()
    with pytest.raises(UserError, match=r"step_0002.safetensors' is missing \(moved or deleted\)"):
        capture["single_blocks"]["block_0"][2]


def test_a_pt_in_torchs_legacy_format_still_loads(model, tmp_path):
    plan = CapturePlan.everything(model, NUM_STEPS)
    pt, _ = _capture(model, lambda pool, meta: PtSink(tmp_path / "c.pt", pool), plan, limit=None)
    capture = load_capture(pt)
    legacy = tmp_path / "legacy.pt"
    torch.save(capture, legacy, _use_new_zipfile_serialization=False)  # not a zip: cannot be memory-mapped
    again = load_capture(legacy)
    assert torch.equal(again["single_blocks"]["block_2"][1], capture["single_blocks"]["block_2"][1])


def test_outputs_go_beside_the_capture_as_named(tmp_path, monkeypatch):
    run = tmp_path / "run" / "intermediates"
    run.mkdir(parents=True)
    (run / "capture_x.pt").write_bytes(b"")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_capture.pt").symlink_to(run / "capture_x.pt")
    # A symlink names the capture where the user put it (its target may be in a read-only folder).
    assert beside_capture(tmp_path / "mine" / "my_capture.pt", "decoded") == (
        tmp_path / "mine" / "decoded",
        "my_capture",
    )
    (run / "capture_y").mkdir()
    monkeypatch.chdir(run / "capture_y")
    assert beside_capture(".", "sweeps") == (run / "sweeps", "capture_y")  # `.` inside a safetensors capture


def test_fresh_dir_takes_back_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt), fresh_dir(tmp_path / "kept" / "a" / "b" / "out"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(OSError), fresh_dir(tmp_path / "kept" / "a" / "out") as out:
        (out / "half.csv").write_text("x")
        raise OSError("disk full")
    assert (tmp_path / "kept" / "a" / "out" / "half.csv").is_file()  # what was written stays
    with fresh_dir(tmp_path / "kept" / "a" / "out") as out:
        pass
    assert out.name == "out_1" and out.is_dir()


def test_interrupted_pt_capture_writes_nothing(model, tmp_path):
    plan = CapturePlan.everything(model, NUM_STEPS)
    _capture(model, lambda pool, meta: PtSink(tmp_path / "c.pt", pool), plan, stop_after=1, limit=None)
    assert list(tmp_path.iterdir()) == []


def test_plan_subset_round_trips(model, tmp_path):
    plan = CapturePlan((1,), (2,), (0, 2), streams="img")
    st, _ = _capture(model, lambda pool, meta: SafetensorsSink(tmp_path, pool, meta), plan)
    capture = load_capture(st)
    assert list(capture["double_blocks"]) == ["block_1"] and list(capture["single_blocks"]) == ["block_2"]
    img, txt = capture["double_blocks"]["block_1"][1]
    assert txt is None and img.shape == (1, 12, 64)
    assert capture["metadata"]["captured_steps"] == [0, 2]
    assert len(capture["denoising_context"]["img_state"]) == NUM_STEPS


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="full") as err:
        atomic_write(target, failing, needed=2_000_000_000)
    assert str(tmp_path) in str(err.value) and "2.00 GB" in str(err.value)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _capture_like(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "single_blocks": {
            "block_0": [torch.randn(3, 5, generator=gen).bfloat16(), torch.randn(300, generator=gen)]
        },
        "denoising_context": {"txt_seq_len": 4, "timestep_pairs": [(1.0, 0.5)]},
    }


def _torch_save_bytes(obj, path) -> bytes:
    with open(path, "wb") as f:
        torch.save(obj, f)  # with its own CRC32s, computed inline
    return path.read_bytes()


def test_pt_captures_are_byte_for_byte_what_torch_save_writes(tmp_path, monkeypatch):
    """The CRC32s filled in after the write, and the serialization id torch derives from them, make the same
    file as torch.save computing them inline: which passes zipfile's integrity check (as `unzip -t` and the
    pickle scanners built on zipfile need; torch.load never checks) and differs from capture to capture."""
    import zipfile

    from flux.torchsave import _crc_config, torch_save

    ids, saves, real_save = set(), [], torch.save

    def counted_save(*args, **kwargs):
        saves.append(1)
        return real_save(*args, **kwargs)

    for seed in range(2):
        obj, ours = _capture_like(seed), tmp_path / f"c{seed}.pt"
        saves.clear()
        monkeypatch.setattr(torch, "save", counted_save)
        torch_save(obj, ours)
        monkeypatch.undo()
        assert saves == [1]  # written once: the fallback, which writes it again, was not needed
        assert ours.read_bytes() == _torch_save_bytes(obj, tmp_path / "plain.pt")
        with zipfile.ZipFile(ours) as archive:
            assert archive.testzip() is None
            assert all(info.CRC != 0 for info in archive.infolist() if "/data/" in info.filename)
            ids |= {archive.read(name) for name in archive.namelist() if name.endswith("serialization_id")}
        loaded = torch.load(ours, weights_only=True)
        assert all(map(torch.equal, loaded["single_blocks"]["block_0"], obj["single_blocks"]["block_0"]))
        assert loaded["denoising_context"] == obj["denoising_context"]
    if (config := _crc_config()) is not None:  # torch's process-wide setting is left as it was
        assert config.compute_crc32 is True
        assert len(ids) == 2  # torch >= 2.6 writes an id, and it tells these captures apart


def test_torch_save_falls_back_to_torch_when_the_layout_is_unexpected(tmp_path, monkeypatch):
    """If the written file is not laid out as expected, it is written again by torch.save with its own
    CRC32s: the same file, never a capture lost."""
    import flux.torchsave
    from flux.torchsave import _crc_config, torch_save

    if _crc_config() is None:
        pytest.skip("this torch cannot leave the CRC32s out, so torch_save is plain torch.save")
    calls = []

    def unexpected(fd, crcs):
        calls.append(fd)
        raise ValueError("unexpected serialization id")

    monkeypatch.setattr(flux.torchsave, "_fix_serialization_id", unexpected)
    obj, ours = _capture_like(0), tmp_path / "c.pt"
    torch_save(obj, ours)
    assert calls and ours.read_bytes() == _torch_save_bytes(obj, tmp_path / "plain.pt")


class _Unseekable(io.RawIOBase):
    """A write-only stream that cannot seek: zipfile puts each CRC32 in a data descriptor after the data."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


@pytest.mark.parametrize("descriptors", [False, True], ids=["crc-in-header", "data-descriptor"])
@pytest.mark.parametrize("zip64", [False, True], ids=["zip32", "zip64"])
def test_fill_zip_crc32s_restores_every_crc(tmp_path, monkeypatch, descriptors, zip64):
    """An archive written by Python's zipfile, with every CRC32 zeroed, gets back exactly its bytes: with the
    CRC in the local header or in a data descriptor, with a comment on every record, and with zip64 records
    (zipfile writes them for small files when its limit is lowered), as torch does for captures over 4 GB."""
    import zipfile

    from flux.torchsave import fill_zip_crc32s

    if zip64:
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    rng = np.random.default_rng(0)
    payloads = {f"archive/data/{i}": rng.bytes(n) for i, n in enumerate([0, 1, 150, 7000, 70_000])}
    stream = _Unseekable() if descriptors else io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
        for i, (name, payload) in enumerate(payloads.items()):
            info = zipfile.ZipInfo(name)
            info.comment = b"record %d's comment" % i  # the next directory entry starts after it
            archive.writestr(info, payload)
    original = bytes(stream.data if descriptors else stream.getvalue())
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        infos = archive.infolist()
        assert all(bool(info.flag_bits & 8) == descriptors for info in infos)
        assert zip64 == (b"PK\x06\x06" in original)
    zeroed = original
    for info in infos:
        if info.CRC == 0:  # the empty record
            continue
        crc = struct.pack("<L", info.CRC)
        assert zeroed.count(crc) == 2  # its local header or data descriptor, and its central directory entry
        zeroed = zeroed.replace(crc, bytes(4))
    path = tmp_path / "a.zip"
    path.write_bytes(zeroed)
    with open(path, "r+b") as f:
        fill_zip_crc32s(f.fileno(), workers=3)
    assert path.read_bytes() == original


def test_fill_zip_crc32s_finds_the_directory_past_a_lookalike_signature(tmp_path):
    """The end-of-directory signature is searched from the end; the same four bytes in the archive comment
    (or in the record's own fields) are not taken for it: the record found must end the file."""
    import zipfile

    from flux.torchsave import fill_zip_crc32s

    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a", b"payload " * 100)
        # Python's zipfile cannot read it back. The lookalike has more than an end record's 22 bytes after
        # it, so only the check that its record ends the file tells it from the real one.
        archive.comment = b"a comment holding PK\x05\x06 and then more than twenty-two bytes of text"
        crc = archive.getinfo("a").CRC
    original = stream.getvalue()
    path = tmp_path / "a.zip"
    path.write_bytes(original.replace(struct.pack("<L", crc), bytes(4)))
    with open(path, "r+b") as f:
        assert fill_zip_crc32s(f.fileno()) == {"a": crc}
    assert path.read_bytes() == original


def test_fill_zip_crc32s_refuses_what_it_cannot_fill(tmp_path):
    import zipfile

    from flux.torchsave import fill_zip_crc32s

    not_zip, deflated = tmp_path / "n.bin", tmp_path / "d.zip"
    not_zip.write_bytes(b"not a zip archive at all" * 10)
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a", b"x" * 1000)
    # A stored record flagged as encrypted (general purpose bit 0 of its directory entry): its CRC32 is of the
    # plain text, which this cannot compute.
    encrypted = tmp_path / "e.zip"
    with zipfile.ZipFile(encrypted, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a", b"x" * 1000)
    data = bytearray(encrypted.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 1
    encrypted.write_bytes(bytes(data))
    # A record whose CRC32 is in a data descriptor after its data, with a directory size past the file's end.
    past_end, stream = tmp_path / "p.zip", _Unseekable()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a", b"x" * 1000)
    data = bytearray(stream.data)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<LL", data, central + 20, 10**6, 10**6)  # compressed and uncompressed size
    past_end.write_bytes(bytes(data))
    cases = [
        (not_zip, "end of central directory"),
        (deflated, "stored"),
        (encrypted, "unencrypted"),
        (past_end, "runs past the end of the file"),
    ]
    for path, message in cases:
        before = path.read_bytes()
        with open(path, "r+b") as f, pytest.raises(ValueError, match=message):
            fill_zip_crc32s(f.fileno())
        assert path.read_bytes() == before, path.name  # not a byte written


@pytest.mark.parametrize("field", ["count", "directory"])
def test_fill_zip_crc32s_reads_the_zip64_end_record_when_a_32_bit_field_says_so(tmp_path, monkeypatch, field):
    """The end record's 16-bit record count reads 0xFFFF past 65,534 records (a capture of 1000 steps of
    flux-schnell has 76,000 tensors), and its 32-bit directory offset 0xFFFFFFFF past 4 GB: either one means
    "see the zip64 end record". Set here by hand in an archive that has one, to its true values."""
    import zipfile

    from flux.torchsave import fill_zip_crc32s

    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)  # zipfile then writes the zip64 end record
    payloads = {f"archive/data/{i}": bytes([i]) * (300 * i + 1) for i in range(5)}
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in payloads.items():
            archive.writestr(name, payload)
    data = bytearray(stream.getvalue())
    end = data.rindex(b"PK\x05\x06")
    if field == "count":
        struct.pack_into("<HH", data, end + 8, 0xFFFF, 0xFFFF)  # records on this disk, records in all
    else:
        struct.pack_into("<L", data, end + 16, 0xFFFFFFFF)  # offset of the central directory
    original = bytes(data)
    with zipfile.ZipFile(io.BytesIO(original)) as archive:  # still a valid archive, as zipfile reads it
        assert archive.testzip() is None and len(archive.infolist()) == 5
    crcs = {name: zlib.crc32(payload) for name, payload in payloads.items()}
    for crc in crcs.values():
        data = data.replace(struct.pack("<L", crc), bytes(4))
    path = tmp_path / "a.zip"
    path.write_bytes(bytes(data))
    with open(path, "r+b") as f:
        assert fill_zip_crc32s(f.fileno()) == crcs
    assert path.read_bytes() == original


def test_fill_zip_crc32s_finds_a_data_descriptor_without_its_signature(tmp_path):
    """The zip format lets a data descriptor leave out its PK\\x07\\x08 signature (zipfile always writes it);
    the CRC32 is then the descriptor's first four bytes. A one-record archive laid out by hand here."""
    import zipfile

    from flux.torchsave import fill_zip_crc32s

    name, payload = b"archive/data/0", b"payload " * 50
    crc, size = zlib.crc32(payload), len(payload)
    # local header (bit 3: sizes and CRC32 after the data), the data, a descriptor with no signature
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 8, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    record = local + payload + struct.pack("<3L", crc, size, size)
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 8, 0, 0, 0, crc, size, size, len(name), 0,
                          0, 0, 0, 0, 0) + name  # fmt: skip
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(record), 0)
    original = record + central + end
    with zipfile.ZipFile(io.BytesIO(original)) as archive:  # laid out as the format says
        assert archive.read("archive/data/0") == payload and archive.testzip() is None
    path = tmp_path / "a.zip"
    path.write_bytes(original.replace(struct.pack("<L", crc), bytes(4)))
    assert path.read_bytes().count(bytes(4)) >= 2
    with open(path, "r+b") as f:
        assert fill_zip_crc32s(f.fileno()) == {"archive/data/0": crc}
    assert path.read_bytes() == original


def test_the_serialization_id_is_derived_from_the_filled_in_crc32s(tmp_path):
    """torch's 40-digit serialization id: 20 digits of its own, then c10::hash_combine(seed, v) = seed ^ (v +
    0x9E3779B9 + (seed << 6) + (seed >> 2)) folded over every other record's CRC32 from seed 0. Written with
    the CRC32s left out (0), one other record gives 0x9E3779B9; filled in, CRC + 0x9E3779B9. An id whose
    second half is not that hash of zeros is something this does not know: refused, and left as it was."""
    import zipfile

    from flux.torchsave import _fill_crc32s, _fix_serialization_id

    payload, own = b"tensor bytes " * 40, b"12345678901234567890"
    for second_half, expected in (
        (f"{0x9E3779B9:020d}".encode(), own + f"{zlib.crc32(payload) + 0x9E3779B9:020d}".encode()),
        (b"0" * 20, None),  # not the hash of zeros
    ):
        path = tmp_path / "a.pt"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data/0", payload)
            archive.writestr("archive/.data/serialization_id", own + second_half)
        with open(path, "r+b") as f:
            if expected is None:
                with pytest.raises(ValueError, match="unexpected serialization id"):
                    _fix_serialization_id(f.fileno(), _fill_crc32s(f.fileno(), None))
            else:
                _fix_serialization_id(f.fileno(), _fill_crc32s(f.fileno(), None))
        with zipfile.ZipFile(path) as archive:
            assert archive.read("archive/.data/serialization_id") == (expected or own + second_half)
            if expected is not None:
                assert archive.testzip() is None  # the id's own CRC32 is that of its new digits


def test_torch_save_leaves_the_crc32s_out_when_the_caller_turned_them_off(tmp_path):
    """Whoever set torch's `compute_crc32` to False gets what torch.save would write them: no CRC32s."""
    from flux.torchsave import _crc_config, torch_save

    config = _crc_config()
    if config is None:
        pytest.skip("this torch cannot leave the CRC32s out")
    # Set and put back by hand: monkeypatch's undo deletes the setting from torch 2.15's config proxy.
    before, config.compute_crc32 = config.compute_crc32, False
    try:
        obj, ours = _capture_like(0), tmp_path / "c.pt"
        torch_save(obj, ours)
        assert config.compute_crc32 is False
        assert ours.read_bytes() == _torch_save_bytes(
            obj, tmp_path / "plain.pt"
        )  # torch.save, CRC32s off too
    finally:
        config.compute_crc32 = before


def test_publish_new_never_overwrites_under_concurrency(tmp_path):
    results = []

    def writer(i):
        results.append(publish_new(lambda n: tmp_path / f"img_{n}.jpg", lambda tmp: tmp.write_text(str(i))))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8
    assert sorted(p.read_text() for p in results) == [str(i) for i in range(8)]
    assert next_free_index(tmp_path, "img_", ".jpg") == 8


def test_publish_new_keeps_a_name_taken_while_it_was_writing(tmp_path):
    """Another run takes the free name while this one is still writing: the name is chosen only when the
    written file is linked to it, so the other run's file stays as it is and this one gets the next."""

    def write(tmp):
        (tmp_path / "img_0.jpg").write_text("the other run")
        tmp.write_text("this run")

    assert publish_new(lambda n: tmp_path / f"img_{n}.jpg", write) == tmp_path / "img_1.jpg"
    assert (tmp_path / "img_0.jpg").read_text() == "the other run"
    assert (tmp_path / "img_1.jpg").read_text() == "this run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0.jpg", "img_1.jpg"]  # no temporary left


def test_claim_stem_is_unique(tmp_path):
    stems = {claim_stem(tmp_path, "flux-tiny") for _ in range(5)}
    assert len(stems) == 5
    assert all(s.startswith("capture_") and "flux-tiny" in s for s in stems)


def test_corrupt_and_malicious_files_are_refused(tmp_path):
    truncated = tmp_path / "t.pt"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        load_capture(truncated)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(UserError, match="Refusing"):
        load_capture(evil)
    assert not marker.exists()

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="index"):
        load_capture(tmp_path / "d")
    with pytest.raises(UserError, match="No capture"):
        load_capture(tmp_path / "missing.pt")


def test_streaming_keeps_a_few_steps_in_host_memory_however_long_the_run(model, tmp_path):
    """Host memory of a safetensors capture is bounded by a few steps' buffers, not by the number of steps;
    a .pt capture holds one full buffer set per captured step until the end."""
    from flux.pipeline import STREAMING_MAX_SETS, CaptureSession, sample

    steps = 24
    g = torch.Generator().manual_seed(1)
    inp = prepare(
        get_noise(1, 48, 64, "cpu", torch.float32, 7),
        torch.randn(1, 5, TINY_PARAMS.context_in_dim, generator=g),
        torch.randn(1, TINY_PARAMS.vec_in_dim, generator=g),
    )
    timesteps = get_schedule(steps, inp["img"].shape[1])
    plan = CapturePlan.everything(model, steps)
    meta = {
        "captured_steps": list(plan.steps),
        "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
    }
    held = {}
    for fmt, path in (("safetensors", tmp_path / "st"), ("pt", tmp_path / "c.pt")):
        session = CaptureSession.open(
            model, plan, fmt, path, 5, inp["img"].shape[1], torch.float32, meta, steps
        )
        sample(model, inp, timesteps, 3.5, session)
        session.sink.finish({"txt_seq_len": 5}, meta)
        held[fmt] = session.capture.pool.allocated
    assert held["safetensors"] == STREAMING_MAX_SETS == 8  # flux-tiny's steps are small: the most sets
    assert held["pt"] == steps
    assert load_capture(tmp_path / "st")["metadata"]["steps_done"] == list(range(steps))


def test_a_streamed_capture_of_some_steps_keeps_a_few_context_buffers_however_long_the_run(model):
    """The steps a plan leaves out still stream their context (img_state, vec, pred) to the disk, through
    recycled buffer sets: a few, like the captured steps', not one per step (which made a `--steps 0`
    capture's host memory grow with the number of steps); a .pt keeps one per step until the end."""
    from flux.pipeline import STREAMING_MAX_SETS, CaptureSession

    steps, plan = 24, CapturePlan((0,), (0,), (0,))
    context_sets = {}
    for fmt in ("safetensors", "pt"):
        pool = CaptureSession.buffers(model, plan, fmt, 5, 12, torch.float32, steps, torch.device("cpu"))
        context_sets[fmt] = pool.free[False].qsize()
    assert context_sets["safetensors"] <= STREAMING_MAX_SETS
    assert context_sets["pt"] == steps - 1


_RSS_PROBE = """
import resource, sys, tempfile
from pathlib import Path
import torch
from flux.capture import CapturePlan
from flux.configs import TINY_PARAMS
from flux.model import Flux
from flux.pipeline import CaptureSession, sample
from flux.sampling import get_noise, get_schedule, prepare

fmt, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = Flux(TINY_PARAMS).eval().requires_grad_(False)
g = torch.Generator().manual_seed(1)
txt, y = torch.randn(1, 32, 32, generator=g), torch.randn(1, 32, generator=g)
inp = prepare(get_noise(1, 512, 512, "cpu", torch.float32, 7), txt, y)
timesteps = get_schedule(steps, inp["img"].shape[1])
plan = CapturePlan.everything(model, steps)
meta = {"captured_steps": list(plan.steps), "captured_blocks": {"double": [0, 1], "single": [0, 1, 2]}}
def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


sample(model, inp, timesteps, 3.5)  # warm up the allocator and kernels without capture
base = resident()
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / ("c.pt" if fmt == "pt" else "c")
    session = CaptureSession.open(model, plan, fmt, path, 32, inp["img"].shape[1], torch.float32, meta, steps)
    sample(model, inp, timesteps, 3.5, session)
    held = resident() - base  # what the capture keeps in host memory once sampling is done
    session.sink.finish({"txt_seq_len": 32}, meta)
print(held)
"""


def test_host_rss_of_streaming_grows_with_one_step_not_with_the_number_of_steps():
    """Measured, not counted: resident memory held after sampling, 6 vs 30 steps of a 512 px flux-tiny
    capture, in fresh processes (Linux)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def growth(fmt: str, steps: int) -> int:
        # A fixed mmap threshold makes glibc return freed large blocks to the system, so the resident
        # size tracks live memory instead of whatever the warm-up left in its free lists.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, fmt, str(steps)],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    # One step: 2 double blocks (img + txt) and 3 single ones of 32 + 1024 tokens x 64 fp32, plus context.
    step = CapturePlan((0, 1), (0, 1, 2), (0,)).bytes_per_step(1, 32, 1024, 64, 4)
    pt = growth("pt", 30) - growth("pt", 6)
    streamed = growth("safetensors", 30) - growth("safetensors", 6)
    assert pt > 0.8 * 24 * step  # a .pt holds every step until the end
    assert streamed < 4 * step  # a streamed capture holds a few steps, however long the run


def test_captures_made_before_pred_was_recorded_still_load_and_analyse(model, tmp_path):
    """Old safetensors shards without `pred`: the key is absent (not a list that fails when read)."""
    from safetensors.torch import load_file, save_file

    plan = CapturePlan.everything(model, NUM_STEPS)
    st, _ = _capture(model, lambda pool, meta: SafetensorsSink(tmp_path, pool, meta), plan)
    index = json.loads((st / "index.json").read_text())
    for shard in st.glob("step_*.safetensors"):
        tensors = load_file(shard)
        del tensors["pred"]
        save_file(tensors, shard)
    del index["shapes"]["pred"], index["dtypes"]["pred"]
    (st / "index.json").write_text(json.dumps(index))
    capture = load_capture(st)
    assert "pred" not in capture["denoising_context"]
    assert capture["denoising_context"]["img_state"][2].shape == (1, 12, 64)


def test_streaming_buffer_sets_fit_the_host_budget():
    from flux.pipeline import streaming_buffer_sets

    GiB = 2**30
    step_1024 = 1_520_000_000  # flux-schnell at 1024 px, all blocks in bf16 (~1.5 GB a step)
    assert streaming_buffer_sets(step_1024, 128 * GiB) == 5  # 8 GiB // 1.52 GB
    assert streaming_buffer_sets(step_1024, None) == 5
    assert streaming_buffer_sets(step_1024, 16 * GiB) == 2  # a quarter of 16 GiB holds two
    assert streaming_buffer_sets(step_1024, 6 * GiB) == 2  # two at least, while they fit in half the RAM
    assert streaming_buffer_sets(step_1024, 4 * GiB) == 1  # they would not: one step at a time
    assert streaming_buffer_sets(10_000, 128 * GiB) == 8  # small steps: capped


def test_pinned_buffers_are_counted_at_their_power_of_two_size():
    from flux.capture import host_nbytes

    assert [host_nbytes(n, True) for n in (0, 1, 3, 4, 5, 1000)] == [0, 1, 4, 4, 8, 1024]
    assert host_nbytes(1000, False) == 1000
    # flux-schnell at 1024 px, all blocks in bf16: 4096 image and 256 text tokens of 3072 values.
    MiB = 2**20
    img, txt, single = 4096 * 3072 * 2, 256 * 3072 * 2, 4352 * 3072 * 2  # 24, 1.5 and 25.5 MiB
    plan = CapturePlan(tuple(range(19)), tuple(range(38)), (0,))
    assert plan.bytes_per_step(1, 256, 4096, 3072, 2) == 19 * (img + txt) + 38 * single
    assert plan.bytes_per_step(1, 256, 4096, 3072, 2, pinned=True) == 19 * (32 + 2) * MiB + 38 * 32 * MiB


def _free_buffers(pool: BufferPool) -> list:
    """Weak references to the tensors of the pool's free sets, which stay in the pool."""
    import weakref

    refs = []
    for free in pool.free.values():
        sets = [free.get_nowait() for _ in range(free.qsize())]
        refs += [weakref.ref(t) for s in sets for t in s.values()]
        for s in sets:
            free.put(s)
    return refs


def test_the_writer_buffer_sets_are_let_go_once_the_capture_is_written(model, tmp_path):
    """With --format safetensors nothing reads the host buffers after the last shard, so the pool must not
    keep them (pinned, up to 8 steps) alive through the lens."""
    import gc

    from flux.pipeline import CaptureSession, sample

    g = torch.Generator().manual_seed(1)
    inp = prepare(
        get_noise(1, 48, 64, "cpu", torch.float32, 7),
        torch.randn(1, 5, TINY_PARAMS.context_in_dim, generator=g),
        torch.randn(1, TINY_PARAMS.vec_in_dim, generator=g),
    )
    plan = CapturePlan.everything(model, NUM_STEPS)
    meta = {"captured_steps": list(plan.steps), "captured_blocks": {"double": [0, 1], "single": [0, 1, 2]}}
    session = CaptureSession.open(
        model, plan, "safetensors", tmp_path / "st", 5, inp["img"].shape[1], torch.float32, meta, NUM_STEPS
    )
    pool = session.capture.pool
    sample(model, inp, get_schedule(NUM_STEPS, inp["img"].shape[1]), 3.5, session)
    session.sink.finish({"txt_seq_len": 5}, meta)
    buffers = _free_buffers(pool)
    assert buffers  # the finished sets went back to the pool
    pool.drain()
    gc.collect()
    assert all(ref() is None for ref in buffers)
    assert load_capture(tmp_path / "st")["metadata"]["steps_done"] == list(range(NUM_STEPS))


def test_a_streamed_capture_holds_no_host_buffers_from_the_final_decode_on(tmp_path, monkeypatch):
    import gc
    import weakref

    import flux.pipeline
    from flux.pipeline import RunOptions, generate, load_models

    made = []
    new = BufferPool._new

    def tracked(self, full):
        tensors = new(self, full)
        made.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    alive_at_the_lens, alive_at_the_image = [], []
    decode_saved = flux.pipeline.decode_saved
    decode_image = flux.pipeline.Models.decode

    def lens(*args, **kwargs):
        gc.collect()
        alive_at_the_lens.append(sum(ref() is not None for ref in made))
        return decode_saved(*args, **kwargs)

    def image(*args, **kwargs):  # the final image's VAE decode, which may need the memory (4096 px)
        gc.collect()
        alive_at_the_image.append(sum(ref() is not None for ref in made))
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(BufferPool, "_new", tracked)
    monkeypatch.setattr(flux.pipeline, "decode_saved", lens)
    monkeypatch.setattr(flux.pipeline.Models, "decode", image)
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=1, device="cpu", format="safetensors",
        output_dir=str(tmp_path),
    ).validate()  # fmt: skip
    result = generate(load_models(opts.spec, "cpu", progress=False), opts, progress=False)
    assert made and alive_at_the_image == alive_at_the_lens == [0]
    assert len(list(result.decoded_dir.glob("*_block_*_step_*.jpg"))) == (2 + 3) * 4


def _tracking_buffers(monkeypatch) -> list:
    """Weak references to every buffer the capture pools make from now on."""
    import weakref

    made, new = [], BufferPool._new

    def tracked(self, full):
        tensors = new(self, full)
        made.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    monkeypatch.setattr(BufferPool, "_new", tracked)
    return made


@pytest.mark.parametrize(
    ("fails_in", "lens"),
    [("sampling", True), ("lens", True), ("write", True), ("write", False), ("interrupted write", False)],
)
def test_a_failed_pt_run_lets_go_of_its_buffers_while_its_traceback_lives(
    tmp_path, monkeypatch, fails_in, lens
):
    """A .pt capture's buffers may take half the GPU: a run stopped by an error or Ctrl-C (in sampling, in
    the lens after the write, or in the write, beside the lens or without one) must let them go although a
    notebook keeps the traceback, and with it the run's frames, alive; otherwise the next run in that
    process finds the GPU full."""
    import gc

    import flux.pipeline
    import flux.store
    from flux.pipeline import RunOptions, generate, load_models

    made = _tracking_buffers(monkeypatch)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails_in == "lens":
        monkeypatch.setattr(flux.pipeline, "decode_saved", stop)
    elif fails_in == "write":
        monkeypatch.setattr(flux.store, "torch_save", full_disk)
    elif fails_in == "interrupted write":
        monkeypatch.setattr(flux.store, "torch_save", stop)
    else:
        monkeypatch.setattr(flux.pipeline.CaptureSession, "after_step", lambda self, info: stop())
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=1, device="cpu", output_dir=str(tmp_path), num_steps=2,
        should_decode_intermediates=lens,
    ).validate()  # fmt: skip
    with pytest.raises(UserError if fails_in == "write" else KeyboardInterrupt) as stopped:  # full disk
        generate(load_models(opts.spec, "cpu", progress=False), opts, progress=False)
    assert stopped.tb is not None  # the traceback, and the frames it holds, are alive here
    gc.collect()
    assert made and all(ref() is None for ref in made)
    assert (fails_in == "lens") == any(tmp_path.glob("intermediates/capture_*.pt"))  # written before the lens


def test_a_second_ctrl_c_while_waiting_for_the_write_lets_go_of_the_buffers_once_it_ends(
    tmp_path, monkeypatch
):
    """Ctrl-C in the lens, then again while the run waits for the .pt being written beside it: the write
    goes on (its file is complete), and when it ends the buffers go, the traceback kept or not."""
    import gc
    import threading

    import flux.pipeline
    import flux.store
    from flux.pipeline import RunOptions, generate, load_models

    made = _tracking_buffers(monkeypatch)
    gate, done, save = threading.Event(), threading.Event(), flux.store.torch_save

    def slow_save(*args, **kwargs):
        gate.wait(60)
        save(*args, **kwargs)
        done.set()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flux.store, "torch_save", slow_save)
    monkeypatch.setattr(flux.pipeline, "decode_saved", stop)
    monkeypatch.setattr(flux.pipeline, "_wait_for_the_write", stop)  # the second Ctrl-C, while waiting
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=1, device="cpu", output_dir=str(tmp_path), num_steps=2
    ).validate()
    with pytest.raises(KeyboardInterrupt) as stopped:
        generate(load_models(opts.spec, "cpu", progress=False), opts, progress=False)
    assert stopped.tb is not None
    gc.collect()
    assert any(ref() is not None for ref in made)  # the write still reads them
    gate.set()
    assert done.wait(60)
    for _ in range(100):  # the write's thread runs the callbacks just after its file is in place
        gc.collect()
        if all(ref() is None for ref in made):
            break
        threading.Event().wait(0.05)
    assert made and all(ref() is None for ref in made)
    assert len(list(tmp_path.glob("intermediates/capture_*.pt"))) == 1


@pytest.mark.parametrize(
    ("free_gb", "parked"),
    [
        ([60], []),  # enough beside every model: nothing moves
        ([20, 40], ["t5", "clip"]),  # the text encoders (done for this run) make enough room
        ([20, 30, 70], ["t5", "clip", "flow"]),  # then the flow model
        ([1, 2, 3], ["t5", "clip", "flow"]),  # never enough: everything moves, and the decode tries anyway
    ],
)
def test_room_is_made_for_the_vae_text_encoders_first(free_gb, parked, monkeypatch, capsys):
    """The policy only (a GPU is not needed to check which models move): free memory is what CUDA would say
    after each move, against the decoder's estimate for one image."""
    import flux.decode
    import flux.pipeline
    from flux.decode import decoder_bytes_per_image
    from flux.pipeline import Models

    spec = flux.pipeline.get_spec("flux-schnell")
    need = decoder_bytes_per_image(spec.ae_params, 2048, 2048)
    readings = iter(int(gb * 1e9) for gb in free_gb)
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: next(readings))
    monkeypatch.setattr(flux.pipeline, "_empty_cache", lambda device: None)
    moved = []

    class Part(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def cpu(self):
            moved.append(self.name)
            return self

    models = Models(spec, Part("flow"), None, Part("t5"), Part("clip"), torch.device("cuda"), torch.bfloat16)
    assert 30e9 < need < 40e9  # ~34 GB estimated for one 2048 px image
    assert models.make_room_for_vae(2048, 2048) == parked == moved
    assert ("to make room for the VAE" in capsys.readouterr().err) == bool(parked)
    models.offload = True  # with --offload only the decoder is on the GPU: nothing to do
    assert models.make_room_for_vae(2048, 2048) == []


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_run_that_fails_before_its_first_step_leaves_no_capture_behind(tmp_path, monkeypatch, fmt):
    """E.g. the flow model cannot return to the GPU (--offload on a small one): no folder, no claimed name."""
    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=1, device="cpu", format=fmt, output_dir=str(tmp_path),
    ).validate()  # fmt: skip
    models = load_models(opts.spec, "cpu", progress=False)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.78 GiB")

    monkeypatch.setattr(models.flow, "to", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate(models, opts, progress=False)
    inter = tmp_path / "intermediates"
    assert sorted(p.name for p in inter.iterdir()) == []  # no capture, claim, metadata or lens
    assert not list(tmp_path.glob("img_*.jpg"))


def test_a_final_decode_that_runs_out_of_gpu_memory_falls_back_to_the_cpu(tmp_path, monkeypatch, capsys):
    """Sampling is done by then, so the image and the capture must still be written. (The first decode
    raises the error CUDA would; on this CPU-only machine the fallback decodes exactly like a normal run.)"""
    import flux.decode
    import flux.pipeline
    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=3, device="cpu", should_decode_intermediates=False,
        output_dir=str(tmp_path / "plain"),
    ).validate()  # fmt: skip
    models = load_models(opts.spec, "cpu", progress=False)
    plain = generate(models, opts, progress=False)

    real, calls = flux.decode.decode_latents, []

    def first_call_runs_out(*args, **kwargs):
        calls.append(args[0].device)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 56.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(flux.decode, "decode_latents", first_call_runs_out)
    opts.output_dir = str(tmp_path / "fallback")
    result = generate(models, opts, progress=False)
    err = capsys.readouterr().err
    assert len(calls) == 2 and "decoding it on the CPU instead" in err and "warning" not in err
    assert result.image_path.read_bytes() == plain.image_path.read_bytes()
    assert load_capture(result.capture_path)["metadata"]["seed"] == 3
    # Where the host has less memory than one image's decode may take, the run says what is at stake.
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: 1000)
    calls.clear()
    opts.output_dir = str(tmp_path / "tight")
    generate(models, opts, progress=False)
    assert "and 0 GB is available; should the system stop this process" in capsys.readouterr().err


def test_a_decoder_move_back_cut_short_by_gpu_memory_leaves_it_whole_on_the_cpu(monkeypatch):
    """`Module.to` moves parameters one by one: an out-of-memory error halfway leaves some on each device,
    and the lens would then fail on a decoder split in two."""
    from types import SimpleNamespace

    import flux.decode
    import flux.pipeline
    from flux.pipeline import Models

    moves = []

    class Decoder(torch.nn.Module):
        def to(self, *args, **kwargs):
            moves.append("to the GPU")
            if len(moves) > 1:  # the move back, after the CPU decode: the GPU is still full
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return self

        def cpu(self):
            moves.append("to the CPU")
            return self

    results = iter([torch.cuda.OutOfMemoryError("CUDA out of memory."), torch.zeros(1, 3, 16, 16)])

    def decode_latents(tokens, ae, height, width):
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(flux.decode, "decode_latents", decode_latents)
    monkeypatch.setattr(flux.pipeline, "_empty_cache", lambda device: None)
    spec = flux.pipeline.get_spec("flux-tiny")
    ae = SimpleNamespace(decoder=Decoder())
    models = Models(spec, None, ae, None, None, torch.device("cuda"), torch.float32)
    assert models.decode(torch.zeros(1, 1, 64), 16, 16).shape == (1, 3, 16, 16)
    assert moves == ["to the GPU", "to the CPU", "to the GPU", "to the CPU"]
    assert models.decoder_stranded  # so the run skips its lens instead of running out of memory again


def test_a_run_whose_decoder_cannot_return_to_the_gpu_skips_its_lens_and_says_how_to_decode(
    tmp_path, monkeypatch, capsys
):
    import flux.decode
    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=3, device="cpu", output_dir=str(tmp_path)
    ).validate()
    models = load_models(opts.spec, "cpu", progress=False)
    real_decode, real_to, decodes, moves = flux.decode.decode_latents, models.ae.decoder.to, [], []

    def first_decode_runs_out(*args, **kwargs):
        decodes.append(args[0].device)
        if len(decodes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 56.00 GiB")
        return real_decode(*args, **kwargs)

    def the_move_back_runs_out(*args, **kwargs):
        moves.append(args)
        if len(moves) == 2:  # the move back after the CPU decode
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_to(*args, **kwargs)

    monkeypatch.setattr(flux.decode, "decode_latents", first_decode_runs_out)
    monkeypatch.setattr(models.ae.decoder, "to", the_move_back_runs_out)
    result = generate(models, opts, progress=False)
    err = capsys.readouterr().err
    assert "Skipping the lens" in err and f"capture_sample.py decode {result.capture_path}" in err
    assert result.image_path.is_file() and load_capture(result.capture_path)["metadata"]["complete"]
    assert result.decoded_dir is None and not (tmp_path / "intermediates" / "decoded").exists()
    assert len(decodes) == 2  # the final image only: no lens decode was attempted


def test_no_model_is_parked_in_host_memory_that_cannot_hold_it(monkeypatch, capsys):
    import flux.decode
    import flux.pipeline
    from flux.pipeline import Models

    spec = flux.pipeline.get_spec("flux-schnell")
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: 0)  # never enough on the GPU
    monkeypatch.setattr(flux.pipeline, "_empty_cache", lambda device: None)
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: 10_000)
    moved = []

    class Part(torch.nn.Module):
        def __init__(self, name, values):
            super().__init__()
            self.name, self.weight = name, torch.nn.Parameter(torch.zeros(values))

        def cpu(self):
            moved.append(self.name)
            return self

    # The text encoders (2 x 4,000 bytes) fit in 80% of 10,000 bytes; the flow model (40,000) does not.
    models = Models(
        spec,
        Part("flow", 10_000),
        None,
        Part("t5", 1000),
        Part("clip", 1000),
        torch.device("cuda"),
        torch.float32,
    )
    assert models.make_room_for_vae(2048, 2048) == moved == ["t5", "clip"]
    assert "Not moving flow to the CPU" in capsys.readouterr().err


def _flux_schnell_parts(device: str, text_bytes: int = 4000, flow_bytes: int = 40_000):
    """flux-schnell's Models with stand-in modules of the given float32 sizes, for the VAE-room policy."""
    from flux.pipeline import Models, get_spec

    def part(nbytes: int) -> torch.nn.Module:
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.zeros(nbytes // 4))
        return module

    t5, clip, flow = part(text_bytes), part(text_bytes), part(flow_bytes)
    return Models(get_spec("flux-schnell"), flow, None, t5, clip, torch.device(device), torch.float32)


def test_models_are_parked_for_the_vae_only_within_80_percent_of_host_memory(monkeypatch, capsys):
    """The text encoders, 2 x 4,500 bytes, are 90% of 10,000 bytes of host memory: over the 80% the capture
    leaves room for, so they stay on the GPU, and so does the flow model after them."""
    import flux.decode
    import flux.pipeline

    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: 0)
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: 10_000)
    models = _flux_schnell_parts("cuda", text_bytes=4500)
    assert models.make_room_for_vae(2048, 2048) == []
    assert "Not moving t5, clip to the CPU for the VAE" in capsys.readouterr().err


def test_models_are_parked_for_the_vae_when_host_memory_is_unknown(monkeypatch):
    """Without a MemAvailable figure there is nothing to hold the move against: the policy goes on."""
    import flux.decode
    import flux.pipeline

    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: 0)
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: None)
    assert _flux_schnell_parts("cuda").make_room_for_vae(2048, 2048) == ["t5", "clip", "flow"]


def test_no_model_is_parked_when_the_gpu_holds_the_decoder_or_there_is_no_gpu(monkeypatch):
    """Free GPU memory equal to one image's decoder estimate is enough; on the CPU there is no GPU memory to
    make room in, whatever a GPU reading would say."""
    import flux.decode
    from flux.decode import decoder_bytes_per_image
    from flux.pipeline import get_spec

    need = decoder_bytes_per_image(get_spec("flux-schnell").ae_params, 2048, 2048)
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: need)
    assert _flux_schnell_parts("cuda").make_room_for_vae(2048, 2048) == []
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: 0)
    assert _flux_schnell_parts("cpu").make_room_for_vae(2048, 2048) == []


def test_the_capture_buffers_are_all_allocated_before_the_first_step(model, monkeypatch):
    """Allocating (on CUDA, pinning) is slow, so none of it may fall inside the sampling loop: a .pt holds a
    full set per captured step and a context-only set per other step; the safetensors writer recycles up to
    STREAMING_MAX_SETS (8) of each kind, which flux-tiny's steps of a few kB get with memory to spare."""
    import flux.pipeline
    from flux.pipeline import STREAMING_MAX_SETS, CaptureSession

    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: 64 * 2**30)
    assert STREAMING_MAX_SETS == 8
    cpu = torch.device("cpu")

    def sets(fmt: str, captured: tuple[int, ...], steps: int) -> tuple[int, int]:
        plan = CapturePlan((0, 1), (0,), captured)
        pool = CaptureSession.buffers(model, plan, fmt, 5, 12, torch.float32, steps, cpu)
        return pool.free[True].qsize(), pool.free[False].qsize()  # (full, context-only) sets ready

    assert sets("pt", (0, 2), 5) == (2, 3)
    assert sets("safetensors", (0, 2), 5) == (2, 3)  # fewer than 8 of each: as many as the run has
    assert sets("pt", tuple(range(12)), 24) == (12, 12)
    assert sets("safetensors", tuple(range(12)), 24) == (8, 8)


def _an_80_gb_gpu(monkeypatch, free: int) -> None:
    """A pretend CUDA GPU of 80 GB with `free` bytes free. Pinning needs a real one: buffers_in_a_thread
    answers "started", so that only the decision to pin while loading is checked, not the allocation."""
    import flux.pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a test GPU")
    monkeypatch.setattr(flux.pipeline, "buffers_in_a_thread", lambda *args: "started")


def test_on_a_gpu_buffers_are_pinned_while_loading_when_they_fit_beside_the_text_encoders(
    monkeypatch, tmp_path
):
    """On CUDA the flow model and AE load onto the GPU, while transformers may read T5 and CLIP (9.8 GB for
    the published models) into host memory first: the pinned buffers must fit beside those. flux-tiny at
    64x48, 4 steps, pinned (powers of two): 2 double blocks x (4,096 + 8,192) + 3 single blocks x 16,384 =
    73,728 bytes a step, 294,912 in all. A capture that is to wait on the GPU is not pinned at all: here
    the GPU has too little free memory for that (another process holds most of it)."""
    import flux.options
    import flux.pipeline
    from flux.pipeline import RunOptions, buffers_while_loading

    _an_80_gb_gpu(monkeypatch, free=20 * 10**9)
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: 64 * 2**30)
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, device="cuda", output_dir=str(tmp_path)
    ).validate()
    beside = 294_912 + 9_800_000_000
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: beside)
    assert buffers_while_loading(opts) == "started"
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: beside - 1)
    assert buffers_while_loading(opts) is None
    assert not opts.capture_on_device()


def test_a_pt_capture_expected_to_wait_on_the_gpu_is_not_pinned_while_loading(monkeypatch, tmp_path):
    """With the GPU's memory free, flux-tiny's capture will wait there: nothing to pin while the models load
    (generate allocates it on the GPU after them, quickly). Not for safetensors, nor with --offload."""
    import flux.pipeline
    from flux.pipeline import RunOptions, buffers_while_loading

    _an_80_gb_gpu(monkeypatch, free=80 * 10**9)
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: 64 * 2**30)

    def options(**kw) -> RunOptions:
        return RunOptions(
            model="flux-tiny", width=64, height=48, device="cuda", output_dir=str(tmp_path), **kw
        ).validate()

    assert options().capture_on_device() and buffers_while_loading(options()) is None
    assert not options(format="safetensors").capture_on_device()
    assert buffers_while_loading(options(format="safetensors")) == "started"
    assert not options(offload=True).capture_on_device()  # (and nothing is pinned early with --offload)
    # Too little free beside the models (another process holds the GPU): pinned host buffers, early.
    _an_80_gb_gpu(monkeypatch, free=20 * 10**9)
    assert not options().capture_on_device() and buffers_while_loading(options()) == "started"


def test_a_streamed_capture_of_fewer_steps_than_the_writers_sets_counts_only_its_steps(monkeypatch):
    """2 steps, fewer than the writer's 8 sets: the check counts 2 steps' buffers beside the models, to the
    byte."""
    import flux.pipeline
    from flux.options import model_host_bytes
    from flux.pipeline import RunOptions, buffers_while_loading

    opts = RunOptions(
        model="flux-tiny", width=64, height=48, device="cpu", format="safetensors", num_steps=2
    ).validate()
    needed = opts.estimated_capture_bytes() + model_host_bytes(opts.spec)  # 2 steps' worth
    monkeypatch.setattr(flux.pipeline, "buffers_in_a_thread", lambda *args: "started")
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed)
    assert buffers_while_loading(opts) == "started"
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed - 1)
    assert buffers_while_loading(opts) is None


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_buffers_allocated_while_the_models_load_give_the_same_capture(tmp_path, monkeypatch, fmt):
    """The CLI allocates (on CUDA: pins) the capture's host buffers in a thread while the models load and
    hands them to generate: the same capture as buffers allocated by generate itself."""
    from flux.pipeline import CaptureSession, RunOptions, buffers_while_loading, generate, load_models

    def options(out):
        return RunOptions(
            model="flux-tiny", width=64, height=48, seed=5, device="cpu", format=fmt, num_steps=3,
            steps="0,2", should_decode_intermediates=False, output_dir=str(out),
        ).validate()  # fmt: skip

    allocations = []
    real = CaptureSession.buffers
    monkeypatch.setattr(CaptureSession, "buffers", lambda *a, **k: allocations.append(a) or real(*a, **k))
    buffers = buffers_while_loading(options(tmp_path / "early"))
    assert buffers is not None
    models = load_models(options(tmp_path).spec, "cpu", progress=False)
    early = generate(models, options(tmp_path / "early"), progress=False, buffers=buffers)
    assert len(allocations) == 1 and not buffers.result().pin  # the thread's, used; nothing to pin on a CPU
    usual = generate(models, options(tmp_path / "usual"), progress=False)
    assert len(allocations) == 2
    a, b = load_capture(early.capture_path), load_capture(usual.capture_path)
    assert a["metadata"]["captured_steps"] == [0, 2]
    for stream in ("double_blocks", "single_blocks"):
        assert list(a[stream]) == list(b[stream])
        for name, steps in b[stream].items():
            assert len(a[stream][name]) == len(steps) == 2
            for x, y in zip(a[stream][name], steps):
                for u, v in zip(*((x, y) if isinstance(x, tuple) else ((x,), (y,))), strict=True):
                    assert torch.equal(u, v)
    ctx_a, ctx_b = a["denoising_context"]["img_state"], b["denoising_context"]["img_state"]
    assert len(ctx_a) == len(ctx_b) == 3 and all(map(torch.equal, ctx_a, ctx_b))


def test_buffers_that_failed_to_allocate_while_loading_are_allocated_by_generate(tmp_path, capsys):
    """Pinned memory may run short beside the loading models: the run says so and allocates the buffers
    after them, as it would have anyway, and leaves no claimed name behind."""
    from concurrent.futures import Future

    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(
        model="flux-tiny", width=64, height=48, seed=5, device="cpu", num_steps=2,
        should_decode_intermediates=False, output_dir=str(tmp_path),
    ).validate()  # fmt: skip
    failed = Future()
    failed.set_exception(RuntimeError("CUDA error: out of memory (pinned host memory)"))
    result = generate(load_models(opts.spec, "cpu", progress=False), opts, progress=False, buffers=failed)
    assert (
        "while the models loaded failed (RuntimeError: CUDA error: out of memory" in capsys.readouterr().err
    )
    assert load_capture(result.capture_path)["metadata"]["complete"] is True
    assert not list((tmp_path / "intermediates").glob(".*"))  # no claim, no temporary file


def test_buffers_are_left_to_generate_when_loading_could_not_hold_them_too(monkeypatch):
    """No capture, --offload (the models live in host memory), host memory too small for the buffers and
    every model at once, or unknown: the buffers are allocated after the models, as before."""
    import flux.pipeline
    from flux.options import model_host_bytes
    from flux.pipeline import RunOptions, buffers_while_loading

    def options(**kw):
        return RunOptions(model="flux-tiny", width=64, height=48, device="cpu", **kw).validate()

    opts = options()
    needed = opts.estimated_capture_bytes() + model_host_bytes(opts.spec)
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed)
    assert buffers_while_loading(opts) is not None
    assert buffers_while_loading(options(capture=False)) is None
    assert buffers_while_loading(options(offload=True)) is None
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed - 1)
    assert buffers_while_loading(opts) is None
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: None)
    assert buffers_while_loading(opts) is None


def test_a_streamed_capture_is_pinned_while_loading_when_a_few_steps_fit(monkeypatch):
    """The safetensors writer holds a few steps' buffers (`streaming_buffer_sets`), not the run's, so a long
    streamed run whose whole capture would not fit beside the models is still pinned while they load: the
    check counts those few steps, to the byte."""
    import flux.pipeline
    from flux.options import model_host_bytes
    from flux.pipeline import STREAMING_MAX_SETS, RunOptions, buffers_while_loading, streaming_buffer_sets

    steps = 3 * STREAMING_MAX_SETS
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, device="cpu", format="safetensors", num_steps=steps
    ).validate()
    per_step = opts.estimated_capture_bytes() // steps
    assert per_step * steps == opts.estimated_capture_bytes()
    needed = STREAMING_MAX_SETS * per_step + model_host_bytes(opts.spec)
    assert streaming_buffer_sets(per_step, needed) == STREAMING_MAX_SETS  # a few steps, far from the run's
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed)
    future = buffers_while_loading(opts)
    assert future is not None
    assert future.result(timeout=60).allocated == STREAMING_MAX_SETS  # what the check counted
    monkeypatch.setattr(flux.pipeline, "available_host_memory", lambda: needed - 1)
    assert buffers_while_loading(opts) is None


def test_generate_says_when_its_options_were_not_validated(tmp_path):
    from flux.pipeline import RunOptions, generate, load_models

    opts = RunOptions(model="flux-tiny", width=64, height=48, device="cpu", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"validated options: pass RunOptions\(\.\.\.\)\.validate\(\)"):
        generate(load_models(opts.spec, "cpu"), opts, progress=False)
    assert not list(tmp_path.iterdir())


def test_buffers_allocated_for_another_capture_are_refused(model, tmp_path):
    from flux.pipeline import CaptureSession

    plan = CapturePlan.everything(model, 2)
    pool = CaptureSession.buffers(model, plan, "pt", 8, 12, torch.float32, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="another capture"):
        CaptureSession.open(
            model, plan, "pt", tmp_path / "c.pt", 8, 16, torch.float32, {}, 2, torch.device("cpu"), pool
        )
    # A safetensors pool is bounded, a .pt one is not: handed to a .pt run, it would block once its sets are
    # all held; the other way round, host memory would be unbounded.
    bounded = CaptureSession.buffers(model, plan, "safetensors", 8, 12, torch.float32, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="another capture"):
        CaptureSession.open(
            model, plan, "pt", tmp_path / "c.pt", 8, 12, torch.float32, {}, 2, torch.device("cpu"), bounded
        )
    with pytest.raises(ValueError, match="another capture"):
        CaptureSession.open(
            model, plan, "safetensors", tmp_path / "d", 8, 12, torch.float32, {}, 2, torch.device("cpu"), pool
        )
    session = CaptureSession.open(
        model, plan, "pt", tmp_path / "c.pt", 8, 12, torch.float32, {}, 2, torch.device("cpu"), pool
    )
    assert session.capture.pool is pool
    # Buffers on a device serve a .pt capture on that device only (a safetensors one streams from host
    # memory); a device's buffers are never pinned.
    shapes, dtypes = BlockCapture.shapes_for(model, plan, 1, 8, 12, torch.float32)
    with pytest.raises(ValueError, match="pin=False"):
        BufferPool(shapes, dtypes, pin=True, device=torch.device("cpu"))
    for fmt, device, limit, accepted in (
        ("pt", "cpu", None, True),
        ("pt", "meta", None, False),
        ("safetensors", "cpu", None, False),
        ("safetensors", "cpu", 2, False),
    ):
        on_device = BufferPool(shapes, dtypes, pin=False, limit=limit, device=torch.device(device))
        path = tmp_path / (f"{device}.pt" if fmt == "pt" else device)
        args = (model, plan, fmt, path, 8, 12, torch.float32, {}, 2, torch.device("cpu"), on_device)
        if accepted:
            assert CaptureSession.open(*args).capture.pool is on_device
        else:
            with pytest.raises(ValueError, match="another capture"):
                CaptureSession.open(*args)


def test_a_pt_capture_waits_on_the_gpu_only_where_it_leaves_the_lens_its_batch(monkeypatch):
    """The rule that puts a .pt capture's buffers on the GPU: the published models' sizes its docstring
    names, worked out from the plan and the models' weights, and its two limits."""
    import flux.decode
    from flux.configs import CONFIGS, FULL_AE_PARAMS
    from flux.decode import auto_batch_size, stable_batch_size
    from flux.options import DEVICE_CAPTURE_RESERVE, capture_fits_on_device, model_bytes

    # With only the reserve left free, the lens still gets the batch it plans for (the same as a later
    # decode's, so the same files), at every size where a capture could wait on the GPU.
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: DEVICE_CAPTURE_RESERVE)
    for side in (256, 512, 1024, 2048):
        planned = stable_batch_size(FULL_AE_PARAMS, side, side, 2**20)
        assert (
            stable_batch_size(FULL_AE_PARAMS, side, side, auto_batch_size(FULL_AE_PARAMS, side, side, gpu))
            == planned
        )

    def capture_bytes(name: str, side: int, steps: int) -> int:
        spec = CONFIGS[name]
        with torch.device("meta"):
            flow = Flux(spec.params)
        plan = CapturePlan.everything(flow, steps)
        return steps * plan.bytes_per_step(
            1, spec.t5_max_length, (side // 16) ** 2, spec.params.hidden_size, 2
        )

    def free_beside_models(name: str, gpu_bytes: int) -> int:
        return gpu_bytes - sum(model_bytes(CONFIGS[name]).values())

    schnell = capture_bytes("flux-schnell", 1024, 4)
    assert 5e9 < schnell < 7e9  # 1.5 GB a step, as measured (README)
    assert capture_fits_on_device(schnell, free_beside_models("flux-schnell", 80 * 10**9))  # an H100
    dev = capture_bytes("flux-dev", 1024, 50)
    assert 75e9 < dev < 85e9
    assert not capture_fits_on_device(dev, free_beside_models("flux-dev", 141 * 10**9))  # an H200
    # At most half of what is free, and never into the reserve.
    big = 200 * 2**30
    assert capture_fits_on_device(big // 2, big) and not capture_fits_on_device(big // 2 + 1, big)
    small = DEVICE_CAPTURE_RESERVE + 2**30
    assert capture_fits_on_device(2**30, small) and not capture_fits_on_device(2**30 + 1, small)
    assert not capture_fits_on_device(1, DEVICE_CAPTURE_RESERVE // 2)


def test_a_pt_capture_goes_on_the_gpu_where_it_fits_and_into_host_memory_otherwise(model, monkeypatch):
    """CaptureSession.buffers' choice for a run on a GPU. This machine has none, so the allocation is faked:
    every set is made in host memory, and where it was asked to go is noted. flux-tiny at 64x48 with 32
    text tokens, 3 steps of which 0 and 2 are captured, in float32: each captured step holds 56,320 bytes
    of block outputs (2 double blocks x (12 + 32) tokens + 3 single blocks x 44 tokens, x 64 channels x 4
    bytes) and 6,400 of context (img_state and pred 12 x 64, vec 64), the other step its context only:
    131,840 bytes in all, which must leave DEVICE_CAPTURE_RESERVE free."""
    import flux.decode
    from flux.capture import CONTEXT_KEYS
    from flux.options import DEVICE_CAPTURE_RESERVE
    from flux.pipeline import CaptureSession

    gpu, free, oom, asked = torch.device("cuda", 0), [0], [False], []

    def fake_new(self, full: bool) -> dict:
        asked.append((self.device, self.pin))
        if self.device is not None and oom[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (another process took it)")
        keys = self.shapes if full else CONTEXT_KEYS
        return {k: torch.empty(self.shapes[k], dtype=self.dtypes[k]) for k in keys}

    monkeypatch.setattr(BufferPool, "_new", fake_new)
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: free[0])
    plan = CapturePlan.parse(None, "0,2", "both", None, 2, 3, 3)

    def where(fmt: str = "pt", on_device: bool | None = None) -> tuple:
        asked.clear()
        pool = CaptureSession.buffers(model, plan, fmt, 32, 12, torch.float32, 3, gpu, on_device)
        assert pool.count == {True: 2, False: 1} or fmt == "safetensors"  # every set, before sampling
        assert set(asked) == {(pool.device, pool.pin)}
        return pool.device, pool.pin

    free[0] = DEVICE_CAPTURE_RESERVE + 131_840
    assert where() == (gpu, False)
    free[0] -= 1
    assert where() == (None, True)  # pinned host memory
    assert where(on_device=True) == (gpu, False)  # forced
    free[0] = 2**40
    assert where(on_device=False) == (None, True)
    assert where("safetensors") == (None, True)  # streamed from host memory
    oom[0] = True
    asked.clear()
    pool = CaptureSession.buffers(model, plan, "pt", 32, 12, torch.float32, 3, gpu)
    assert (pool.device, pool.pin) == (None, True) and (gpu, False) in asked  # tried, then host memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        CaptureSession.buffers(model, plan, "pt", 32, 12, torch.float32, 3, gpu, on_device=True)


def test_on_host_copies_only_what_is_not_in_host_memory():
    """A capture written from the GPU goes through on_host; host tensors must not be copied again (a .pt
    capture in host memory can be tens of GB), and the capture's structure must survive as it is."""
    from flux.store import on_host

    a, b = torch.ones(2), torch.zeros(3)
    capture = {"blocks": {"block_0": [(a, b)]}, "context": {"steps": [a], "n": 3, "pairs": [(1.0, 0.5)]}}
    out = on_host(capture)
    assert out["blocks"]["block_0"][0][0] is a and out["blocks"]["block_0"][0][1] is b
    assert type(out["blocks"]["block_0"][0]) is tuple and type(out["blocks"]["block_0"]) is list
    assert out["context"]["steps"][0] is a and out["context"]["n"] == 3
    assert out["context"]["pairs"] == [(1.0, 0.5)]


def test_the_next_free_number_is_one_past_the_highest_not_the_count(tmp_path):
    """A file deleted by hand leaves a gap; numbering goes on after the highest, so an orphan replay_3.json
    is never paired with a new replay_3.jpg, and nothing is written over."""
    (tmp_path / "replay_3.json").write_text("{}")
    assert next_free_index(tmp_path, "replay_", ".json") == 4
    assert next_free_index(tmp_path, "replay_", ".jpg") == 0
    for n in (0, 5):
        (tmp_path / f"img_{n}.jpg").write_bytes(b"")
    assert next_free_index(tmp_path, "img_", ".jpg") == 6


def test_decode_saved_never_writes_into_a_folder_that_holds_files(tmp_path):
    from flux.pipeline import decode_saved

    out = tmp_path / "lens"
    out.mkdir()
    (out / "grid_single.jpg").write_text("an earlier lens")
    with pytest.raises(FileExistsError, match="is not empty"):
        decode_saved({"metadata": {}, "denoising_context": {}}, None, None, out)
    assert (out / "grid_single.jpg").read_text() == "an earlier lens"


def test_a_capture_whose_final_context_cannot_be_written_is_not_marked_complete(model, tmp_path, monkeypatch):
    """The index says "complete" only once context.safetensors (with the final latent) is on disk: a full
    disk at that write leaves the capture marked incomplete, its steps readable, also after `abort`."""
    import flux.store

    real = flux.store.save_file

    def full_at_the_context(tensors, path, *args, **kwargs):
        if "final_latent" in tensors:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(flux.store, "save_file", full_at_the_context)
    plan = CapturePlan.everything(model, NUM_STEPS)
    sinks = []
    with pytest.raises(UserError, match="is full"):
        _capture(
            model, lambda pool, meta: sinks.append(SafetensorsSink(tmp_path, pool, meta)) or sinks[0], plan
        )
    assert json.loads((tmp_path / "index.json").read_text())["complete"] is False
    sinks[0].abort()
    monkeypatch.undo()
    capture = load_capture(tmp_path)
    assert capture["metadata"]["complete"] is False and capture["metadata"]["steps_done"] == [0, 1, 2]
    assert "final_latent" not in capture["denoising_context"]
