"""What operators do to rollouts (the API calls these): create, pause, resume, abort, rollback,
and the progress view. Each runs in the caller's transaction; errors are RolloutError.

Creating a rollout resolves the selection once (devices sorted by id, each with its
stream or, for ``*``, every stream it reported), gives every (device, stream) its stage,
and stores them as ``pending`` executions; the engine assigns them stage by stage. The
desired states themselves are written by the engine only (one writer: no lost updates
between replicas), so an abort or rollback here just changes the state and the engine's
next tick, normally within a second, writes the pre-rollout models back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from controller.errors import RolloutError
from controller.fleet.registry import get_model
from controller.rollouts import executions, gate, records, spec
from controller.rollouts.locks import PG_CREATE_LOCK, lock_rollout, pg_lock_sql
from controller.rollouts.records import (
    FINISHED,
    LIVE_STATES,
    RolloutDetail,
    RolloutInfo,
    StageProgress,
)


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    model: str
    """``name@version`` from the registry."""
    select: Sequence[str]
    stream: str = spec.ALL_STREAMS
    stages: str | Sequence[str] = spec.DEFAULT_STAGES
    bake_s: float = 600.0
    max_failures: float = 0.05
    min_executed: int = spec.DEFAULT_MIN_EXECUTED
    timeout_s: float = 900.0
    gate: Mapping[str, Any] | None = None
    """Health-gate overrides (``protocol.Gate`` fields); None: the devices' defaults."""


def _check_numbers(req: RolloutRequest) -> None:
    if not req.bake_s >= 0:
        raise spec.invalid(f"--bake {req.bake_s}: a duration must be >= 0")
    if not req.timeout_s > 0:
        raise spec.invalid(f"--timeout {req.timeout_s}: a duration must be > 0")
    if not 0 <= req.max_failures <= 1:
        raise spec.invalid(f"--max-failures {req.max_failures}: use a share between 0% and 100%")
    if req.min_executed < 0:
        raise spec.invalid(f"--min-executed {req.min_executed} must be >= 0")


def _targets(conn: Connection, selector: spec.Selector, stream: str) -> list[tuple[str, list[str]]]:
    found = executions.select_devices(
        conn, everything=selector.all, tags=selector.tags, ids=selector.devices
    )
    missing = [d for d in selector.devices if d not in found]
    if missing:
        raise RolloutError(
            f"unknown device {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; `edgefleet devices list` shows the known devices",
            kind="not_found",
        )
    out = []
    for device_id, streams in found.items():
        if stream == spec.ALL_STREAMS:
            chosen = streams
        else:
            chosen = [stream] if stream in streams else []
            if not chosen and device_id in selector.devices:
                raise spec.invalid(
                    f"device {device_id!r} reports no stream {stream!r} (it has: "
                    f"{', '.join(streams) or 'none'}); pick --stream from those or use --stream '*'"
                )
        if chosen:
            out.append((device_id, chosen))
    return out


