"""HTTP API of rollouts under /api/v1/rollouts: create, list, show, pause, resume, abort, rollback.

Changes need an operator token, reads a viewer token. The routes only change the database
(``controller.rollouts.commands``); the rollout engine of the controller acts on it within
about a second (``app.state.rollouts_wake``, when set, makes it look at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from controller.api.auth import Operator, Viewer
from controller.api.errors import AUTH, responses
from controller.api.params import RowId
from controller.api.schemas import (
    GateSettings,
    RolloutActionIn,
    RolloutDetailOut,
    RolloutDeviceOut,
    RolloutIn,
    RolloutList,
    RolloutOut,
    RolloutStateName,
    StageOut,
)
from controller.db.session import Database
from controller.errors import RolloutError
from controller.rollouts import commands, records
from controller.rollouts import gate as gates
from controller.rollouts.records import RolloutDetail, RolloutInfo

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"], responses=AUTH)

_STATUS = {
    "not_found": status.HTTP_404_NOT_FOUND,
    "conflict": status.HTTP_409_CONFLICT,
    "invalid": 422,
}
_ERRORS = responses(
    400,
    404,
    409,
    413,
    422,
    e404="no such rollout, model or device",
    e409="the selection overlaps a live rollout, or the state forbids the action",
    e422="invalid request (stages, selection, durations, gate overrides)",
)


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _http(err: RolloutError) -> HTTPException:
    return HTTPException(status_code=_STATUS.get(err.kind, 422), detail=str(err))


def _wake(request: Request) -> None:
    wake: Callable[[], None] | None = getattr(request.app.state, "rollouts_wake", None)
    if wake is not None:
        wake()


def _out(r: RolloutInfo, counts: dict[str, int]) -> RolloutOut:
    total, finished, failures = commands.summary_counts(counts)
    return RolloutOut(
        id=r.id,
        model=r.model,
        stream=r.stream,
        selector=r.selector,
        stage_spec=r.stage_spec,
        stages=r.stages,
        device_count=r.device_count,
        bake_s=r.bake_s,
        max_failures=r.max_failures,
        min_executed=r.min_executed,
        timeout_s=r.timeout_s,
        gate=None if r.gate is None else GateSettings.model_validate(gates.expand(r.gate)),
        state=r.state,  # type: ignore[arg-type]
        current_stage=r.current_stage,
        reason=r.reason,
        detail=r.detail,
        created_by=r.created_by,
        created_at=r.created_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
        rolled_back_at=r.rolled_back_at,
        counts=counts,
        executions=total,
        finished=finished,
        failures=failures,
    )


def _detail_out(d: RolloutDetail) -> RolloutDetailOut:
    base = _out(d.rollout, d.counts)
    return RolloutDetailOut(
        **base.model_dump(),
        stage_progress=[
            StageOut(
                index=s.index,
                devices=s.devices,
                size=s.size,
                state=s.state,  # type: ignore[arg-type]
                counts=s.counts,
                started_at=s.started_at,
                done_at=s.done_at,
                bake_left_s=s.bake_left_s,
            )
            for s in d.stages
        ],
        devices=[RolloutDeviceOut.model_validate(x) for x in d.devices],
    )


def _show(request: Request, rollout_id: int, *, devices: bool = True) -> RolloutDetailOut:
    with _db(request).connect() as conn:
        try:
            view = commands.detail(
                conn, rollout_id, now=request.app.state.clock(), with_devices=devices
            )
        except RolloutError as err:
            raise _http(err) from err
    return _detail_out(view)


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
def create_rollout(request: Request, body: RolloutIn, token: Operator) -> RolloutDetailOut:
    """Start a staged rollout of a registry model (docs/ota.md, "Rollouts"). The selection
    is resolved now; 409 names the live rollout it would overlap."""
    req = commands.RolloutRequest(
        model=body.model,
        select=body.select,
        stream=body.stream,
        stages=body.stages,
        bake_s=body.bake_s,
        max_failures=body.max_failures,
        min_executed=body.min_executed,
        timeout_s=body.timeout_s,
        gate=None if body.gate is None else body.gate.model_dump(),
    )
    try:
        with _db(request).begin() as conn:
            created = commands.create_rollout(
                conn, req, now=request.app.state.clock(), created_by=token.name
            )
    except RolloutError as err:
        raise _http(err) from err
    _wake(request)
    return _show(request, created.id)


@router.get("")
def list_rollouts(
    request: Request,
    _token: Viewer,
    state: Annotated[
        list[RolloutStateName], Query(description="only these states", max_length=10)
    ] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RolloutList:
    """Rollouts, newest first, with their executions counted by status."""
    with _db(request).connect() as conn:
        found = records.list_rollouts(conn, states=state, limit=limit)
        counts = records.status_counts(conn, [r.id for r in found])
    return RolloutList(rollouts=[_out(r, counts[r.id]) for r in found])


@router.get("/{rollout_id}", responses={404: _ERRORS[404]})
def get_rollout(
    request: Request,
    rollout_id: RowId,
    _token: Viewer,
    devices: Annotated[bool, Query(description="include every (device, stream) execution")] = True,
) -> RolloutDetailOut:
    """One rollout with per-stage and per-device progress."""
    return _show(request, rollout_id, devices=devices)


def _act(
    request: Request,
    rollout_id: int,
    action: Callable[..., RolloutInfo],
    **kw: object,
) -> RolloutDetailOut:
    try:
        with _db(request).begin() as conn:
            action(conn, rollout_id, now=request.app.state.clock(), **kw)
    except RolloutError as err:
        raise _http(err) from err
    _wake(request)
    return _show(request, rollout_id)


@router.post("/{rollout_id}/pause", responses=_ERRORS)
def pause_rollout(request: Request, rollout_id: RowId, _token: Operator) -> RolloutDetailOut:
    """Stop advancing (devices already at work finish; timeouts and abort criteria still apply)."""
    return _act(request, rollout_id, commands.pause)


@router.post("/{rollout_id}/resume", responses=_ERRORS)
def resume_rollout(request: Request, rollout_id: RowId, _token: Operator) -> RolloutDetailOut:
    return _act(request, rollout_id, commands.resume)


@router.post("/{rollout_id}/abort", responses=_ERRORS)
def abort_rollout(
    request: Request, rollout_id: RowId, token: Operator, body: RolloutActionIn | None = None
) -> RolloutDetailOut:
    """End a live rollout; every device it touched gets its pre-rollout model back."""
    note = body.reason if body is not None else None
    return _act(request, rollout_id, commands.abort, by=f"token {token.name!r}", note=note)


@router.post("/{rollout_id}/rollback", responses=_ERRORS)
def rollback_rollout(
    request: Request, rollout_id: RowId, token: Operator, body: RolloutActionIn | None = None
) -> RolloutDetailOut:
    """Undo a live or completed rollout: every device it touched gets its pre-rollout model
    back (devices whose desired model changed since are left alone)."""
    note = body.reason if body is not None else None
    return _act(request, rollout_id, commands.rollback, by=f"token {token.name!r}", note=note)
