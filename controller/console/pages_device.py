"""The device page (streams, charts, events, snapshots) and the snapshot JPEGs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from controller.console import charts
from controller.console.render import render
from controller.console.session import ConsoleUser, PageError, viewer
from controller.console.words import gate_words
from controller.fleet.devices import get_device
from controller.fleet.history import list_events, telemetry_history
from controller.fleet.snapshots import list_snapshots, read_snapshot

router = APIRouter()

RANGES = {"hour": 3600.0, "day": 86400.0}
DAY_ROWS = 20_000
"""Most telemetry rows one day chart reads (a day of 10 s samples is 8,640)."""


def device_state(online: bool, state: str | None) -> str:
    if state == "revoked":
        return "revoked"
    return "online" if online else "offline"


@router.get("/devices/{device_id}")
def device_page(
    request: Request, device_id: str, _user: Annotated[ConsoleUser, Depends(viewer)]
) -> Response:
    span_name = request.query_params.get("range", "hour")
    if span_name not in RANGES:
        raise PageError(400, f"range {span_name[:20]!r} is unknown: use hour or day")
    now = request.app.state.clock()
    start = now - RANGES[span_name]
    with request.app.state.db.connect() as conn:
        device = get_device(conn, device_id)
        if device is None:
            raise PageError(
                404, f"no device {device_id[:64]!r}; the fleet page lists the known devices"
            )
        limit = 1000 if span_name == "hour" else DAY_ROWS
        rows = telemetry_history(conn, device_id, since=start, limit=limit)
        events = list_events(conn, device_id=device_id, limit=50)
        snapshots = list_snapshots(conn, device_id)
    if span_name == "hour":
        rows = [r for r in rows if r.resolution_s == 0]
    series = charts.all_series(rows, day=span_name == "day")
    figures = [
        {
            "metric": m,
            "svg": charts.line_chart(
                series[m.key], start=start, end=now, label=f"{m.title}, last {span_name}"
            ),
            "legend": charts.legend(series[m.key]),
        }
        for m in charts.METRICS
    ]
    streams = [{"info": s, "gate": gate_words(s.gate)} for s in device.streams]
    return render(
        request,
        "device.html",
        live=f"device:{device.id}",
        device=device,
        state=device_state(device.online, device.state),
        streams=streams,
        figures=figures,
        span=span_name,
        events=events,
        snapshots=snapshots,
        now=now,
    )


@router.get("/devices/{device_id}/snapshots/{stream}.jpg")
def snapshot_jpeg(
    request: Request, device_id: str, stream: str, _user: Annotated[ConsoleUser, Depends(viewer)]
) -> Response:
    with request.app.state.db.connect() as conn:
        found = read_snapshot(conn, device_id, stream)
    if found is None:
        raise PageError(404, f"no snapshot of {device_id[:64]}/{stream[:64]} yet")
    return Response(
        bytes(found.jpeg), media_type="image/jpeg", headers={"Cache-Control": "no-store"}
    )
