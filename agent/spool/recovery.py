"""Reopening a spool folder: ``spool.json`` and what survived the last run.

``spool.json``: ``{"schema": 1, "head_segment", "head_offset", "skip", "dropped"}``, written
atomically: where the first unacknowledged record is (``skip`` lists ``[segment, offset]``
for a later segment with an acknowledged prefix, which only a ``prepend`` creates) and how
many records were dropped. A segment is deleted once every record in it was acknowledged or
dropped, so a segment below ``head_segment`` (or missing) means "consumed".
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.atomic import StateFileError, read_json_state
from agent.spool.records import FIX
from agent.spool.segments import Segment, open_segment, parse_segno

log = logging.getLogger("agent.spool")

STATE_FILE = "spool.json"
STATE_SCHEMA = 1


@dataclass(slots=True)
class Reopened:
    """The pending part of a spool folder, as found when it is opened."""

    segments: deque[Segment] = field(default_factory=deque)
    next_segno: int = 1
    next_index: int = 0
    depth: int = 0
    pending_bytes: int = 0
    dropped: int = 0
    dir_dirty: bool = False
    """Files were removed: the folder needs an fsync."""


def reopen(directory: Path) -> Reopened:
    """Read ``spool.json`` and the segments; remove consumed or headless segment files."""
    out = Reopened()
    state = read_json_state(
        directory / STATE_FILE, schema=STATE_SCHEMA, what="spool state file", fix=FIX
    )
    head_segno: int | None = None
    head_offset = 0
    skips: dict[int, int] = {}
    if state is not None:
        try:
            head_segno = int(state["head_segment"])
            head_offset = int(state["head_offset"])
            out.dropped = int(state["dropped"])
            skips = {int(k): int(v) for k, v in state.get("skip", [])}
        except (KeyError, TypeError, ValueError) as err:
            raise StateFileError(
                f"spool state file {directory / STATE_FILE} is corrupt ({err!r}); {FIX}"
            ) from err
    files = sorted(
        (segno, p) for p in directory.iterdir() if (segno := parse_segno(p.name)) is not None
    )
    out.next_segno = max([*(s + 1 for s, _ in files), (head_segno or 0) + 1])
    for i, (segno, path) in enumerate(files):
        if head_segno is not None and segno < head_segno:
            path.unlink(missing_ok=True)  # fully consumed before the last run ended
            out.dir_dirty = True
            continue
        seg = open_segment(segno, path, first_index=out.next_index, last=i == len(files) - 1)
        if seg is None:
            out.dir_dirty = True
            continue
        out.next_index += len(seg.offsets)
        if segno == head_segno:
            seg.start = bisect.bisect_left(seg.offsets, head_offset)
        elif segno in skips:
            seg.start = bisect.bisect_left(seg.offsets, skips[segno])
        if seg.pending == 0:
            path.unlink(missing_ok=True)
            out.dir_dirty = True
            continue
        out.segments.append(seg)
        out.depth += seg.pending
        out.pending_bytes += sum(seg.size_of(j) for j in range(seg.start, len(seg.offsets)))
    if out.depth:
        log.info(
            "spool %s: %d messages (%d bytes) waiting from a previous run",
            directory,
            out.depth,
            out.pending_bytes,
        )
    return out


def state_of(segments: Iterable[Segment], *, next_segno: int, dropped: int) -> dict[str, object]:
    """The content of ``spool.json`` for these pending segments (oldest first)."""
    segs = list(segments)
    if segs:
        head = segs[0]
        return {
            "head_segment": head.segno,
            "head_offset": head.offsets[head.start],
            # After a prepend the old head segment keeps its acknowledged prefix.
            "skip": [[seg.segno, seg.offsets[seg.start]] for seg in segs[1:] if seg.start > 0],
            "dropped": dropped,
        }
    # Empty: every segment numbered below the next one is consumed.
    return {"head_segment": next_segno, "head_offset": 0, "skip": [], "dropped": dropped}
