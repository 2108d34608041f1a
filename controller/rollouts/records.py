"""Rollouts: their states and result types, the rollouts table and progress counts.

Like the ``controller.fleet`` repositories: functions take a ``Connection`` (the caller owns
the transaction), statements are Core and portable between SQLite and PostgreSQL, results
are frozen dataclasses. ``executions`` holds the (device, stream) executions of a rollout,
``desired`` the per-device desired states and ``locks`` how writers are serialised.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, and_, func, insert, or_, select, update

from controller.db.models import rollout_devices, rollouts
from controller.db.sql import from_row

RolloutState = Literal["active", "paused", "completed", "aborted", "rolled_back"]
LIVE_STATES: tuple[str, ...] = ("active", "paused")
"""States that hold their (device, stream) pairs: no other rollout may take them."""
ENDED_STATES: tuple[str, ...] = ("completed", "aborted", "rolled_back")

DeviceStatus = Literal[
    "pending", "queued", "in_progress", "succeeded", "failed", "timed_out", "rolled_back"
]
DEVICE_STATUSES: tuple[str, ...] = (
    "pending",
    "queued",
    "in_progress",
    "succeeded",
    "failed",
    "timed_out",
    "rolled_back",
)
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "timed_out"})
"""Executed: the device is done with the rollout's model, one way or the other."""
FAILURES: frozenset[str] = frozenset({"failed", "timed_out"})
"""The one definition of a failed execution (docs/controller.md, "Failed executions"):
counted statuses (``counted_status``) in this set are failures for the failure budget and
the abort criteria, the API's ``failures``, the CLI's FAILED columns and summary line and
the metrics. Being rolled back afterwards is a detail of a failure, not another outcome."""
TIMEOUT_REASON = "timeout: "
"""How the reason of a timed-out execution starts (``decisions.next_status``)."""


def counted_status(status: str, reason: str | None) -> str:
    """The status an execution counts under in every count: its stored status, except that
    a ``rolled_back`` one that had failed or timed out first (its failure reason stays,
    ``executions.mark_rolled_back``) still counts as ``failed`` or ``timed_out``. Only
    executions rolled back without a failure (succeeded, or still deploying when the
    rollout ended) count as ``rolled_back``."""
    if status == "rolled_back" and reason:
        return "timed_out" if reason.startswith(TIMEOUT_REASON) else "failed"
    return status


def failures(counts: Mapping[str, int]) -> int:
    """Failed executions among counted statuses (``FAILURES``)."""
    return sum(counts.get(s, 0) for s in FAILURES)


WATCHED: tuple[str, ...] = ("queued", "in_progress", "succeeded")
"""Statuses re-derived from the reported state (failed/timed_out are final): those in flight
on every tick, succeeded ones every ``watch.SUCCEEDED_EVERY_S``."""
IN_FLIGHT_WATCHED: tuple[str, ...] = ("queued", "in_progress")
"""The watched statuses of executions in flight (a tick that leaves the succeeded ones be)."""

# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RolloutInfo:
    id: int
    model_id: int
    model: str
    stream: str
    selector: list[str]
    stage_spec: str
    stages: list[int]
    device_count: int
    bake_s: float
    max_failures: float
    min_executed: int
    timeout_s: float
    state: str
    current_stage: int
    stage_started_at: float | None
    stage_done_at: float | None
    reason: str | None
    detail: str | None
    created_by: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    rolled_back_at: float | None
    gate: dict[str, Any] | None = None
    """Health-gate overrides written into every ``ModelRef`` (compact; None: the defaults)."""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True, slots=True)
class RolloutDeviceInfo:
    device_id: str
    stream: str
    stage: int
    status: str
    phase: str | None
    reason: str | None
    previous_model: str | None
    rev: int | None
    rollback_rev: int | None
    assigned_at: float | None
    finished_at: float | None
    evidence: dict[str, Any] | None = None
    """The health gate's evidence (``protocol.GateEvidence``) the device reported for the
    rollout's model."""


@dataclass(frozen=True, slots=True)
class StageProgress:
    index: int
    """0-based."""
    devices: int
    """Cumulative device count at the end of this stage."""
    size: int
    """(device, stream) executions in this stage."""
    state: str
    """pending, running, baking, done (or stopped once the rollout ended early)."""
    counts: dict[str, int]
    started_at: float | None
    done_at: float | None
    bake_left_s: float | None


