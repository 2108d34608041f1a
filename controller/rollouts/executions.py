"""The (device, stream) executions of rollouts: selection, assignment, status updates and
what the engine reads to judge them (device reports, telemetry)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, or_, select, update

from controller.db.models import (
    device_streams,
    device_tags,
    devices,
    rollout_devices,
    rollouts,
    telemetry,
)
from controller.db.sql import chunks, from_row
from controller.rollouts.faults import MALFORMED_STATE, DeviceFault
from controller.rollouts.records import (
    IN_FLIGHT_WATCHED,
    LIVE_STATES,
    WATCHED,
    RolloutDeviceInfo,
)

Version = tuple[int, str, int, float, float]
"""What an execution's derived status depends on, besides the clock and the rollout: its
device's ``state_seq`` (every status and reported-state write counts), and the execution
row's status, rev, assignment time and last update (only the engine writes those)."""


def _device(row: Any) -> RolloutDeviceInfo:
    return from_row(RolloutDeviceInfo, row, evidence=dict(row.evidence) if row.evidence else None)


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
    for chunk in chunks(ids):
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
_FAIL = _pair_update(status="failed_status", reason="reason", finished_at="now", updated_at="now")
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


def mark_failed(conn: Connection, rollout_id: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Fail executions the engine could not assign (``controller.rollouts.faults``): dicts
    with device_id, stream, reason, now. Nothing was written for them: no rev, no rollback."""
    _update_pairs(conn, _FAIL, rollout_id, [{**r, "failed_status": "failed"} for r in rows])


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
    state_seq: int = 0
    """The device's ``state_seq`` when this was read."""
    updated_at: float = 0.0
    """When the execution row was last written."""

    @property
    def version(self) -> Version:
        """The ``Version`` this was read at (as ``in_flight_versions`` gives it)."""
        return (self.state_seq, self.status, self.rev, self.assigned_at, self.updated_at)

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


def executions_to_watch(
    conn: Connection,
    rollout_id: int,
    faults: list[tuple[str, str, DeviceFault]] | None = None,
    *,
    statuses: tuple[str, ...] = WATCHED,
    devices_only: Iterable[str] | None = None,
) -> list[Execution]:
    """Assigned executions still watched (queued, in progress, succeeded; or ``statuses``, a
    part of those) with their reports; given ``devices_only``, those of these devices only.

    A row whose stored or reported state has the wrong shape (only a database written by
    something else can hold one) is left out and, given ``faults``, added there as
    (device, stream, DeviceFault)."""
    query = _watch_query(rollout_id, statuses)
    if devices_only is None:
        rows: Iterable[Any] = conn.execute(query)
    else:
        ids = sorted(set(devices_only))
        rows = (
            row
            for chunk in chunks(ids)
            for row in conn.execute(query.where(rollout_devices.c.device_id.in_(chunk)))
        )
    out = []
    for r in rows:
        try:
            out.append(_execution(r))
        except DeviceFault as fault:
            if faults is not None:
                faults.append((r.device_id, r.stream, fault))
    return out


def in_flight_versions(conn: Connection, rollout_id: int) -> dict[tuple[str, str], Version]:
    """(device, stream) → ``Version`` of the rollout's executions in flight: one narrow read
    (no reported state, no JSON) that tells the engine which ones changed since it looked."""
    rd = rollout_devices
    query = (
        select(
            rd.c.device_id,
            rd.c.stream,
            devices.c.state_seq,
            rd.c.status,
            rd.c.rev,
            rd.c.assigned_at,
            rd.c.updated_at,
        )
        .join(devices, devices.c.id == rd.c.device_id)
        .where(rd.c.rollout_id == rollout_id, rd.c.status.in_(IN_FLIGHT_WATCHED))
    )
    return {
        (d, s): (int(seq), status, rev, assigned_at, updated_at)
        for d, s, seq, status, rev, assigned_at, updated_at in conn.execute(query)
    }


def _watch_query(rollout_id: int, statuses: tuple[str, ...]) -> Any:
    rd, ds = rollout_devices, device_streams
    return (
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
            rd.c.updated_at,
            devices.c.desired_rev,
            devices.c.state_seq,
            ds.c.phase.label("r_phase"),
            ds.c.active_model,
            ds.c.target,
            ds.c.reason.label("r_reason"),
            ds.c.gate.label("r_gate"),
            ds.c.name.label("r_name"),
        )
        .join(devices, devices.c.id == rd.c.device_id)
        .outerjoin(ds, and_(ds.c.device_id == rd.c.device_id, ds.c.name == rd.c.stream))
        .where(rd.c.rollout_id == rollout_id, rd.c.status.in_(statuses))
    )


_SHAPES: tuple[tuple[str, str, tuple[type, ...]], ...] = (
    ("rev", "assigned desired rev", (int,)),
    ("assigned_at", "assignment time", (int, float)),
    ("desired_rev", "reported desired_rev", (int, type(None))),
    ("r_phase", "reported phase", (str, type(None))),
    ("active_model", "reported active model", (str, type(None))),
    ("target", "reported target", (str, type(None))),
    ("r_reason", "reported reason", (str, type(None))),
    ("stale_outcome", "stale outcome", (dict, type(None))),
    ("r_gate", "reported gate evidence", (dict, type(None))),
    ("evidence", "kept gate evidence", (dict, type(None))),
)


def _execution(r: Any) -> Execution:
    """An Execution of a watched row; DeviceFault when a value has the wrong type."""
    for column, what, types in _SHAPES:
        value = getattr(r, column)
        if not isinstance(value, types) or isinstance(value, bool):
            raise DeviceFault(
                MALFORMED_STATE,
                f"device {r.device_id}'s {what} for stream {r.stream!r} is {value!r:.80}, not "
                f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}",
            )
    return Execution(
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
        state_seq=int(r.state_seq),
        updated_at=float(r.updated_at),
    )


def stream_reports(
    conn: Connection, device_ids: Iterable[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(device, stream) → the reported phase, target and reason."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ds = device_streams
    for chunk in chunks(sorted(set(device_ids))):
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
    for chunk in chunks(sorted(set(device_ids))):
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
            # A malformed sample (not a list of stream objects) is no evidence: the health
            # comparison skips what it cannot read.
            out[device_id].append((float(ts), list(streams) if isinstance(streams, list) else []))
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
    for chunk in chunks(found):
        for device_id, name in conn.execute(
            select(device_streams.c.device_id, device_streams.c.name)
            .where(device_streams.c.device_id.in_(chunk))
            .order_by(device_streams.c.device_id, device_streams.c.name)
        ):
            streams[device_id].append(name)
    return streams