def create_rollout(
    conn: Connection, req: RolloutRequest, *, now: float, created_by: str | None = None
) -> RolloutInfo:
    """Validate, resolve the selection and store a new active rollout (stage 1 waits for the
    engine). Refused when any selected (device, stream) is held by a live rollout."""
    name, version = spec.parse_model_ref(req.model)
    stream = spec.parse_stream(req.stream)
    selector = spec.parse_selector(req.select)
    stages = spec.parse_stages(req.stages)
    _check_numbers(req)
    overrides = gate.normalize(req.gate)
    model = get_model(conn, name, version)
    if model is None:
        raise RolloutError(
            f"no model {name}@{version} in the registry; upload it first with "
            f"`edgefleet model push {name}-{version}.efb` (`edgefleet model list` shows what is there)",
            kind="not_found",
        )
    targets = _targets(conn, selector, stream)
    if not targets:
        what = "any stream" if stream == spec.ALL_STREAMS else f"stream {stream!r}"
        raise spec.invalid(
            f"the selection {' '.join(req.select)} matches no device that reports {what}; "
            "check it with `edgefleet devices list` (devices appear once they connected)"
        )
    counts = spec.resolve_stages(stages, len(targets))
    if conn.dialect.name == "postgresql":
        conn.execute(pg_lock_sql("pg_advisory_xact_lock", PG_CREATE_LOCK))
    rollout_id = records.insert_rollout(
        conn,
        {
            "model_id": model.id,
            "model": model.ref,
            "stream": stream,
            "selector": list(req.select),
            "stage_spec": ",".join(str(s) for s in stages),
            "stages": counts,
            "device_count": len(targets),
            "bake_s": float(req.bake_s),
            "max_failures": float(req.max_failures),
            "min_executed": int(req.min_executed),
            "timeout_s": float(req.timeout_s),
            "gate": overrides,
            "state": "active",
            "current_stage": 0,
            "created_by": created_by,
            "created_at": now,
            "updated_at": now,
        },
    )
    # After the insert: on SQLite this transaction holds the write lock now, on PostgreSQL
    # the advisory lock; a rollout created concurrently is either seen here or sees this one.
    held = executions.live_pairs(conn, [d for d, _ in targets], exclude=rollout_id)
    clash = [(d, s) for d, streams in targets for s in streams if (d, s) in held]
    if clash:
        other = records.get_rollout(conn, held[clash[0]])
        assert other is not None
        raise RolloutError(
            f"{len(clash)} selected (device, stream) pair(s), e.g. {clash[0][0]}/{clash[0][1]}, "
            f"are in rollout {other.id} ({other.model}, {other.state}); at most one rollout per "
            f"device and stream: wait for it, or `edgefleet rollout abort {other.id}`",
            kind="conflict",
        )
    rows = []
    stage = 0
    for i, (device_id, streams) in enumerate(targets):
        while i >= counts[stage]:
            stage += 1
        rows += [
            {
                "rollout_id": rollout_id,
                "device_id": device_id,
                "stream": s,
                "stage": stage,
                "status": "pending",
                "updated_at": now,
            }
            for s in streams
        ]
    executions.insert_rollout_devices(conn, rows)
    created = records.get_rollout(conn, rollout_id)
    assert created is not None
    return created


def _locked(conn: Connection, rollout_id: int) -> RolloutInfo:
    if not lock_rollout(conn, rollout_id):
        raise RolloutError(
            f"no rollout {rollout_id}; `edgefleet rollout list` shows them", kind="not_found"
        )
    r = records.get_rollout(conn, rollout_id)
    assert r is not None
    return r


def _refuse(r: RolloutInfo, action: str, hint: str = "") -> RolloutError:
    return RolloutError(
        f"cannot {action} rollout {r.id}: it is {r.state}" + (f"; {hint}" if hint else ""),
        kind="conflict",
    )


def pause(conn: Connection, rollout_id: int, *, now: float) -> RolloutInfo:
    """Stop advancing: no new stage is assigned (devices already at work go on, timeouts and
    the abort criteria still apply)."""
    r = _locked(conn, rollout_id)
    if r.state != "active":
        hint = f"`edgefleet rollout resume {r.id}` continues it" if r.state == "paused" else ""
        raise _refuse(r, "pause", hint)
    records.update_rollout(conn, r.id, state="paused", updated_at=now)
    return _get(conn, r.id)


def resume(conn: Connection, rollout_id: int, *, now: float) -> RolloutInfo:
    r = _locked(conn, rollout_id)
    if r.state != "paused":
        raise _refuse(r, "resume", "only a paused rollout can be resumed")
    records.update_rollout(conn, r.id, state="active", updated_at=now)
    return _get(conn, r.id)


