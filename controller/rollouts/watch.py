"""Which executions a rollout tick re-derives.

Each tick re-derives the executions in flight (queued, in progress) from what their
devices report, and every ``SUCCEEDED_EVERY_S`` (engine) the succeeded ones too. Reading
every in-flight execution with its reported state and gate evidence on every tick cost
most of a tick with thousands in flight (10,000: 487 ms, bench.rollout --scale), while
most of them had not changed since the tick before.

So the engine remembers the ``Version`` each in-flight execution was derived at. A tick
first reads only the versions (one narrow query, no JSON), then re-derives just the
executions whose version moved, plus those whose timeout has come: the derived status
depends on nothing else (the reported state counts in ``devices.state_seq``, the execution
row's own changes in its status, rev, assignment and update time; the clock only through
the timeout). Derivation is a fixed point (deriving again from the same inputs changes
nothing), so an unchanged execution is left as it is. A count, not a time: no clock skew
between replicas or commit order can hide a change. Nothing is remembered across
processes: a new leader, or a rollout it has not looked at yet, is read whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

from controller.rollouts import executions
from controller.rollouts.executions import Execution, Version
from controller.rollouts.faults import DeviceFault
from controller.rollouts.records import IN_FLIGHT_WATCHED, WATCHED, RolloutInfo

Pair = tuple[str, str]


class WatchedVersions:
    """The versions the in-flight executions of each rollout were last derived at."""

    def __init__(self) -> None:
        self._seen: dict[int, dict[Pair, Version]] = {}

    def read(
        self,
        conn: Connection,
        r: RolloutInfo,
        now: float,
        faults: list[tuple[str, str, DeviceFault]],
        *,
        everything: bool,
    ) -> list[Execution]:
        """The executions this tick re-derives: every watched one (``everything``, or
        nothing remembered for ``r``), else the in-flight ones that changed or timed out."""
        seen = self._seen.get(r.id)
        if everything or seen is None:
            statuses = WATCHED if everything else IN_FLIGHT_WATCHED
            self._seen[r.id] = {}
            return executions.executions_to_watch(conn, r.id, faults, statuses=statuses)
        current = executions.in_flight_versions(conn, r.id)
        due = {
            pair[0]
            for pair, v in current.items()
            if seen.get(pair) != v or _timed_out(v, now, r.timeout_s)
        }
        # Executions that did not change keep their version; the re-derived ones get theirs
        # in ``derived`` (as read, or as the tick writes them).
        self._seen[r.id] = {p: v for p, v in current.items() if p[0] not in due}
        return executions.executions_to_watch(
            conn, r.id, faults, statuses=IN_FLIGHT_WATCHED, devices_only=sorted(due)
        )

    def derived(self, rollout_id: int, e: Execution, written: dict[str, Any] | None) -> None:
        """``e`` was re-derived; ``written``: the change the tick writes for it (None: none)."""
        seen = self._seen.setdefault(rollout_id, {})
        version = e.version
        if written is not None:
            version = (e.state_seq, written["status"], e.rev, e.assigned_at, written["now"])
        if version[1] in IN_FLIGHT_WATCHED:
            seen[(e.device_id, e.stream)] = version

    def keep_only(self, rollout_ids: Iterable[int]) -> None:
        """Forget the rollouts not in ``rollout_ids`` (ended, or not ticked here)."""
        keep = set(rollout_ids)
        for rid in [r for r in self._seen if r not in keep]:
            del self._seen[rid]


def _timed_out(v: Version, now: float, timeout_s: float) -> bool:
    assigned_at = v[3]
    return assigned_at is None or now - assigned_at >= timeout_s
