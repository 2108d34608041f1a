"""The spool the publisher uses: :class:`Spool`, a bounded FIFO over segment files.

Layout of its folder: segment files (:mod:`agent.spool.segments`) holding the records in FIFO
order, and ``spool.json`` (:mod:`agent.spool.recovery`) saying where the first pending record
is. Durability (fsync policy) and the size bound: see :mod:`agent.spool`. Disk use can exceed
``max_bytes`` by the acknowledged prefix of the oldest segment (at most one segment,
``segment_bytes``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

from agent.atomic import atomic_write_json
from agent.spool import SpoolError
from agent.spool.records import SpoolRecord, encode_record
from agent.spool.recovery import STATE_FILE, STATE_SCHEMA, reopen, state_of
from agent.spool.segments import Segment, create_segment, write_all, write_segment
from common.atomic import fsync_dir

log = logging.getLogger("agent.spool")


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
        self._write_fd: int | None = None
        self._retired_fds: list[int] = []
        """Write fds of segments finished since the last sync: fsynced (then closed) by it."""
        self._data_dirty = False
        self._state_dirty = False
        self._closed = False
        self._last_sync = clock()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(
                f"cannot create the spool folder {self._dir}: {err.strerror}; check the "
                "agent's state_dir and its permissions"
            ) from err
        found = reopen(self._dir)
        self._segments: deque[Segment] = found.segments
        self._next_segno = found.next_segno
        self._next_index = found.next_index
        self._depth = found.depth
        self._pending_bytes = found.pending_bytes
        self._dropped = found.dropped
        self._dir_dirty = found.dir_dirty

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

    def _new_segment(self, segno: int, first_index: int) -> tuple[Segment, int]:
        created = create_segment(self._dir, segno, first_index)
        self._dir_dirty = True
        return created

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
            write_all(self._write_fd, rec)
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
        self._dir_dirty = True
        seg = write_segment(
            self._dir, first.segno - 1, first.first_index + first.start - len(keep), keep
        )
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
                out.extend(seg.read(lo, hi))
        return out

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
                state = (
                    state_of(self._segments, next_segno=self._next_segno, dropped=self._dropped)
                    if self._state_dirty or force_state
                    else None
                )
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