def abort(
    conn: Connection, rollout_id: int, *, now: float, by: str | None = None, note: str | None = None
) -> RolloutInfo:
    """End a live rollout; every device it touched gets its pre-rollout model back."""
    r = _locked(conn, rollout_id)
    if r.state not in LIVE_STATES:
        hint = (
            f"`edgefleet rollout rollback {r.id}` gives its devices their previous models back"
            if r.state == "completed"
            else "its devices already got their previous models back"
        )
        raise _refuse(r, "abort", hint)
    detail = f"aborted by {by or 'an operator'}" + (f": {note}" if note else "")
    records.update_rollout(
        conn,
        r.id,
        state="aborted",
        reason="operator",
        detail=detail,
        finished_at=now,
        updated_at=now,
    )
    return _get(conn, r.id)


def rollback(
    conn: Connection, rollout_id: int, *, now: float, by: str | None = None, note: str | None = None
) -> RolloutInfo:
    """Undo a live or completed rollout: every device it touched gets its pre-rollout model."""
    r = _locked(conn, rollout_id)
    if r.state not in (*LIVE_STATES, "completed"):
        raise _refuse(r, "roll back", "its devices already got their previous models back")
    detail = f"rolled back by {by or 'an operator'}" + (f": {note}" if note else "")
    records.update_rollout(
        conn,
        r.id,
        state="rolled_back",
        reason="operator",
        detail=detail,
        finished_at=r.finished_at or now,
        updated_at=now,
    )
    return _get(conn, r.id)


def _get(conn: Connection, rollout_id: int) -> RolloutInfo:
    r = records.get_rollout(conn, rollout_id)
    assert r is not None
    return r


# --- progress ---------------------------------------------------------------------------


def _stage_state(r: RolloutInfo, index: int, counts: dict[str, int], now: float) -> str:
    in_flight = sum(counts.get(s, 0) for s in ("queued", "in_progress"))
    pending = counts.get("pending", 0)
    if r.state in ("aborted", "rolled_back") and (pending or in_flight):
        return "stopped"
    if index < r.current_stage or r.state == "completed":
        return "done"
    if index > r.current_stage or r.stage_started_at is None:
        return "pending"
    if in_flight or pending:
        return "running"
    if r.stage_done_at is not None and now < r.stage_done_at + r.bake_s and r.live:
        return "baking"
    return "done"


def detail(
    conn: Connection, rollout_id: int, *, now: float, with_devices: bool = True
) -> RolloutDetail:
    r = records.get_rollout(conn, rollout_id)
    if r is None:
        raise RolloutError(
            f"no rollout {rollout_id}; `edgefleet rollout list` shows them", kind="not_found"
        )
    by_stage = records.stage_counts(conn, r.id)
    times = records.stage_times(conn, r.id)
    stages = []
    for i, cumulative in enumerate(r.stages):
        c = by_stage.get(i, {})
        started, last = times.get(i, (None, None))
        state = _stage_state(r, i, c, now)
        done_at = last if state in ("done", "baking") else None
        bake_left = None
        if state == "baking" and r.stage_done_at is not None:
            bake_left = max(0.0, r.stage_done_at + r.bake_s - now)
        stages.append(
            StageProgress(
                index=i,
                devices=cumulative,
                size=sum(c.values()),
                state=state,
                counts=dict(c),
                started_at=started,
                done_at=done_at,
                bake_left_s=bake_left,
            )
        )
    totals: dict[str, int] = {}
    for c in by_stage.values():
        for status, n in c.items():
            totals[status] = totals.get(status, 0) + n
    devices = executions.list_rollout_devices(conn, r.id) if with_devices else []
    return RolloutDetail(rollout=r, counts=totals, stages=stages, devices=devices)


def summary_counts(counts: dict[str, int]) -> tuple[int, int, int]:
    """(executions, finished, failures)."""
    total = sum(counts.values())
    return (
        total,
        sum(counts.get(s, 0) for s in FINISHED),
        records.failures(counts),
    )
