"""An experimental spool on the stdlib ``sqlite3``, behind the interface of the agent's spool.

:class:`SqliteSpool` has the methods and the contract of :class:`agent.spool.queue.Spool`
(see :mod:`agent.spool`) so that ``bench.spool`` can compare the two; it stays here unless it
wins. One database, ``spool.sqlite3``, in WAL mode with ``synchronous=NORMAL``: each append
is one transaction whose commit writes the WAL (page cache) with no fsync, so it survives
``kill -9`` once it returns. ``sync`` commits the head and ``dropped``, then runs a PASSIVE
checkpoint on a second connection, outside the writers' lock: it fsyncs the WAL (every commit
so far is then durable), copies it into the database and fsyncs that. Automatic checkpoints
are pushed far out, so fsyncs happen only in ``sync`` (``sync_if_due``: at most every
``sync_interval_s``). A ``sync`` that finds the spool empty VACUUMs the database, which SQLite
would otherwise keep at its high-water mark; the WAL is cut to ``_WAL_KEEP_BYTES`` when it
restarts.

Pending records are the rows ``head <= idx < next``, always contiguous. Acks and drops only
move ``head`` in memory; the next ``sync`` stores it and deletes the rows below, so after a
``kill -9`` acks and drops of at most the last ``sync_interval_s`` are forgotten (delivered
again), as with the segment spool. Indexes survive a reopen; ``prepend`` numbers its records
below ``head``. ``size_bytes`` counts the segment spool's framed record size, so
``max_bytes`` means the same for both.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from agent.spool import SpoolError
from agent.spool.records import BODY, FIX, REC, SpoolRecord, checked_topic

log = logging.getLogger("agent.spool")

DB_FILE = "spool.sqlite3"
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of a spool database."""
_AUTOCHECKPOINT_PAGES = 16384
"""A safety net only (64 MiB of WAL at 4 KiB pages): ``sync`` checkpoints long before."""
PAGE_SIZE = 4096  # of a new database; each commit writes whole pages to the WAL
_WAL_KEEP_BYTES = 4 << 20  # the WAL file is cut back to this when it restarts
_VACUUM_FREE_PAGES = 256
"""A ``sync`` that finds the spool empty and more free pages than this in the database file
shrinks it (SQLite keeps freed pages otherwise: the file would stay at its high-water mark)."""
_HEAD_CHUNK = 512  # sizes of the oldest records read at once when dropping them

