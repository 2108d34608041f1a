"""Which executions a rollout tick re-derives.

Each tick re-derives the executions in flight (queued, in progress) from what their
devices report, and every ``SUCCEEDED_EVERY_S`` the succeeded ones too. Reading
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

SUCCEEDED_EVERY_S = 10.0
"""Succeeded executions are re-derived at least this often (and on every tick that could
end a stage's bake); the ones in flight on every tick. Only a failure can follow a success
(the device reports the model failed or rolled back later), and with thousands of devices
done re-deriving them all every tick was most of a tick's work."""


class WatchedVersions:
    """What this process derived of each rollout: when it last re-derived every watched
    execution, and the versions the in-flight ones were derived at since."""

    def __init__(self) -> None:
        self._seen: dict[int, dict[Pair, Version]] = {}
        self._everything_at: dict[int, float] = {}

    def read(
        self,
        conn: Connection,
        r: RolloutInfo,
        now: float,
        faults: list[tuple[str, str, DeviceFault]],
    ) -> list[Execution]:
        """The executions this tick re-derives: every watched one, succeeded included, when
        that is due (``_everything_due``); else the in-flight ones that changed or timed out."""
        seen = self._seen.get(r.id)
        if seen is None or self._everything_due(r, now):
            self._everything_at[r.id] = now
            self._seen[r.id] = {}
            return executions.executions_to_watch(conn, r.id, faults, statuses=WATCHED)
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
            conn, r.id, faults, statuses=IN_FLIGHT_WATCHED, devices_only=due
        )

    def _everything_due(self, r: RolloutInfo, now: float) -> bool:
        """Every ``SUCCEEDED_EVERY_S``, and on any tick that may advance or complete the
        rollout (the current stage's bake is over, or there is none), so no decision counts
        a success the device has since taken back."""
        last = self._everything_at.get(r.id)
        bake_over = r.stage_done_at is not None and now >= r.stage_done_at + r.bake_s
        return (
            last is None or not now - SUCCEEDED_EVERY_S < last <= now or bake_over or r.bake_s <= 0
        )

    def look_at_everything_next(self) -> None:
        """The next tick of every rollout re-derives every watched execution (benchmarks:
        as if the last such look were ``SUCCEEDED_EVERY_S`` ago)."""
        self._everything_at.clear()

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
            self._everything_at.pop(rid, None)


def _timed_out(v: Version, now: float, timeout_s: float) -> bool:
    assigned_at = v[3]
    return assigned_at is None or now - assigned_at >= timeout_s
