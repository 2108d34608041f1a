"""Database access of rollouts, their (device, stream) executions and per-device desired state.

Like ``controller.store``: functions take a ``Connection`` (the caller owns the transaction),
statements are Core and portable between SQLite and PostgreSQL, results are frozen
dataclasses.

Serialising writers: ``lock_rollout`` starts a transaction with a no-op UPDATE of the
rollout's row. On PostgreSQL that is a row lock (like SELECT ... FOR UPDATE); on SQLite it
takes the database write lock at once (pysqlite begins the transaction at the first write,
so a transaction that read first could otherwise write over a change committed meanwhile).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, text, update

from controller.db.models import (
    device_desired,
    device_streams,
    device_tags,
    devices,
    rollout_devices,
    rollouts,
    telemetry,
)
from controller.store import _upsert

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
WATCHED: tuple[str, ...] = ("queued", "in_progress", "succeeded")
"""Statuses re-derived from the reported state on every tick (failed/timed_out are final)."""

_PG_LOCK_NAMESPACE = 0x6566_7230
"""First key of the PostgreSQL advisory locks of rollouts ("efr0"); the second is a hash of
the database and schema, so separate installations in one database do not block each other."""
PG_CREATE_LOCK = 1
PG_ENGINE_LOCK = 2


def pg_lock_sql(function: str, which: int) -> Any:
    """``SELECT pg_..._lock(ns, hash)`` for one of the rollout locks of this schema."""
    return text(
        f"SELECT {function}(CAST(:ns AS integer), "
        "hashtext(current_database() || '.' || current_schema() || '.' || :which))"
    ).bindparams(ns=_PG_LOCK_NAMESPACE, which=str(which))


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


@dataclass(frozen=True, slots=True)
class DesiredRow:
    device_id: str
    rev: int
    models: dict[str, Any]
    rollout_id: int | None
    published: bool
    updated_at: float
    published_at: float | None


def _rollout(row: Any) -> RolloutInfo:
    return RolloutInfo(
        id=row.id,
        model_id=row.model_id,
        model=row.model,
        stream=row.stream,
        selector=list(row.selector or []),
        stage_spec=row.stage_spec,
        stages=[int(n) for n in row.stages or []],
        device_count=row.device_count,
        bake_s=row.bake_s,
        max_failures=row.max_failures,
        min_executed=row.min_executed,
        timeout_s=row.timeout_s,
        state=row.state,
        current_stage=row.current_stage,
        stage_started_at=row.stage_started_at,
        stage_done_at=row.stage_done_at,
        reason=row.reason,
        detail=row.detail,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        rolled_back_at=row.rolled_back_at,
        gate=dict(row.gate) if row.gate else None,
    )


def _device(row: Any) -> RolloutDeviceInfo:
    return RolloutDeviceInfo(
        device_id=row.device_id,
        stream=row.stream,
        stage=row.stage,
        status=row.status,
        phase=row.phase,
        reason=row.reason,
        previous_model=row.previous_model,
        rev=row.rev,
        rollback_rev=row.rollback_rev,
        assigned_at=row.assigned_at,
        finished_at=row.finished_at,
        evidence=dict(row.evidence) if row.evidence else None,
    )


# --- rollouts --------------------------------------------------------------------------


def lock_rollout(conn: Connection, rollout_id: int) -> bool:
    """Serialise with every other writer of this rollout (see the module doc); False: no such rollout."""
    result = conn.execute(
        update(rollouts).where(rollouts.c.id == rollout_id).values(updated_at=rollouts.c.updated_at)
    )
    return bool(result.rowcount)


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


def status_counts(conn: Connection, rollout_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Rollout id → status → executions."""
    out: dict[int, dict[str, int]] = {i: {} for i in rollout_ids}
    if not rollout_ids:
        return out
    query = (
        select(rollout_devices.c.rollout_id, rollout_devices.c.status, func.count())
        .where(rollout_devices.c.rollout_id.in_(list(rollout_ids)))
        .group_by(rollout_devices.c.rollout_id, rollout_devices.c.status)
    )
    for rid, status, n in conn.execute(query):
        out[int(rid)][str(status)] = int(n)
    return out


