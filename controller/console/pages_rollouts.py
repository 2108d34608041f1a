"""Rollout pages: list, detail with live progress, operator actions and the create form.

Actions call the same ``controller.rollouts.commands`` functions as the HTTP API
(``controller.api.rollouts``), so the rules and error messages are the same. The preview
runs ``commands.create_rollout`` in a transaction that is rolled back: it shows exactly
what creating would select (or the error creating would give), and stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from controller.console.render import render
from controller.console.session import ConsoleUser, PageError, operator_form, viewer
from controller.console.words import abort_words, gate_words
from controller.errors import RolloutError
from controller.fleet.registry import list_models
from controller.rollouts import commands, executions, records, spec
from controller.rollouts.records import RolloutInfo

router = APIRouter()

_STATUS = {"not_found": 404, "conflict": 409, "invalid": 422}
Posted = Annotated[tuple[ConsoleUser, dict[str, str]], Depends(operator_form)]
Viewer = Annotated[ConsoleUser, Depends(viewer)]
ACTIONS: dict[str, tuple[str, ...]] = {
    "active": ("pause", "abort", "rollback"),
    "paused": ("resume", "abort", "rollback"),
    "completed": ("rollback",),
}
"""The actions each state allows (``commands``); only these buttons are shown."""
FORM_DEFAULTS = {
    "model": "",
    "select": "",
    "stream": spec.ALL_STREAMS,
    "stages": spec.DEFAULT_STAGES,
    "bake": spec.DEFAULT_BAKE,
    "max_failures": spec.DEFAULT_MAX_FAILURES,
    "timeout": spec.DEFAULT_TIMEOUT,
}


def _wake(request: Request) -> None:
    wake: Callable[[], None] | None = getattr(request.app.state, "rollouts_wake", None)
    if wake is not None:
        wake()


def _progress(counts: dict[str, int]) -> str:
    total, finished, failures = commands.summary_counts(counts)
    text = f"{finished}/{total} done"
    return text + (f", {failures} failed" if failures else "")


@router.get("/rollouts")
def rollouts_page(request: Request, _user: Viewer) -> Response:
    with request.app.state.db.connect() as conn:
        found = records.list_rollouts(conn, limit=200)
        counts = records.status_counts(conn, [r.id for r in found])
    rows = [{"r": r, "progress": _progress(counts[r.id])} for r in found]
    return render(request, "rollouts.html", live="rollouts", rows=rows)


def _detail_page(request: Request, rollout_id: int, *, error: str | None, status: int) -> Response:
    with request.app.state.db.connect() as conn:
        try:
            view = commands.detail(conn, rollout_id, now=request.app.state.clock())
        except RolloutError as err:
            raise PageError(_STATUS.get(err.kind, 422), str(err)) from err
    r = view.rollout
    return render(
        request,
        "rollout.html",
        status_code=status,
        live=f"rollout:{r.id}",
        view=view,
        r=r,
        progress=_progress(view.counts),
        abort_reason=abort_words(r.reason, r.detail)
        if r.state in ("aborted", "rolled_back")
        else None,
        stages=[{"s": s, "progress": _progress(s.counts)} for s in view.stages],
        devices=[{"d": d, "gate": gate_words(d.evidence)} for d in view.devices],
        actions=ACTIONS.get(r.state, ()),
        error=error,
    )


@router.get("/rollouts/new")
def new_rollout(request: Request, _user: Viewer) -> Response:
    return _form_page(request, dict(FORM_DEFAULTS))


@router.get("/rollouts/{rollout_id}")
def rollout_page(request: Request, rollout_id: int, _user: Viewer) -> Response:
    return _detail_page(request, rollout_id, error=None, status=200)


def _form_page(
    request: Request,
    values: dict[str, str],
    *,
    error: str | None = None,
    status: int = 200,
    preview: list[Any] | None = None,
    created: RolloutInfo | None = None,
) -> Response:
    user: ConsoleUser | None = getattr(request.state, "console_user", None)
    if user is None or not user.can_act:
        raise PageError(
            403,
            "creating a rollout needs an operator token: log in with one made by "
            "`edgefleet tokens create --role operator`",
        )
    with request.app.state.db.connect() as conn:
        refs = [m.ref for m in list_models(conn)]
    return render(
        request,
        "rollout_new.html",
        status_code=status,
        values=values,
        refs=refs,
        error=error,
        preview=preview,
        preview_rollout=created,
    )


def _selector(text: str) -> list[str]:
    """Comma-separated ``--select`` values (``all``, ``tag=KEY:VALUE``, device ids);
    ``tag:KEY=VALUE`` is read as ``tag=KEY:VALUE``."""
    out = []
    for part in text.split(","):
        item = part.strip()
        if item.startswith("tag:") and "=" in item:
            key, value = item[4:].split("=", 1)
            item = f"tag={key}:{value}"
        if item:
            out.append(item)
    return out


def _request(values: dict[str, str]) -> commands.RolloutRequest:
    """The form as the API's request (the CLI's parsers: durations, shares, selectors)."""
    max_failures = values.get("max_failures", "").strip() or spec.DEFAULT_MAX_FAILURES
    return commands.RolloutRequest(
        model=values.get("model", "").strip(),
        select=_selector(values.get("select", "")),
        stream=values.get("stream", "").strip() or spec.ALL_STREAMS,
        stages=values.get("stages", "").strip() or spec.DEFAULT_STAGES,
        bake_s=spec.parse_duration(values.get("bake", "").strip() or "0s", what="bake"),
        max_failures=spec.parse_share(max_failures, what="max failures"),
        timeout_s=spec.parse_duration(
            values.get("timeout", "").strip() or spec.DEFAULT_TIMEOUT, what="timeout"
        ),
    )


def _by_device(rows: list[Any]) -> list[dict[str, Any]]:
    """Executions grouped per device: id, its selected streams, its stage."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(
            row.device_id, {"device_id": row.device_id, "streams": [], "stage": row.stage}
        )
        entry["streams"].append(row.stream)
    return sorted(out.values(), key=lambda e: (e["stage"], e["device_id"]))


