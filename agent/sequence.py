"""The device's detection sequence number: monotonic across restarts, one fsync per block.

Consumers use ``seq`` to detect gaps and drop duplicates, so a number must never be handed out
twice, not even after ``kill -9`` or a power loss. An fsync per detection would be too slow, so
the counter leases blocks: before it hands out the first number of a block it durably records
"numbers below N may have been used" (``lease_end``). After a crash the next process starts at
the recorded ``lease_end``: the unused rest of the old block becomes a gap (allowed), never a
repeat or a step back.
"""

from __future__ import annotations

import threading
from pathlib import Path

from agent.atomic import StateFileError, atomic_write_json, read_json_state

SCHEMA = 1
FIRST_SEQ = 1

_FIX = (
    "restore it from a backup, or write "
    '{"schema": 1, "lease_end": N} with N above the highest seq your consumers have seen; '
    "delete it only if every consumer accepts seq restarting at 1 (otherwise they drop the "
    "new detections as duplicates of old ones)"
)


class SequenceCounter:
    """Thread-safe ``next()`` → 1, 2, 3, …, persisted as a lease in ``path`` every ``block`` numbers."""

    def __init__(self, path: Path, *, block: int = 1000) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self._path = Path(path)
        self._block = block
        self._lock = threading.Lock()
        state = read_json_state(
            self._path, schema=SCHEMA, what="detection sequence state file", fix=_FIX
        )
        if state is None:
            start = FIRST_SEQ
        else:
            lease_end = state.get("lease_end")
            if not isinstance(lease_end, int) or isinstance(lease_end, bool) or lease_end < 0:
                raise StateFileError(
                    f"detection sequence state file {self._path} is corrupt "
                    f"(lease_end={lease_end!r} is not a non-negative integer); {_FIX}"
                )
            start = max(lease_end, FIRST_SEQ)
        self._next = start
        self._lease_end = start  # nothing leased yet: the first next() persists a block

    @property
    def path(self) -> Path:
        return self._path

    def next(self) -> int:
        """The next sequence number; persists a new lease first when the current one is used up."""
        with self._lock:
            if self._next >= self._lease_end:
                lease_end = self._next + self._block
                atomic_write_json(self._path, schema=SCHEMA, data={"lease_end": lease_end})
                self._lease_end = lease_end
            value = self._next
            self._next += 1
            return value

    def close(self) -> None:
        """Record the exact next number (clean shutdown): the next start continues without a gap.

        Numbers handed out after ``close()`` still lease a new block first, so a late caller
        can never make the next process repeat a number.
        """
        with self._lock:
            if self._next < self._lease_end:
                atomic_write_json(self._path, schema=SCHEMA, data={"lease_end": self._next})
                self._lease_end = self._next

    def peek(self) -> int:
        """The number the next call to :meth:`next` returns (for tests and diagnostics)."""
        with self._lock:
            return self._next
