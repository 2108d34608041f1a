"""Helpers of the console tests: a logged-in TestClient, the CSRF value of a page, a fleet
written through the real ingest path."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from controller.api import create_app
from controller.db.session import Database
from controller.fleet.writes import write_messages
from protocol import Reported, Status, StreamReport, StreamStatus, StreamTelemetry
from tests.controller.conftest import Clock, event, received, telemetry

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def client_for(database: Database, clock: Clock, *, https: bool = False) -> TestClient:
    app = create_app(db=database, clock=clock)
    base = "https://testserver" if https else "http://testserver"
    return TestClient(app, base_url=base, follow_redirects=False)


def login(client: TestClient, token: str) -> str:
    """Log in with ``token``; returns the session's CSRF value (from the fleet page)."""
    resp = client.post("/ui/login", data={"token": token})
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == "/ui/fleet"
    page = client.get("/ui/fleet")
    assert page.status_code == 200
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no CSRF field"
    return found.group(1)


def stream_telemetry(
    name: str, fps: float, *, p95: float = 20.0, psi: float | None = None
) -> StreamTelemetry:
    return StreamTelemetry(
        name=name,
        source_state="running",
        fps=fps,
        frames_captured=100,
        frames_processed=90,
        frames_dropped=10,
        infer_ms_p50=p95 / 2,
        infer_ms_p95=p95,
        latency_ms_p50=p95,
        latency_ms_p95=p95 * 2,
        score_psi=psi,
    )


def add_device(
    database: Database,
    device_id: str,
    *,
    at: float,
    online: bool = True,
    cpu: float = 50.0,
    fps: float = 10.0,
    model: str = "m@1",
    streams: tuple[str, ...] = ("cam0",),
    tags: tuple[str, ...] = (),
) -> None:
    """A device as the ingest writes it: status, reported state, telemetry, an event."""
    status = Status(
        schema=1,
        device_id=device_id,
        state="online" if online else "offline",
        ts=at,
        agent_version="1.2.3",
        started_at=at - 10,
        streams=[StreamStatus(name=s, source_state="running", model=model) for s in streams],
    )
    reported = Reported(
        schema=1,
        device_id=device_id,
        ts=at,
        desired_rev=3,
        streams={s: StreamReport(active=model, previous="m@0", phase="committed") for s in streams},
    )
    tele = telemetry(device_id, ts=at, cpu=cpu, streams=[stream_telemetry(s, fps) for s in streams])
    with database.begin() as conn:
        write_messages(
            conn,
            [
                received(status, at=at),
                received(reported, at=at),
                received(tele, at=at),
                received(event(device_id, "deploy.committed", ts=at), at=at),
            ],
        )
        if tags:
            from controller.fleet.devices import set_tags

            set_tags(conn, device_id, add=tags)