@dataclass(frozen=True, slots=True)
class RolloutDetail:
    rollout: RolloutInfo
    counts: dict[str, int]
    stages: list[StageProgress]
    devices: list[RolloutDeviceInfo]


def _rollout(row: Any) -> RolloutInfo:
    return from_row(
        RolloutInfo,
        row,
        selector=list(row.selector or []),
        stages=[int(n) for n in row.stages or []],
        gate=dict(row.gate) if row.gate else None,
    )


# --- rollouts --------------------------------------------------------------------------


def get_rollout(conn: Connection, rollout_id: int) -> RolloutInfo | None:
    row = conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()
    return None if row is None else _rollout(row)


def insert_rollout(conn: Connection, values: Mapping[str, Any]) -> int:
    result = conn.execute(insert(rollouts).values(**values).returning(rollouts.c.id))
    return int(result.scalar_one())


def update_rollout(conn: Connection, rollout_id: int, **values: Any) -> None:
    conn.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(**values))


def list_rollouts(
    conn: Connection, *, states: Sequence[str] = (), limit: int | None = 100
) -> list[RolloutInfo]:
    """Newest first; ``limit=None``: all of them."""
    query = select(rollouts).order_by(rollouts.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    if states:
        query = query.where(rollouts.c.state.in_(list(states)))
    return [_rollout(r) for r in conn.execute(query)]


def state_counts(conn: Connection) -> dict[str, int]:
    """Rollout state → rollouts in it (states no rollout is in are absent)."""
    query = select(rollouts.c.state, func.count()).group_by(rollouts.c.state)
    return {str(state): int(n) for state, n in conn.execute(query)}


def rollouts_to_tick(conn: Connection) -> list[int]:
    """Live rollouts, and ended ones whose rollback has not been written yet; oldest first."""
    query = (
        select(rollouts.c.id)
        .where(
            or_(
                rollouts.c.state.in_(LIVE_STATES),
                and_(
                    rollouts.c.state.in_(("aborted", "rolled_back")),
                    rollouts.c.rolled_back_at.is_(None),
                ),
            )
        )
        .order_by(rollouts.c.id)
    )
    return [int(i) for i in conn.execute(query).scalars()]


def _counted(conn: Connection, key: Any, where: Any) -> dict[int, dict[str, int]]:
    """``key`` value → counted status (``counted_status``) → executions, for the rows
    ``where`` selects: grouped in SQL, rolled-back rows one by one (their reason decides)."""
    out: dict[int, dict[str, int]] = defaultdict(dict)
    rd = rollout_devices
    grouped = (
        select(key, rd.c.status, func.count())
        .where(where, rd.c.status != "rolled_back")
        .group_by(key, rd.c.status)
    )
    rows: list[tuple[Any, str, int]] = [(k, str(s), int(n)) for k, s, n in conn.execute(grouped)]
    rolled_back = select(key, rd.c.status, rd.c.reason).where(where, rd.c.status == "rolled_back")
    rows += [(k, counted_status(str(s), why), 1) for k, s, why in conn.execute(rolled_back)]
    for k, status, n in rows:
        c = out[int(k)]
        c[status] = c.get(status, 0) + n
    return out


def status_counts(conn: Connection, rollout_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Rollout id → counted status (``counted_status``) → executions."""
    out: dict[int, dict[str, int]] = {i: {} for i in rollout_ids}
    if rollout_ids:
        where = rollout_devices.c.rollout_id.in_(list(rollout_ids))
        out.update(_counted(conn, rollout_devices.c.rollout_id, where))
    return out


def stage_counts(conn: Connection, rollout_id: int) -> dict[int, dict[str, int]]:
    """Stage → counted status (``counted_status``) → executions."""
    where = rollout_devices.c.rollout_id == rollout_id
    return dict(_counted(conn, rollout_devices.c.stage, where))


def stage_times(conn: Connection, rollout_id: int) -> dict[int, tuple[float | None, float | None]]:
    """Stage → (first assignment, last finish)."""
    query = (
        select(
            rollout_devices.c.stage,
            func.min(rollout_devices.c.assigned_at),
            func.max(rollout_devices.c.finished_at),
        )
        .where(rollout_devices.c.rollout_id == rollout_id)
        .group_by(rollout_devices.c.stage)
    )
    return {int(s): (a, f) for s, a, f in conn.execute(query)}