def stage_counts(conn: Connection, rollout_id: int) -> dict[int, dict[str, int]]:
    """Stage → status → executions."""
    out: dict[int, dict[str, int]] = defaultdict(dict)
    query = (
        select(rollout_devices.c.stage, rollout_devices.c.status, func.count())
        .where(rollout_devices.c.rollout_id == rollout_id)
        .group_by(rollout_devices.c.stage, rollout_devices.c.status)
    )
    for stage, status, n in conn.execute(query):
        out[int(stage)][str(status)] = int(n)
    return dict(out)


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


def list_rollout_devices(
    conn: Connection, rollout_id: int, *, statuses: Sequence[str] = ()
) -> list[RolloutDeviceInfo]:
    query = (
        select(rollout_devices)
        .where(rollout_devices.c.rollout_id == rollout_id)
        .order_by(rollout_devices.c.stage, rollout_devices.c.device_id, rollout_devices.c.stream)
    )
    if statuses:
        query = query.where(rollout_devices.c.status.in_(list(statuses)))
    return [_device(r) for r in conn.execute(query)]


def insert_rollout_devices(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        conn.execute(insert(rollout_devices), list(rows))


def live_pairs(
    conn: Connection, device_ids: Iterable[str], *, exclude: int | None = None
) -> dict[tuple[str, str], int]:
    """(device, stream) → id of the live rollout holding it, for these devices."""
    ids = sorted(set(device_ids))
    out: dict[tuple[str, str], int] = {}
    for chunk in _chunks(ids):
        query = (
            select(rollout_devices.c.device_id, rollout_devices.c.stream, rollouts.c.id)
            .join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id)
            .where(rollouts.c.state.in_(LIVE_STATES), rollout_devices.c.device_id.in_(chunk))
        )
        if exclude is not None:
            query = query.where(rollouts.c.id != exclude)
        for device_id, stream, rid in conn.execute(query):
            out[(device_id, stream)] = int(rid)
    return out


def _pair_update(**columns: str) -> Any:
    """UPDATE one (rollout, device, stream) row: column name → key of the row dicts given."""
    return (
        update(rollout_devices)
        .where(
            rollout_devices.c.rollout_id == bindparam("b_rollout"),
            rollout_devices.c.device_id == bindparam("b_device"),
            rollout_devices.c.stream == bindparam("b_stream"),
        )
        .values({column: bindparam(f"b_{key}") for column, key in columns.items()})
    )


