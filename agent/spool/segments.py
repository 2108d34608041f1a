"""Spool segment files: ``seg±NNNNNNNNNNNNNNNNNNNN.log``, appended to only.

Each starts with an 8-byte header (``EFSPOOL`` + format version) followed by records (see
:mod:`agent.spool.records`). A record cut short or damaged by a power loss fails its
length/CRC check when the segment is opened: it and whatever follows it in that segment are
skipped (and a torn tail of the newest segment is truncated), with a warning, never a crash.
Segments are numbered in FIFO order.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from agent.spool import SpoolError
from agent.spool.records import BODY, FIX, REC, SpoolRecord, decode_body

log = logging.getLogger("agent.spool")

MAGIC = b"EFSPOOL"
SEGMENT_VERSION = 1
HEADER = MAGIC + bytes([SEGMENT_VERSION])
_SEG_PREFIX, _SEG_SUFFIX = "seg", ".log"


@dataclass(slots=True)
class Segment:
    """One segment file: where its records start and which of them are still pending."""

    segno: int
    path: Path
    first_index: int
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    end: int = len(HEADER)
    start: int = 0
    """Position in ``offsets`` of the first pending record."""
    read_fd: int | None = None

    @property
    def pending(self) -> int:
        return len(self.offsets) - self.start

    def size_of(self, i: int) -> int:
        nxt = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.end
        return nxt - self.offsets[i]

    def close_reader(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def read(self, lo: int, hi: int) -> list[SpoolRecord]:
        """Records ``lo`` (inclusive) to ``hi`` (exclusive) of this segment, one ``pread``."""
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        base = self.offsets[lo]
        stop = self.offsets[hi] if hi < len(self.offsets) else self.end
        data = os.pread(self.read_fd, stop - base, base)
        records = []
        for i in range(lo, hi):
            pos = self.offsets[i] - base
            (length,) = struct.unpack_from("<I", data, pos)
            body = data[pos + REC.size : pos + REC.size + length]
            records.append(decode_body(body, self.first_index + i))
        return records


def segment_name(segno: int) -> str:
    return f"{_SEG_PREFIX}{segno:+021d}{_SEG_SUFFIX}"


def parse_segno(name: str) -> int | None:
    if not (name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX)):
        return None
    try:
        return int(name[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
    except ValueError:
        return None


def scan(data: bytes) -> tuple[array[int], int]:
    """Offsets of the valid records in a segment and the end of the last valid one."""
    offsets: array[int] = array("Q")
    pos = len(HEADER)
    size = len(data)
    while pos + REC.size <= size:
        length, crc = REC.unpack_from(data, pos)
        body_start = pos + REC.size
        if length < BODY.size or body_start + length > size:
            break
        body = data[body_start : body_start + length]
        if zlib.crc32(body, zlib.crc32(data[pos : pos + 4])) != crc:
            break
        offsets.append(pos)
        pos = body_start + length
    return offsets, pos


def open_segment(segno: int, path: Path, *, first_index: int, last: bool) -> Segment | None:
    """Read and check an existing segment; None when it was removed (cut before its header).

    A torn tail of the ``last`` (newest) segment is truncated; corruption elsewhere is skipped.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpoolError(f"cannot read spool segment {path}: {err.strerror}; {FIX}") from err
    if len(data) < len(HEADER):
        log.warning("spool: removing %s, cut short before its header was written", path)
        path.unlink(missing_ok=True)
        return None
    if data[: len(MAGIC)] != MAGIC:
        raise SpoolError(f"{path} is not an edgefleet spool segment; {FIX}")
    if data[len(MAGIC)] != SEGMENT_VERSION:
        raise SpoolError(
            f"spool segment {path} has format version {data[len(MAGIC)]}, this agent reads "
            f"version {SEGMENT_VERSION} (written by another agent version?); {FIX}"
        )
    offsets, end = scan(data)
    if end < len(data):
        if last:
            log.warning(
                "spool: discarding a torn or corrupt record at byte %d of %s (%d bytes, "
                "probably cut by a power loss)",
                end,
                path,
                len(data) - end,
            )
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        else:
            log.warning(
                "spool: corrupt record at byte %d of %s; skipping the %d bytes after it",
                end,
                path,
                len(data) - end,
            )
    seg = Segment(segno=segno, path=path, first_index=first_index, offsets=offsets)
    seg.end = end
    return seg


def create_segment(directory: Path, segno: int, first_index: int) -> tuple[Segment, int]:
    """Create a new, empty segment file; returns it and its append-only write fd."""
    path = directory / segment_name(segno)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        write_all(fd, HEADER)
    except OSError as err:
        raise SpoolError(
            f"cannot create spool segment {path}: {err.strerror}; check free space and "
            f"permissions of {directory}"
        ) from err
    return Segment(segno=segno, path=path, first_index=first_index), fd


def write_segment(directory: Path, segno: int, first_index: int, records: list[bytes]) -> Segment:
    """Create a segment holding ``records`` (encoded), fsynced and closed."""
    seg, fd = create_segment(directory, segno, first_index)
    try:
        for rec in records:
            write_all(fd, rec)
            seg.offsets.append(seg.end)
            seg.end += len(rec)
        os.fsync(fd)
    except OSError as err:
        seg.path.unlink(missing_ok=True)
        raise SpoolError(
            f"cannot write to spool segment {seg.path}: {err.strerror}; check free space "
            f"of {directory}"
        ) from err
    finally:
        os.close(fd)
    return seg


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
