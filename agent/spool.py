"""A bounded on-disk FIFO of MQTT messages for when the broker cannot be reached.

Layout of ``directory``:

- ``seg±NNNNNNNNNNNNNNNNNNNN.log`` segment files, appended to only. Each starts with an 8-byte
  header (``EFSPOOL`` + format version) followed by records::

      u32 body length | u32 CRC32(length bytes + body) | body = u8 qos, u16 topic length, topic, payload

  A record cut short or damaged by a power loss fails its length/CRC check when the spool is
  opened: it and whatever follows it in that segment are skipped (and a torn tail of the newest
  segment is truncated), with a warning, never a crash.
- ``spool.json``: ``{"schema": 1, "head_segment", "head_offset", "skip", "dropped"}``,
  written atomically: where the first unacknowledged record is (``skip`` lists
  ``[segment, offset]`` for a later segment with an acknowledged prefix, which only a
  ``prepend`` creates) and how many records were dropped.

Segments are numbered in FIFO order; a segment is deleted once every record in it was
acknowledged or dropped, so a segment below ``head_segment`` (or missing) means "consumed".

Durability (fsync policy): an fsync per append would cap the spool far below the 1000 msg/s
an agent can produce on an SD card, so appends are grouped. :meth:`append` writes each record
with one ``write(2)`` into the page cache and returns; :meth:`sync` (called by the owner at most
every ``sync_interval_s`` through :meth:`sync_if_due`, and by :meth:`close`) fsyncs the
segment, the folder and the state file. Therefore:

- process crash / ``kill -9``: no appended record is lost (the kernel has it). Acks of at most
  the last ``sync_interval_s`` may be forgotten, so those records are delivered again:
  duplicates, which consumers drop by ``seq``.
- power loss / kernel crash: records appended in at most the last ``sync_interval_s`` (the
  unsynced batch) may be lost or torn (torn ones are detected and skipped); acks and the
  ``dropped`` count may go back by the same interval.

Size bound: ``max_bytes`` caps the bytes of pending records (framing included). Appending a
record that would exceed it first drops the OLDEST pending records one by one, counting each
in ``dropped``. Disk use can exceed ``max_bytes`` by the acknowledged prefix of the oldest
segment (at most one segment, ``segment_bytes``).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agent.atomic import StateFileError, atomic_write_json, read_json_state
from agent.errors import AgentError
from common.atomic import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"EFSPOOL"
SEGMENT_VERSION = 1
HEADER = MAGIC + bytes([SEGMENT_VERSION])
STATE_FILE = "spool.json"
STATE_SCHEMA = 1
_REC = struct.Struct("<II")  # body length, crc32(length bytes + body)
_BODY = struct.Struct("<BH")  # qos, topic length
MAX_PAYLOAD = 268_435_455  # the MQTT limit
_SEG_PREFIX, _SEG_SUFFIX = "seg", ".log"
_FIX = (
    "move the spool folder away to keep its messages for inspection, or delete it to start "
    "with an empty spool (its unsent messages are then lost)"
)


class SpoolError(AgentError):
    """The on-disk spool cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled message. ``index`` increases in FIFO order (valid for this Spool object)."""

    topic: str
    payload: bytes
    qos: int
    index: int


@dataclass(slots=True)
class _Segment:
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


def _segment_name(segno: int) -> str:
    return f"{_SEG_PREFIX}{segno:+021d}{_SEG_SUFFIX}"


def _parse_segno(name: str) -> int | None:
    if not (name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX)):
        return None
    try:
        return int(name[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
    except ValueError:
        return None


def encode_record(topic: str, payload: bytes, qos: int) -> bytes:
    """The on-disk bytes of one record (framing included)."""
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    t = topic.encode("utf-8")
    if len(t) > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload larger than the MQTT limit of 256 MiB")
    body = _BODY.pack(qos, len(t)) + t + payload
    length = struct.pack("<I", len(body))
    return length + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body


def _decode_body(body: bytes, index: int) -> SpoolRecord:
    qos, tlen = _BODY.unpack_from(body)
    start = _BODY.size
    topic = body[start : start + tlen].decode("utf-8")
    return SpoolRecord(topic=topic, payload=body[start + tlen :], qos=qos, index=index)


def _scan(data: bytes) -> tuple[array[int], int]:
    """Offsets of the valid records in a segment and the end of the last valid one."""
    offsets: array[int] = array("Q")
    pos = len(HEADER)
    size = len(data)
    while pos + _REC.size <= size:
        length, crc = _REC.unpack_from(data, pos)
        body_start = pos + _REC.size
        if length < _BODY.size or body_start + length > size:
            break
        body = data[body_start : body_start + length]
        if zlib.crc32(body, zlib.crc32(data[pos : pos + 4])) != crc:
            break
        offsets.append(pos)
        pos = body_start + length
    return offsets, pos


class Spool:
    """Bounded, persistent FIFO of ``(topic, payload, qos)`` records. Thread-safe.

    ``append``/``append_many`` add at the end, ``prepend`` puts records back in front (used
    when messages handed to the broker but never acknowledged must go before the spooled
    ones), ``peek`` reads without removing, ``ack``/``ack_through`` remove delivered records.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
        sync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes or max(4096, min(4 << 20, max_bytes // 8))
        self._sync_interval_s = sync_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: deque[_Segment] = deque()
        self._write_fd: int | None = None
        self._retired_fds: list[int] = []
        """Write fds of segments finished since the last sync: fsynced (then closed) by it."""
        self._depth = 0
        self._pending_bytes = 0
        self._dropped = 0
        self._next_index = 0
        self._data_dirty = False
        self._state_dirty = False
        self._dir_dirty = False
        self._closed = False
        self._last_sync = clock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(
                f"cannot create the spool folder {self._dir}: {err.strerror}; check the "
                "agent's state_dir and its permissions"
            ) from err
        self._next_segno = self._load()

    # --- opening --------------------------------------------------------------------------

    def _load(self) -> int:
        state = read_json_state(
            self._dir / STATE_FILE, schema=STATE_SCHEMA, what="spool state file", fix=_FIX
        )
        head_segno: int | None = None
        head_offset = 0
        skips: dict[int, int] = {}
        if state is not None:
            try:
                head_segno = int(state["head_segment"])
                head_offset = int(state["head_offset"])
                self._dropped = int(state["dropped"])
                skips = {int(k): int(v) for k, v in state.get("skip", [])}
            except (KeyError, TypeError, ValueError) as err:
                raise StateFileError(
                    f"spool state file {self._dir / STATE_FILE} is corrupt ({err!r}); {_FIX}"
                ) from err
        files = sorted(
            (segno, p) for p in self._dir.iterdir() if (segno := _parse_segno(p.name)) is not None
        )
        next_segno = max([*(s + 1 for s, _ in files), (head_segno or 0) + 1])
        for i, (segno, path) in enumerate(files):
            last = i == len(files) - 1
            if head_segno is not None and segno < head_segno:
                path.unlink(missing_ok=True)  # fully consumed before the last run ended
                self._dir_dirty = True
                continue
            seg = self._open_segment(segno, path, last=last)
            if seg is None:
                continue
            if segno == head_segno:
                seg.start = bisect.bisect_left(seg.offsets, head_offset)
            elif segno in skips:
                seg.start = bisect.bisect_left(seg.offsets, skips[segno])
            if seg.pending == 0:
                path.unlink(missing_ok=True)
                self._dir_dirty = True
                continue
            self._segments.append(seg)
            self._depth += seg.pending
            self._pending_bytes += sum(seg.size_of(j) for j in range(seg.start, len(seg.offsets)))
        if self._depth:
            log.info(
                "spool %s: %d messages (%d bytes) waiting from a previous run",
                self._dir,
                self._depth,
                self._pending_bytes,
            )
        return next_segno

    def _open_segment(self, segno: int, path: Path, *, last: bool) -> _Segment | None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SpoolError(f"cannot read spool segment {path}: {err.strerror}; {_FIX}") from err
        if len(data) < len(HEADER):
            log.warning("spool: removing %s, cut short before its header was written", path)
            path.unlink(missing_ok=True)
            self._dir_dirty = True
            return None
        if data[: len(MAGIC)] != MAGIC:
            raise SpoolError(f"{path} is not an edgefleet spool segment; {_FIX}")
        if data[len(MAGIC)] != SEGMENT_VERSION:
            raise SpoolError(
                f"spool segment {path} has format version {data[len(MAGIC)]}, this agent reads "
                f"version {SEGMENT_VERSION} (written by another agent version?); {_FIX}"
            )
        offsets, end = _scan(data)
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
        seg = _Segment(segno=segno, path=path, first_index=self._next_index, offsets=offsets)
        seg.end = end
        self._next_index += len(offsets)
        return seg

    # --- properties -----------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def depth(self) -> int:
        """Pending (not yet acknowledged) records."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Bytes of the pending records, framing included (what ``max_bytes`` caps)."""
        return self._pending_bytes

    @property
    def dropped(self) -> int:
        """Records dropped because the spool was full (persisted, survives restarts)."""
        return self._dropped

    @property
    def head_index(self) -> int:
        """``index`` of the first pending record (or of the next appended one when empty)."""
        with self._lock:
            return self._head_index()

    def _head_index(self) -> int:
        if not self._segments:
            return self._next_index
        head = self._segments[0]
        return head.first_index + head.start

    # --- writing --------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Add one record at the end, dropping the oldest ones if it does not fit."""
        self.append_many([(topic, payload, qos)])

    def append_many(self, items: Iterable[tuple[str, bytes, int]]) -> None:
        """Add records at the end, in order (see :meth:`append`)."""
        encoded = [encode_record(t, p, q) for t, p, q in items]
        with self._lock:
            self._check_open()
            for rec in encoded:
                if not self._make_room(len(rec)):
                    continue
                self._write(rec)

    def _make_room(self, size: int) -> bool:
        if size > self._max_bytes:
            log.warning(
                "spool: dropping a %d-byte message, larger than the whole spool (max_bytes=%d)",
                size,
                self._max_bytes,
            )
            self._dropped += 1
            self._state_dirty = True
            return False
        dropped = 0
        while self._pending_bytes + size > self._max_bytes and self._depth:
            self._consume(1)
            dropped += 1
        if dropped:
            if self._dropped == 0 or log.isEnabledFor(logging.DEBUG):
                log.warning(
                    "spool %s is full (max_bytes=%d): dropping the oldest messages",
                    self._dir,
                    self._max_bytes,
                )
            self._dropped += dropped
            self._state_dirty = True
        return True

    def _new_segment(self, segno: int, first_index: int) -> tuple[_Segment, int]:
        path = self._dir / _segment_name(segno)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            _write_all(fd, HEADER)
        except OSError as err:
            raise SpoolError(
                f"cannot create spool segment {path}: {err.strerror}; check free space and "
                f"permissions of {self._dir}"
            ) from err
        self._dir_dirty = True
        return _Segment(segno=segno, path=path, first_index=first_index), fd

    def _write(self, rec: bytes) -> None:
        last = self._segments[-1] if self._segments else None
        if (
            last is None
            or self._write_fd is None
            or (last.end + len(rec) > self._segment_bytes and last.offsets)
        ):
            if self._write_fd is not None:
                self._retired_fds.append(self._write_fd)  # fsync later, outside this lock
                self._write_fd = None
            last, self._write_fd = self._new_segment(self._next_segno, self._next_index)
            self._next_segno += 1
            self._segments.append(last)
        try:
            _write_all(self._write_fd, rec)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._write_fd, last.end)  # never leave half a record behind
            raise SpoolError(
                f"cannot write to spool segment {last.path}: {err.strerror}; check free space "
                f"of {self._dir}"
            ) from err
        last.offsets.append(last.end)
        last.end += len(rec)
        self._next_index += 1
        self._depth += 1
        self._pending_bytes += len(rec)
        self._data_dirty = True

    def prepend(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Put records back in FRONT of the pending ones, in the given order, durably.

        For messages that were handed to the broker but never acknowledged: they must be
        delivered before everything spooled after them. When they do not all fit, the oldest
        of them are dropped (and counted).
        """
        encoded = [encode_record(t, p, q) for t, p, q in items]
        if not encoded:
            return
        with self._lock:
            self._check_open()
            empty = not self._segments
            if empty:
                for rec in encoded:
                    if self._make_room(len(rec)):
                        self._write(rec)
        if empty:
            self.sync()
            return
        # Persist the current head first: the new segment is numbered below the head segment
        # and must never be read with a stale head offset that belongs to another file.
        self.sync(force_state=True)
        with self._lock:
            self._prepend_segment(encoded)
        self.sync(force_state=True)

    def _prepend_segment(self, encoded: list[bytes]) -> None:
        free = self._max_bytes - self._pending_bytes
        keep: list[bytes] = []
        for rec in reversed(encoded):
            if len(rec) > free:
                break
            keep.append(rec)
            free -= len(rec)
        keep.reverse()
        lost = len(encoded) - len(keep)
        if lost:
            log.warning("spool %s is full: dropping %d unacknowledged messages", self._dir, lost)
            self._dropped += lost
            self._state_dirty = True
        if not keep:
            return
        first = self._segments[0]
        seg, fd = self._new_segment(first.segno - 1, first.first_index + first.start - len(keep))
        try:
            for rec in keep:
                _write_all(fd, rec)
                seg.offsets.append(seg.end)
                seg.end += len(rec)
            os.fsync(fd)
        except OSError as err:
            seg.path.unlink(missing_ok=True)
            raise SpoolError(
                f"cannot write to spool segment {seg.path}: {err.strerror}; check free space "
                f"of {self._dir}"
            ) from err
        finally:
            os.close(fd)
        self._segments.appendleft(seg)
        self._depth += len(keep)
        self._pending_bytes += sum(len(r) for r in keep)
        self._state_dirty = True

    # --- reading and acknowledging --------------------------------------------------------

    def peek(self, n: int, *, skip: int = 0) -> list[SpoolRecord]:
        """Up to ``n`` pending records after the first ``skip`` ones, oldest first."""
        out: list[SpoolRecord] = []
        with self._lock:
            self._check_open()
            for seg in self._segments:
                if len(out) >= n:
                    break
                if skip >= seg.pending:
                    skip -= seg.pending
                    continue
                lo = seg.start + skip
                skip = 0
                hi = min(len(seg.offsets), lo + (n - len(out)))
                out.extend(self._read(seg, lo, hi))
        return out

    def _read(self, seg: _Segment, lo: int, hi: int) -> list[SpoolRecord]:
        if seg.read_fd is None:
            seg.read_fd = os.open(seg.path, os.O_RDONLY)
        base = seg.offsets[lo]
        stop = seg.offsets[hi] if hi < len(seg.offsets) else seg.end
        data = os.pread(seg.read_fd, stop - base, base)
        records = []
        for i in range(lo, hi):
            pos = seg.offsets[i] - base
            (length,) = struct.unpack_from("<I", data, pos)
            body = data[pos + _REC.size : pos + _REC.size + length]
            records.append(_decode_body(body, seg.first_index + i))
        return records

    def ack(self, n: int) -> None:
        """Remove the first ``n`` pending records (they were delivered)."""
        with self._lock:
            self._check_open()
            if not 0 <= n <= self._depth:
                raise ValueError(f"cannot ack {n} records, {self._depth} pending")
            self._consume(n)
            self._state_dirty = True

    def ack_through(self, index: int) -> int:
        """Remove every pending record with ``index`` <= the given one; returns how many.

        Unlike :meth:`ack` this stays correct when records were dropped meanwhile.
        """
        with self._lock:
            self._check_open()
            n = min(self._depth, index - self._head_index() + 1)
            if n <= 0:
                return 0
            self._consume(n)
            self._state_dirty = True
            return n

    def _consume(self, n: int) -> None:
        while n > 0:
            seg = self._segments[0]
            take = min(n, seg.pending)
            self._pending_bytes -= (
                seg.offsets[seg.start + take - 1]
                + seg.size_of(seg.start + take - 1)
                - seg.offsets[seg.start]
            )
            seg.start += take
            self._depth -= take
            n -= take
            if seg.pending == 0:
                self._segments.popleft()
                seg.close_reader()
                if not self._segments and self._write_fd is not None:
                    os.close(self._write_fd)
                    self._write_fd = None
                seg.path.unlink(missing_ok=True)
                self._dir_dirty = True

    # --- durability -----------------------------------------------------------------------

    def _state(self) -> dict[str, object]:
        if self._segments:
            head = self._segments[0]
            return {
                "head_segment": head.segno,
                "head_offset": head.offsets[head.start],
                # After a prepend the old head segment keeps its acknowledged prefix.
                "skip": [
                    [seg.segno, seg.offsets[seg.start]]
                    for seg in list(self._segments)[1:]
                    if seg.start > 0
                ],
                "dropped": self._dropped,
            }
        # Empty: every segment numbered below the next one is consumed.
        return {
            "head_segment": self._next_segno,
            "head_offset": 0,
            "skip": [],
            "dropped": self._dropped,
        }

    def sync(self, *, force_state: bool = False) -> None:
        """Make every append, ack and drop so far durable (fsync data, folder and state)."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                fds = self._retired_fds
                self._retired_fds = []
                if self._data_dirty and self._write_fd is not None:
                    fds.append(os.dup(self._write_fd))
                state = self._state() if self._state_dirty or force_state else None
                dir_dirty = self._dir_dirty
                self._data_dirty = self._state_dirty = self._dir_dirty = False
                self._last_sync = self._clock()
            try:
                for fd in fds:
                    os.fsync(fd)
                if state is not None:
                    atomic_write_json(self._dir / STATE_FILE, schema=STATE_SCHEMA, data=state)
                elif dir_dirty:
                    fsync_dir(self._dir)
            except OSError as err:
                with self._lock:
                    self._data_dirty = self._data_dirty or bool(fds)
                    self._state_dirty = self._state_dirty or state is not None
                    self._dir_dirty = True
                raise SpoolError(
                    f"cannot sync the spool in {self._dir}: {err.strerror}; check the disk"
                ) from err
            finally:
                for fd in fds:
                    os.close(fd)

    def sync_if_due(self) -> bool:
        """:meth:`sync` if something changed and ``sync_interval_s`` passed since the last one."""
        with self._lock:
            due = (
                (self._data_dirty or self._state_dirty or self._dir_dirty)
                and self._clock() - self._last_sync >= self._sync_interval_s
                and not self._closed
            )
        if due:
            self.sync()
        return due

    def close(self) -> None:
        """Sync and release file handles. Idempotent."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            with self._lock:
                self._closed = True
                for seg in self._segments:
                    seg.close_reader()
                for fd in self._retired_fds:
                    os.close(fd)
                self._retired_fds = []
                if self._write_fd is not None:
                    os.close(self._write_fd)
                    self._write_fd = None

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self._dir} is closed")

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
