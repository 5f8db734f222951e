"""`torch.save`, byte for byte, with the zip records' CRC32s computed on several threads after the write
(see `torch_save`): the `.pt` capture writer of `flux.store`.
"""

import errno
import mmap
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux.errors import error_chain

_SAVE_CONFIG_LOCK = threading.Lock()  # torch's serialization config is process-wide


def _crc_config() -> Any:
    """torch's save config when it can leave out the zip records' CRC32s (torch >= 2.6), else None."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return None
    return config.save if hasattr(config.save, "compute_crc32") else None


def torch_save(obj: Any, path: Path, workers: int | None = None) -> None:
    """torch.save to `path`, byte for byte, with the zip records' CRC32s computed on `workers` threads.

    torch computes each record's CRC32 inline on one thread, about half the time of a large save; torch.load
    never checks them, but Python's zipfile, `unzip -t` and the pickle scanners built on them (as a model hub
    runs on uploads) reject a file without them. So where torch can leave them out, the file is written
    without, then `fill_zip_crc32s` fills them in from the page cache, in parallel, and the serialization id
    torch derives from them is put right (`_fix_serialization_id`). Should the file not be laid out as
    expected, it is written again by torch.save with its own CRC32s: never a capture lost to this.

    The config switch is process-wide: a torch.save in another thread during the write (not one of ours:
    they take turns here) would leave its CRC32s out too.

    Written through a Python file, so that a full disk surfaces as OSError(ENOSPC) in the error chain (given
    a path, torch's C++ writer reports only "unexpected pos ...", with no errno).
    """
    config = _crc_config()
    with open(path, "w+b") as f:
        if config is None:
            _save(obj, f)
            return
        with _SAVE_CONFIG_LOCK:
            before, config.compute_crc32 = config.compute_crc32, False
            try:
                _save(obj, f)
            finally:
                config.compute_crc32 = before
            f.flush()
            if not before:  # asked for by whoever set the config
                return
            try:
                _fix_serialization_id(f.fileno(), _fill_crc32s(f.fileno(), workers))
            except ValueError:  # not the layout this torch was expected to write
                f.seek(0)
                f.truncate()
                _save(obj, f)


def _save(obj: Any, f: Any) -> None:
    """torch.save(obj, f), where an interrupt during a write (Ctrl-C, or the CLI's SIGTERM) stays one.

    torch's zip writer, closing the file on the way out, finds it shorter than it counted and raises
    "unexpected pos ..." in place of the interrupt: the run would end as a crash (exit 1), not as stopped.
    """
    try:
        torch.save(obj, f)
    except Exception as e:
        interrupt = next((x for x in error_chain(e) if isinstance(x, KeyboardInterrupt)), None)
        if interrupt is None:
            raise
        raise interrupt from None


_EOCD, _EOCD64, _LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CENTRAL, _LOCAL, _DESCRIPTOR = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_FULL = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field


@dataclass(frozen=True)
class _ZipRecord:
    name: str
    central: int  # offset of its central directory entry
    data: int  # offset of its data
    size: int
    crc_at: int  # offset of its CRC32 field in the local header, or in the data descriptor after the data


def _end_of_directory(mm: mmap.mmap) -> int:
    """Offset of the end of central directory record: the signature whose record, comment included, ends the
    file (the same bytes may occur earlier, even inside the record's own fields)."""
    start = max(0, len(mm) - 22 - 0xFFFF)
    pos = mm.rfind(_EOCD, start)
    while pos >= 0:
        if pos + 22 <= len(mm) and pos + 22 + struct.unpack_from("<H", mm, pos + 20)[0] == len(mm):
            return pos
        pos = mm.rfind(_EOCD, start, pos + 3)  # the next match that starts below this one
    raise ValueError("not a zip archive: no end of central directory record")


def _zip_records(mm: mmap.mmap) -> list[_ZipRecord]:
    """Every record of a stored (uncompressed, unencrypted) zip archive, read from its central directory."""
    try:
        return list(_read_directory(mm))
    except struct.error as e:  # a field past the end of the file
        raise ValueError(f"truncated or malformed zip archive ({e})") from e


def _read_directory(mm: mmap.mmap):
    end = _end_of_directory(mm)
    count, _, directory = struct.unpack_from("<HLL", mm, end + 10)
    if directory == _FULL or count == 0xFFFF:
        if mm[end - 20 : end - 16] != _LOCATOR64:
            raise ValueError("zip64 end of central directory locator missing")
        (record64,) = struct.unpack_from("<Q", mm, end - 12)
        if mm[record64 : record64 + 4] != _EOCD64:
            raise ValueError("zip64 end of central directory record missing")
        count, _, directory = struct.unpack_from("<QQQ", mm, record64 + 32)
    pos = directory
    for _ in range(count):
        if mm[pos : pos + 4] != _CENTRAL:
            raise ValueError(f"no central directory entry at byte {pos}")
        flags, method = struct.unpack_from("<HH", mm, pos + 8)
        size, usize, name_len, extra_len, comment_len = struct.unpack_from("<LLHHH", mm, pos + 20)
        (local,) = struct.unpack_from("<L", mm, pos + 42)
        if method != 0 or flags & 1:
            raise ValueError("only stored, unencrypted records are supported")
        wide = [usize == _FULL, size == _FULL, local == _FULL]  # zip64 extra field order
        extra, at = pos + 46 + name_len, pos + 46 + name_len
        while at < extra + extra_len and any(wide):
            tag, length = struct.unpack_from("<HH", mm, at)
            if tag == 1:
                values = iter(struct.unpack_from(f"<{sum(wide)}Q", mm, at + 4))
                usize, size, local = (next(values) if w else v for w, v in zip(wide, (usize, size, local)))
                wide = [False] * 3
            at += 4 + length
        if mm[local : local + 4] != _LOCAL:
            raise ValueError(f"no local header at byte {local}")
        local_name, local_extra = struct.unpack_from("<HH", mm, local + 26)
        data = local + 30 + local_name + local_extra
        crc_at = local + 14  # in the local header, unless a data descriptor after the data holds it
        if flags & 8:
            crc_at = data + size + (4 if mm[data + size : data + size + 4] == _DESCRIPTOR else 0)
        if crc_at + 4 > len(mm):
            raise ValueError(f"record at byte {local} runs past the end of the file")
        name = bytes(mm[pos + 46 : pos + 46 + name_len]).decode("utf-8", "replace")
        yield _ZipRecord(name, pos, data, size, crc_at)
        pos += 46 + name_len + extra_len + comment_len


def _write_crc(fd: int, record: _ZipRecord, crc: int) -> None:
    field = struct.pack("<L", crc)
    for offset in (record.central + 16, record.crc_at):
        if os.pwrite(fd, field, offset) != 4:
            raise OSError(errno.EIO, "short write of a CRC32")


def fill_zip_crc32s(fd: int, workers: int | None = None) -> dict[str, int]:
    """Write the CRC32 of every record of the stored zip archive open at `fd` (read-write) into its local
    header or data descriptor and its central directory entry, computed on `workers` threads (zlib lets go of
    the GIL) over a read-only map of the file: for a `.pt` written with torch's `compute_crc32` off, which
    leaves them 0. The four-byte fields are written with pwrite, so a full disk is an OSError, never a
    SIGBUS from a dirty mapped page. Returns {record name: CRC32}, in the directory's order."""
    return {record.name: crc for record, crc in _fill_crc32s(fd, workers)}


def _fill_crc32s(fd: int, workers: int | None) -> list[tuple[_ZipRecord, int]]:
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
        records = _zip_records(mm)
        view = memoryview(mm)
        try:
            with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
                crcs = list(pool.map(lambda r: zlib.crc32(view[r.data : r.data + r.size]), records))
        finally:
            view.release()
    for record, crc in zip(records, crcs):
        _write_crc(fd, record, crc)
    return list(zip(records, crcs))


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask


def _fix_serialization_id(fd: int, records: list[tuple[_ZipRecord, int]]) -> None:
    """Put right the `.data/serialization_id` record of a `.pt` whose CRC32s were filled in afterwards
    (`records`: every record with its CRC32, in the archive's order).

    torch writes 40 digits there: 20 of its own, then 20 of c10::hash_combine over every other record's
    CRC32 in the archive's order, so written without CRC32s, all captures of one layout would share an id.
    The second half must be that hash of zeros, else torch wrote something this does not know (ValueError).
    """
    ids = [r for r, _ in records if r.name.endswith("/.data/serialization_id")]
    if not ids:
        return  # torch before 2.5 writes none
    (record,) = ids
    written = os.pread(fd, record.size, record.data)
    without, with_crcs = 0, 0
    for other, crc in records:
        if other is not record:
            without, with_crcs = _hash_combine(without, 0), _hash_combine(with_crcs, crc)
    if len(written) != 40 or not written.isdigit() or int(written[20:]) != without:
        raise ValueError(f"unexpected serialization id {written[:48]!r}")
    fixed = written[:20] + f"{with_crcs:020d}".encode()
    if os.pwrite(fd, fixed, record.data) != len(fixed):
        raise OSError(errno.EIO, "short write of the serialization id")
    _write_crc(fd, record, zlib.crc32(fixed))