_DDL = (
    "CREATE TABLE IF NOT EXISTS records (idx INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
    " payload BLOB NOT NULL, qos INTEGER NOT NULL, size INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0),"
    " head INTEGER NOT NULL, dropped INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES (0, 0, 0)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = "INSERT INTO records VALUES (?, ?, ?, ?, ?)"

Row = tuple[int, str, bytes, int, int]  # idx, topic, payload, qos, size


def checked(topic: str, payload: bytes, qos: int) -> tuple[str, bytes, int, int]:
    """The record with its framed size (what ``max_bytes`` counts); ValueError if invalid."""
    t = checked_topic(topic, payload, qos)
    return topic, payload, qos, REC.size + BODY.size + len(t) + len(payload)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only in a new database
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteSpool:
    """Bounded, persistent FIFO of ``(topic, payload, qos)`` records in SQLite. Thread-safe.

    Same interface as :class:`agent.spool.queue.Spool`; ``segment_bytes`` is accepted and
    ignored so that either can be built with the same arguments.
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
        del segment_bytes
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._sync_interval_s = sync_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._data_dirty = False
        self._state_dirty = False
        self._closed = False
        self._last_sync = clock()
        self._head_sizes: deque[int] = deque()
        self._head_sizes_at = 0
        """Index of the record whose size is ``_head_sizes[0]``."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(
                f"cannot create the spool folder {self._dir}: {err.strerror}; check the "
                "agent's state_dir and its permissions"
            ) from err
        path = self._dir / DB_FILE
        try:
            self._db = _connect(path)
            try:
                self._open_schema(path)
                self._ckpt = _connect(path)
            except BaseException:
                self._db.close()
                raise
        except sqlite3.Error as err:
            raise SpoolError(f"cannot open the spool database {path}: {err}; {FIX}") from err

    def _open_schema(self, path: Path) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise SpoolError(
                f"spool database {path} has schema {version}, this agent reads schema "
                f"{SCHEMA_VERSION} (written by another agent version?); {FIX}"
            )
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise SpoolError(f"spool database {path} cannot use WAL mode; {FIX}")
        db.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
        db.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                for statement in _DDL:
                    db.execute(statement)
            head, dropped = db.execute("SELECT head, dropped FROM meta").fetchone()
            db.execute("DELETE FROM records WHERE idx < ?", (head,))
            count, last, total = db.execute(
                "SELECT count(*), max(idx), coalesce(sum(size), 0) FROM records"
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if count and last - head + 1 != count:
            raise SpoolError(f"spool database {path} has gaps in its records; {FIX}")
        self._head: int = head
        self._next_index: int = head + count
        self._depth: int = count
        self._pending_bytes: int = total
        self._dropped: int = dropped
        if count:
            log.info("spool %s: %d messages (%d bytes) from a previous run", path, count, total)

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
        """Bytes of the pending records, framed as the segment spool frames them."""
        return self._pending_bytes

    @property
    def dropped(self) -> int:
        """Records dropped because the spool was full (persisted, survives restarts)."""
        return self._dropped

    @property
    def head_index(self) -> int:
        """``index`` of the first pending record (or of the next appended one when empty)."""
        with self._lock:
            return self._head

    # --- writing --------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Add one record at the end, dropping the oldest ones if it does not fit."""
        self.append_many([(topic, payload, qos)])

    def append_many(self, items: Iterable[tuple[str, bytes, int]]) -> None:
        """Add records at the end, in order, in one transaction (see :meth:`append`)."""
        records = [checked(t, p, q) for t, p, q in items]
        if not records:
            return
        with self._lock:
            self._check_open()
            saved = self._counters()
            rows: list[Row] = []
            try:
                self._db.execute("BEGIN")
                for topic, payload, qos, size in records:
                    if not self._make_room(size, rows):
                        continue
                    rows.append((self._next_index, topic, payload, qos, size))
                    self._next_index += 1
                    self._depth += 1
                    self._pending_bytes += size
                self._db.executemany(_INSERT, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                self._undo(saved)
                raise self._write_error(err) from err
            self._data_dirty = True

    def _make_room(self, size: int, rows: list[Row]) -> bool:
        """Drop the oldest pending records until ``size`` more bytes fit; False if it never
        can. ``rows`` are this transaction's records not inserted yet (inserted first)."""
        if size > self._max_bytes:
            log.warning("spool: dropping a %d-byte message, larger than max_bytes", size)
            self._dropped += 1
            self._state_dirty = True
            return False
        dropped = 0
        while self._pending_bytes + size > self._max_bytes and self._depth:
            if rows:
                self._db.executemany(_INSERT, rows)
                rows.clear()
            self._pending_bytes -= self._oldest_size()
            self._head_sizes.popleft()
            self._head_sizes_at += 1
            self._head += 1
            self._depth -= 1
            dropped += 1
        if dropped:
            if self._dropped == 0 or log.isEnabledFor(logging.DEBUG):
                log.warning("spool %s is full: dropping the oldest messages", self._dir)
            self._dropped += dropped
            self._state_dirty = True
        return True

    def _oldest_size(self) -> int:
        if self._head_sizes_at != self._head or not self._head_sizes:
            cur = self._db.execute(
                "SELECT size FROM records WHERE idx >= ? ORDER BY idx LIMIT ?",
                (self._head, _HEAD_CHUNK),
            )
            self._head_sizes = deque(size for (size,) in cur.fetchall())
            self._head_sizes_at = self._head
        return self._head_sizes[0]

    def prepend(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Put records back in FRONT of the pending ones, in the given order, durably.

        When they do not all fit, the oldest of them are dropped (and counted); pending
        records are never dropped for them (as with the segment spool).
        """
        records = [checked(t, p, q) for t, p, q in items]
        if not records:
            return
        with self._lock:
            self._check_open()
            saved = self._counters()
            free = self._max_bytes - self._pending_bytes
            keep: list[tuple[str, bytes, int, int]] = []
            for rec in reversed(records):
                if rec[3] > free:
                    break
                keep.append(rec)
                free -= rec[3]
            keep.reverse()
            lost = len(records) - len(keep)
            if lost:
                log.warning(
                    "spool %s is full: dropping %d unacknowledged messages", self._dir, lost
                )
                self._dropped += lost
            first = self._head - len(keep)
            self._head_sizes.clear()  # cached sizes of acknowledged indexes reused below
            try:
                self._db.execute("BEGIN")
                # Acknowledged rows below the head would collide with the new indexes.
                self._db.execute("DELETE FROM records WHERE idx < ?", (self._head,))
                self._db.executemany(
                    _INSERT, [(first + i, t, p, q, s) for i, (t, p, q, s) in enumerate(keep)]
                )
                self._db.execute("UPDATE meta SET head = ?, dropped = ?", (first, self._dropped))
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                self._undo(saved)
                raise self._write_error(err) from err
            self._head = first
            self._depth += len(keep)
            self._pending_bytes += sum(rec[3] for rec in keep)
            self._data_dirty = True
        self.sync()

    # --- reading and acknowledging --------------------------------------------------------

    def peek(self, n: int, *, skip: int = 0) -> list[SpoolRecord]:
        """Up to ``n`` pending records after the first ``skip`` ones, oldest first."""
        with self._lock:
            self._check_open()
            limit = min(n, self._depth - skip)
            if limit <= 0:
                return []
            rows = self._db.execute(
                "SELECT idx, topic, payload, qos FROM records WHERE idx >= ? ORDER BY idx LIMIT ?",
                (self._head + skip, limit),
            ).fetchall()
        return [SpoolRecord(topic=t, payload=p, qos=q, index=i) for i, t, p, q in rows]

    def ack(self, n: int) -> None:
        """Remove the first ``n`` pending records (they were delivered)."""
        with self._lock:
            self._check_open()
            if not 0 <= n <= self._depth:
                raise ValueError(f"cannot ack {n} records, {self._depth} pending")
            self._consume(n)

    def ack_through(self, index: int) -> int:
        """Remove every pending record with ``index`` <= the given one; returns how many."""
        with self._lock:
            self._check_open()
            n = min(self._depth, index - self._head + 1)
            if n <= 0:
                return 0
            self._consume(n)
            return n

    def _consume(self, n: int) -> None:
        if n == self._depth:
            gone = self._pending_bytes
        else:
            try:
                (gone,) = self._db.execute(
                    "SELECT coalesce(sum(size), 0) FROM records WHERE idx >= ? AND idx < ?",
                    (self._head, self._head + n),
                ).fetchone()
            except sqlite3.Error as err:
                raise SpoolError(f"cannot read the spool database in {self._dir}: {err}") from err
        self._pending_bytes -= gone
        self._head += n
        self._depth -= n
        self._state_dirty = True

    # --- durability -----------------------------------------------------------------------

    def sync(self, *, force_state: bool = False) -> None:
        """Make every append, ack and drop so far durable (commit the head, checkpoint)."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                write_state = self._state_dirty or force_state
                checkpoint = self._data_dirty or write_state
                try:
                    if write_state:
                        self._db.execute("BEGIN")
                        self._db.execute("DELETE FROM records WHERE idx < ?", (self._head,))
                        self._db.execute(
                            "UPDATE meta SET head = ?, dropped = ?", (self._head, self._dropped)
                        )
                        self._db.execute("COMMIT")
                        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
                        if self._depth == 0 and free > _VACUUM_FREE_PAGES:
                            self._db.execute("VACUUM")  # cheap now: there is nothing to copy
                except sqlite3.Error as err:
                    self._rollback()
                    raise SpoolError(f"cannot sync the spool in {self._dir}: {err}") from err
                self._data_dirty = self._state_dirty = False
                self._last_sync = self._clock()
            if not checkpoint:
                return
            try:
                # Fsyncs the WAL, copies it into the database and fsyncs that; concurrent
                # appends go on (they only add frames after the ones checkpointed here).
                busy, _, _ = self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as err:
                busy = 1
                log.warning("spool %s: checkpoint failed: %s", self._dir, err)
            if busy:
                with self._lock:
                    self._data_dirty = True  # the next sync_if_due tries again
                raise SpoolError(f"cannot sync the spool in {self._dir}: checkpoint blocked")

    def sync_if_due(self) -> bool:
        """:meth:`sync` if something changed and ``sync_interval_s`` passed since the last one."""
        with self._lock:
            due = (
                (self._data_dirty or self._state_dirty)
                and self._clock() - self._last_sync >= self._sync_interval_s
                and not self._closed
            )
        if due:
            self.sync()
        return due

    def close(self) -> None:
        """Sync and close the database (which then checkpoints and removes its WAL)."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            with self._sync_lock, self._lock:
                self._closed = True
                self._ckpt.close()
                self._db.close()

    # --- helpers --------------------------------------------------------------------------

    def _write_error(self, err: sqlite3.Error) -> SpoolError:
        return SpoolError(
            f"cannot write to the spool database in {self._dir}: {err}; check its free space"
        )

    def _counters(self) -> tuple[int, int, int, int, int]:
        return self._head, self._next_index, self._depth, self._pending_bytes, self._dropped

    def _undo(self, saved: tuple[int, int, int, int, int]) -> None:
        self._rollback()
        self._head, self._next_index, self._depth, self._pending_bytes, self._dropped = saved
        self._head_sizes.clear()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as err:
                log.warning("spool %s: rollback failed: %s", self._dir, err)

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self._dir} is closed")

    def __enter__(self) -> SqliteSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