def _update_pairs(
    conn: Connection, statement: Any, rollout_id: int, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Run a ``_pair_update`` statement for ``rows`` (dicts with device_id, stream and its keys)."""
    if rows:
        conn.execute(
            statement,
            [
                {
                    "b_rollout": rollout_id,
                    "b_device": r["device_id"],
                    "b_stream": r["stream"],
                    **{f"b_{k}": v for k, v in r.items() if k not in ("device_id", "stream")},
                }
                for r in rows
            ],
        )


_ROW_UPDATE = _pair_update(
    status="status",
    phase="phase",
    reason="reason",
    evidence="evidence",
    finished_at="finished_at",
    updated_at="now",
)
_ASSIGN = _pair_update(
    status="queued_status",
    rev="rev",
    previous_model="previous_model",
    previous_ref="previous_ref",
    stale_outcome="stale_outcome",
    assigned_at="now",
    updated_at="now",
)
_ROLLBACK = _pair_update(status="status", rollback_rev="rev", updated_at="now")
_NOTE = _pair_update(reason="reason", updated_at="now")


def update_executions(
    conn: Connection, rollout_id: int, changes: Sequence[Mapping[str, Any]]
) -> None:
    """Write derived statuses: dicts with device_id, stream, status, phase, reason, evidence,
    finished_at, now."""
    _update_pairs(conn, _ROW_UPDATE, rollout_id, changes)


def mark_assigned(conn: Connection, rollout_id: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """dicts with device_id, stream, rev, previous_model, previous_ref, stale_outcome, now."""
    _update_pairs(conn, _ASSIGN, rollout_id, [{**r, "queued_status": "queued"} for r in rows])


def mark_rolled_back(conn: Connection, rollout_id: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """dicts with device_id, stream, status, rev (the rollback rev), now; the reason stays."""
    _update_pairs(conn, _ROLLBACK, rollout_id, rows)


def note_executions(conn: Connection, rollout_id: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Set the reason of executions (dicts with device_id, stream, reason, now)."""
    _update_pairs(conn, _NOTE, rollout_id, rows)


@dataclass(frozen=True, slots=True)
class Execution:
    """An assigned execution joined with what the device reports about the stream."""

    device_id: str
    stream: str
    stage: int
    status: str
    phase: str | None
    reason: str | None
    rev: int
    assigned_at: float
    finished_at: float | None
    reported_rev: int | None
    report_phase: str | None
    report_active: str | None
    report_target: str | None
    report_reason: str | None
    has_report: bool
    stale_outcome: dict[str, Any] | None = None
    """The stream's failure of this model reported before the assignment, if any."""
    report_gate: dict[str, Any] | None = None
    """The health gate's evidence the device reports for ``report_target``."""
    evidence: dict[str, Any] | None = None
    """The evidence kept with the execution so far."""

    def report_is_stale(self) -> bool:
        """The device still shows the failure it reported before it was assigned: the agent
        publishes the new ``desired_rev`` before the stream's phase changes."""
        return self.stale_outcome is not None and self.stale_outcome == {
            "phase": self.report_phase,
            "target": self.report_target,
            "reason": self.report_reason,
        }

    def evidence_for(self, model: str) -> dict[str, Any] | None:
        """The gate evidence to keep: the report's, when it is about ``model`` and this
        assignment (the device took up the rev and does not still show an earlier failure),
        else what was kept before."""
        if (
            self.report_gate is not None
            and self.report_target == model
            and self.reported_rev is not None
            and self.reported_rev >= self.rev
            and not self.report_is_stale()
        ):
            return self.report_gate
        return self.evidence


def executions_to_watch(conn: Connection, rollout_id: int) -> list[Execution]:
    """Assigned executions still watched (queued, in progress, succeeded) with their reports."""
    rd, ds = rollout_devices, device_streams
    query = (
        select(
            rd.c.device_id,
            rd.c.stream,
            rd.c.stage,
            rd.c.status,
            rd.c.phase,
            rd.c.reason,
            rd.c.rev,
            rd.c.assigned_at,
            rd.c.finished_at,
            rd.c.stale_outcome,
            rd.c.evidence,
            devices.c.desired_rev,
            ds.c.phase.label("r_phase"),
            ds.c.active_model,
            ds.c.target,
            ds.c.reason.label("r_reason"),
            ds.c.gate.label("r_gate"),
            ds.c.name.label("r_name"),
        )
        .join(devices, devices.c.id == rd.c.device_id)
        .outerjoin(ds, and_(ds.c.device_id == rd.c.device_id, ds.c.name == rd.c.stream))
        .where(rd.c.rollout_id == rollout_id, rd.c.status.in_(WATCHED))
    )
    return [
        Execution(
            device_id=r.device_id,
            stream=r.stream,
            stage=r.stage,
            status=r.status,
            phase=r.phase,
            reason=r.reason,
            rev=int(r.rev),
            assigned_at=float(r.assigned_at),
            finished_at=r.finished_at,
            reported_rev=r.desired_rev,
            report_phase=r.r_phase,
            report_active=r.active_model,
            report_target=r.target,
            report_reason=r.r_reason,
            has_report=r.r_name is not None,
            stale_outcome=dict(r.stale_outcome) if r.stale_outcome else None,
            report_gate=dict(r.r_gate) if r.r_gate else None,
            evidence=dict(r.evidence) if r.evidence else None,
        )
        for r in conn.execute(query)
    ]


def stream_reports(
    conn: Connection, device_ids: Iterable[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(device, stream) → the reported phase, target and reason."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ds = device_streams
    for chunk in _chunks(sorted(set(device_ids))):
        for d, name, phase, target, reason in conn.execute(
            select(ds.c.device_id, ds.c.name, ds.c.phase, ds.c.target, ds.c.reason).where(
                ds.c.device_id.in_(chunk)
            )
        ):
            out[(d, name)] = {"phase": phase, "target": target, "reason": reason}
    return out


def pending_of_stage(conn: Connection, rollout_id: int, stage: int) -> list[tuple[str, str]]:
    query = (
        select(rollout_devices.c.device_id, rollout_devices.c.stream)
        .where(
            rollout_devices.c.rollout_id == rollout_id,
            rollout_devices.c.stage == stage,
            rollout_devices.c.status == "pending",
        )
        .order_by(rollout_devices.c.device_id, rollout_devices.c.stream)
    )
    return [(d, s) for d, s in conn.execute(query)]


def to_roll_back(conn: Connection, rollout_id: int) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Executions whose desired state was written and not yet restored: (device, stream, previous ref)."""
    query = (
        select(
            rollout_devices.c.device_id, rollout_devices.c.stream, rollout_devices.c.previous_ref
        )
        .where(
            rollout_devices.c.rollout_id == rollout_id,
            rollout_devices.c.rev.is_not(None),
            rollout_devices.c.rollback_rev.is_(None),
            rollout_devices.c.status != "rolled_back",
        )
        .order_by(rollout_devices.c.device_id, rollout_devices.c.stream)
    )
    return [(d, s, dict(p) if p else None) for d, s, p in conn.execute(query)]


def succeeded_and_pending(
    conn: Connection, rollout_id: int, stream_limit: int
) -> tuple[list[tuple[str, str, float, float]], list[tuple[str, str]]]:
    """Updated executions (device, stream, assigned_at, finished_at) and up to
    ``stream_limit`` not yet assigned ones (device, stream), by device id."""
    rd = rollout_devices
    done = [
        (d, s, float(a or 0), float(f or a or 0))
        for d, s, a, f in conn.execute(
            select(rd.c.device_id, rd.c.stream, rd.c.assigned_at, rd.c.finished_at)
            .where(rd.c.rollout_id == rollout_id, rd.c.status == "succeeded")
            .order_by(rd.c.device_id)
        )
    ]
    pending = [
        (d, s)
        for d, s in conn.execute(
            select(rd.c.device_id, rd.c.stream)
            .where(rd.c.rollout_id == rollout_id, rd.c.status == "pending")
            .order_by(rd.c.device_id)
            .limit(stream_limit)
        )
    ]
    return done, pending


def recent_telemetry(
    conn: Connection, device_ids: Iterable[str], *, since: float, until: float | None = None
) -> dict[str, list[tuple[float, list[dict[str, Any]]]]]:
    """Raw telemetry (ts, streams) of these devices in ``[since, until)``, oldest first."""
    out: dict[str, list[tuple[float, list[dict[str, Any]]]]] = defaultdict(list)
    for chunk in _chunks(sorted(set(device_ids))):
        query = (
            select(telemetry.c.device_id, telemetry.c.ts, telemetry.c.streams)
            .where(
                telemetry.c.device_id.in_(chunk),
                telemetry.c.resolution_s == 0,
                telemetry.c.ts >= since,
            )
            .order_by(telemetry.c.device_id, telemetry.c.ts)
        )
        if until is not None:
            query = query.where(telemetry.c.ts < until)
        for device_id, ts, streams in conn.execute(query):
            out[device_id].append((float(ts), list(streams or [])))
    return out


# --- device selection ---------------------------------------------------------------------


def select_devices(
    conn: Connection, *, everything: bool, tags: Sequence[str], ids: Sequence[str]
) -> dict[str, list[str]]:
    """Selected device id → its reported stream names (sorted), ordered by device id."""
    query = select(devices.c.id)
    if not everything:
        conds = []
        if ids:
            conds.append(devices.c.id.in_(list(ids)))
        if tags:
            conds.append(
                devices.c.id.in_(
                    select(device_tags.c.device_id).where(device_tags.c.tag.in_(list(tags)))
                )
            )
        if not conds:
            return {}
        query = query.where(or_(*conds))
    found = [str(i) for i in conn.execute(query.order_by(devices.c.id)).scalars()]
    streams: dict[str, list[str]] = {d: [] for d in found}
    for chunk in _chunks(found):
        for device_id, name in conn.execute(
            select(device_streams.c.device_id, device_streams.c.name)
            .where(device_streams.c.device_id.in_(chunk))
            .order_by(device_streams.c.device_id, device_streams.c.name)
        ):
            streams[device_id].append(name)
    return streams


# --- desired state ---------------------------------------------------------------------


def _desired(row: Any) -> DesiredRow:
    return DesiredRow(
        device_id=row.device_id,
        rev=int(row.rev),
        models=dict(row.models or {}),
        rollout_id=row.rollout_id,
        published=bool(row.published),
        updated_at=row.updated_at,
        published_at=row.published_at,
    )


def get_desired(conn: Connection, device_ids: Iterable[str]) -> dict[str, DesiredRow]:
    out: dict[str, DesiredRow] = {}
    for chunk in _chunks(sorted(set(device_ids))):
        for row in conn.execute(
            select(device_desired).where(device_desired.c.device_id.in_(chunk))
        ):
            out[row.device_id] = _desired(row)
    return out


def write_desired(
    conn: Connection,
    changes: Mapping[str, Mapping[str, dict[str, Any] | None]],
    *,
    rollout_id: int | None,
    now: float,
) -> dict[str, int]:
    """Apply per-device stream changes (a ModelRef dict, or None = back to the baseline) to
    the desired states, each device's ``rev`` one above both its last desired rev and the
    rev it last reported; returns device → new rev. The rows are left unpublished."""
    if not changes:
        return {}
    ids = sorted(changes)
    current = get_desired(conn, ids)
    reported: dict[str, int | None] = {}
    for chunk in _chunks(ids):
        for device_id, rev in conn.execute(
            select(devices.c.id, devices.c.desired_rev).where(devices.c.id.in_(chunk))
        ):
            reported[device_id] = rev
    rows = []
    revs: dict[str, int] = {}
    for device_id in ids:
        old = current.get(device_id)
        models = dict(old.models) if old else {}
        for stream, ref in changes[device_id].items():
            if ref is None:
                models.pop(stream, None)
            else:
                models[stream] = dict(ref)
        rev = max(old.rev if old else 0, reported.get(device_id) or 0) + 1
        revs[device_id] = rev
        rows.append(
            {
                "device_id": device_id,
                "rev": rev,
                "models": models,
                "rollout_id": rollout_id,
                "published": False,
                "updated_at": now,
                "published_at": None,
            }
        )
    stmt = _upsert(conn, device_desired)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id"],
            set_={
                c: getattr(stmt.excluded, c)
                for c in ("rev", "models", "rollout_id", "published", "updated_at", "published_at")
            },
        ),
        rows,
    )
    return revs


def unpublished_desired(conn: Connection, *, limit: int = 1000) -> list[DesiredRow]:
    query = (
        select(device_desired)
        .where(device_desired.c.published.is_(False))
        .order_by(device_desired.c.updated_at, device_desired.c.device_id)
        .limit(limit)
    )
    return [_desired(r) for r in conn.execute(query)]


_PUBLISHED = (
    update(device_desired)
    .where(
        device_desired.c.device_id == bindparam("b_device"),
        device_desired.c.rev == bindparam("b_rev"),
    )
    .values(published=True, published_at=bindparam("b_now"))
)


def mark_published(conn: Connection, acked: Sequence[tuple[str, int]], *, now: float) -> None:
    """Mark (device, rev) published; a row whose rev changed meanwhile stays unpublished."""
    if acked:
        conn.execute(_PUBLISHED, [{"b_device": d, "b_rev": r, "b_now": now} for d, r in acked])


def mark_all_unpublished(conn: Connection) -> int:
    """Publish every desired state again (the broker may have lost its retained messages)."""
    result = conn.execute(
        update(device_desired).where(device_desired.c.published.is_(True)).values(published=False)
    )
    return int(result.rowcount)


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
