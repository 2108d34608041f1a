"""Live updates: ``GET /ui/live?view=...`` is a server-sent event stream.

The server polls the database about once a second and compares a fingerprint of the
view's data (so it works with several controller replicas behind one address); when it
changes it sends ``event: changed`` and console.js re-fetches the page's ``<main>``. A
comment line every 15 s keeps proxies from closing the stream. The session is checked
again every 15 s: a logout, an expiry or a revoked token ends the stream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Connection, func, select
from starlette.concurrency import run_in_threadpool

from controller.console.session import COOKIE, ConsoleUser, PageError, find_session, viewer
from controller.db.models import (
    device_snapshots,
    device_streams,
    devices,
    events,
    rollout_devices,
    rollouts,
)

router = APIRouter()

PATH = "/ui/live"
POLL_S = 1.0
HEARTBEAT_S = 15.0
_VIEW = re.compile(r"(fleet|rollouts)|(device|rollout):(.{1,64})")


def fingerprint(conn: Connection, view: str) -> tuple[Any, ...]:
    """A value that changes whenever the data shown by ``view`` changes."""
    match = _VIEW.fullmatch(view)
    if match is None:
        raise ValueError(view)
    kind = match.group(1) or match.group(2)
    key = match.group(3)
    if kind == "fleet":
        d = devices.c
        row = conn.execute(
            select(
                func.count(), func.max(d.last_seen), func.max(d.status_ts), func.max(d.reported_at)
            )
        ).one()
        streams = conn.execute(select(func.max(device_streams.c.updated_at))).scalar()
        return (*row, streams)
    if kind == "device":
        d = devices.c
        found = conn.execute(
            select(d.last_seen, d.online, d.state, d.reported_at, d.last_telemetry_at).where(
                d.id == key
            )
        ).first()
        parts = (
            select(func.max(device_streams.c.updated_at)).where(device_streams.c.device_id == key),
            select(func.max(events.c.id)).where(events.c.device_id == key),
            select(func.max(device_snapshots.c.received_at)).where(
                device_snapshots.c.device_id == key
            ),
        )
        return (tuple(found) if found else None, *(conn.execute(p).scalar() for p in parts))
    rd = rollout_devices.c
    if kind == "rollout":
        rid = int(key) if key and key.isdigit() else -1
        rollout = conn.execute(
            select(rollouts.c.state, rollouts.c.updated_at, rollouts.c.current_stage).where(
                rollouts.c.id == rid
            )
        ).first()
        done = conn.execute(
            select(func.count(), func.max(rd.updated_at)).where(rd.rollout_id == rid)
        ).one()
        return (tuple(rollout) if rollout else None, *done)
    head = conn.execute(select(func.count(), func.max(rollouts.c.updated_at))).one()
    latest = conn.execute(select(func.max(rd.updated_at))).scalar()
    return (*head, latest)


def _still_logged_in(request: Request, session_id: str) -> bool:
    with request.app.state.db.begin() as conn:
        now = request.app.state.clock()
        # An open page is not a use: the session still ends 12 h after the last request.
        return find_session(conn, session_id, now=now, touch=False) is not None


def _fingerprint(request: Request, view: str) -> tuple[Any, ...]:
    with request.app.state.db.connect() as conn:
        return fingerprint(conn, view)


async def _events(request: Request, view: str, session_id: str) -> AsyncIterator[str]:
    yield "retry: 3000\n: live\n\n"
    seen = await run_in_threadpool(_fingerprint, request, view)
    loop = asyncio.get_running_loop()
    last_beat = last_check = loop.time()
    while True:
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            return
        now = loop.time()
        if now - last_check >= HEARTBEAT_S:
            last_check = now
            if not await run_in_threadpool(_still_logged_in, request, session_id):
                yield "event: logout\ndata: {}\n\n"
                return
        current = await run_in_threadpool(_fingerprint, request, view)
        if current != seen:
            seen = current
            yield "event: changed\ndata: {}\n\n"
        if now - last_beat >= HEARTBEAT_S:
            last_beat = now
            yield ": heartbeat\n\n"


@router.get("/live")
def live(
    request: Request, _user: Annotated[ConsoleUser, Depends(viewer)], view: str = ""
) -> StreamingResponse:
    if _VIEW.fullmatch(view) is None:
        raise PageError(
            400, f"view {view[:80]!r} is unknown: use fleet, rollouts, device:ID or rollout:ID"
        )
    session_id = request.cookies.get(COOKIE, "")
    return StreamingResponse(
        _events(request, view, session_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