def _values(form: dict[str, str]) -> dict[str, str]:
    values = {key: form.get(key, default) for key, default in FORM_DEFAULTS.items()}
    values["max_failures"] = form.get("max-failures", values["max_failures"])
    return values


@router.post("/rollouts/preview")
def preview_rollout(request: Request, posted: Posted) -> Response:
    user, form = posted
    values = _values(form)
    try:
        req = _request(values)
        with request.app.state.db.connect() as conn:
            trans = conn.begin()
            try:
                created = commands.create_rollout(
                    conn, req, now=request.app.state.clock(), created_by=user.name
                )
                selected = _by_device(executions.list_rollout_devices(conn, created.id))
            finally:
                trans.rollback()
    except RolloutError as err:
        return _form_page(request, values, error=str(err), status=_STATUS.get(err.kind, 422))
    return _form_page(request, values, preview=selected, created=created)


@router.post("/rollouts")
def create_rollout(request: Request, posted: Posted) -> Response:
    user, form = posted
    values = _values(form)
    if form.get("confirm") != "on":
        return _form_page(
            request,
            values,
            error="tick the confirmation box to create the rollout (preview it first)",
            status=422,
        )
    try:
        req = _request(values)
        with request.app.state.db.begin() as conn:
            created = commands.create_rollout(
                conn, req, now=request.app.state.clock(), created_by=user.name
            )
    except RolloutError as err:
        return _form_page(request, values, error=str(err), status=_STATUS.get(err.kind, 422))
    _wake(request)
    return RedirectResponse(f"/ui/rollouts/{created.id}", status_code=303)


def _act(
    request: Request, rollout_id: int, action: Callable[..., RolloutInfo], **kw: Any
) -> Response:
    try:
        with request.app.state.db.begin() as conn:
            action(conn, rollout_id, now=request.app.state.clock(), **kw)
    except RolloutError as err:
        if err.kind == "not_found":
            raise PageError(404, str(err)) from err
        return _detail_page(request, rollout_id, error=str(err), status=_STATUS.get(err.kind, 422))
    _wake(request)
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)


def _note(form: dict[str, str]) -> str | None:
    return form.get("reason", "").strip()[:500] or None


@router.post("/rollouts/{rollout_id}/pause")
def pause(request: Request, rollout_id: int, _posted: Posted) -> Response:
    return _act(request, rollout_id, commands.pause)


@router.post("/rollouts/{rollout_id}/resume")
def resume(request: Request, rollout_id: int, _posted: Posted) -> Response:
    return _act(request, rollout_id, commands.resume)


@router.post("/rollouts/{rollout_id}/abort")
def abort(request: Request, rollout_id: int, posted: Posted) -> Response:
    user, form = posted
    by = f"token {user.name!r}"
    return _act(request, rollout_id, commands.abort, by=by, note=_note(form))


@router.post("/rollouts/{rollout_id}/rollback")
def rollback(request: Request, rollout_id: int, posted: Posted) -> Response:
    user, form = posted
    by = f"token {user.name!r}"
    return _act(request, rollout_id, commands.rollback, by=by, note=_note(form))
