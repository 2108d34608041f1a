"""The console's live stream over real HTTP (uvicorn on loopback, SQLite and PostgreSQL):
``event: changed`` after a database change, the session required, unknown views refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from controller.api import create_app
from controller.console import live
from controller.console.session import COOKIE
from controller.db.session import Database
from controller.fleet.tokens import list_tokens, revoke_token
from tests.controller.conftest import serving
from tests.controller.console_support import add_device


@pytest.fixture
def served(database: Database) -> Iterator[str]:
    # The real clock: the stream polls once a second.
    with serving(create_app(db=database)) as url:
        yield url


def _login(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    resp = client.post("/ui/login", data={"token": token})
    assert resp.status_code == 303 and COOKIE in client.cookies
    return client


def _next_event(lines: Iterator[str], deadline: float) -> str:
    """The next ``event:`` name (comments and data skipped)."""
    for line in lines:
        if line.startswith("event: "):
            return line.removeprefix("event: ")
        if time.monotonic() > deadline:
            break
    raise AssertionError("no event before the deadline")


def test_fleet_stream_says_changed_after_a_device_appears(
    served: str, database: Database, tokens: dict[str, str]
) -> None:
    client = _login(served, tokens["viewer"])
    add_device(database, "cam-1", at=time.time())
    with client.stream("GET", "/ui/live", params={"view": "fleet"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "default-src 'none'" in resp.headers["content-security-policy"]
        lines = resp.iter_lines()
        assert next(lines) == "retry: 3000"
        time.sleep(1.5)  # the stream has its first fingerprint
        add_device(database, "cam-2", at=time.time())
        assert _next_event(lines, time.monotonic() + 10) == "changed"


def test_device_and_rollout_streams_follow_their_own_data(
    served: str, database: Database, tokens: dict[str, str]
) -> None:
    client = _login(served, tokens["viewer"])
    add_device(database, "cam-1", at=time.time())
    add_device(database, "cam-2", at=time.time())
    with client.stream("GET", "/ui/live", params={"view": "device:cam-1"}) as resp:
        lines = resp.iter_lines()
        time.sleep(1.5)
        add_device(database, "cam-1", at=time.time() + 2)
        assert _next_event(lines, time.monotonic() + 10) == "changed"
    with client.stream("GET", "/ui/live", params={"view": "rollouts"}) as resp:
        assert resp.status_code == 200


def test_stream_needs_a_session_and_a_known_view(
    served: str, database: Database, tokens: dict[str, str]
) -> None:
    anonymous = httpx.Client(base_url=served, timeout=10)
    refused = anonymous.get("/ui/live", params={"view": "fleet"})
    assert refused.status_code == 401
    client = _login(served, tokens["viewer"])
    bad = client.get("/ui/live", params={"view": "everything"})
    assert bad.status_code == 400 and "unknown" in bad.text
    with database.begin() as conn:
        viewer = next(t for t in list_tokens(conn) if t.role == "viewer")
        revoke_token(conn, viewer.id, now=time.time())
    assert client.get("/ui/live", params={"view": "fleet"}).status_code == 401


def test_stream_sends_heartbeats_and_ends_when_the_token_is_revoked(
    served: str, database: Database, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "HEARTBEAT_S", 1.0)
    client = _login(served, tokens["viewer"])
    with client.stream("GET", "/ui/live", params={"view": "rollouts"}) as resp:
        lines = resp.iter_lines()
        deadline = time.monotonic() + 10
        beat = next(line for line in lines if line == ": heartbeat" or time.monotonic() > deadline)
        assert beat == ": heartbeat"
        with database.begin() as conn:
            viewer = next(t for t in list_tokens(conn) if t.role == "viewer")
            revoke_token(conn, viewer.id, now=time.time())
        assert _next_event(lines, time.monotonic() + 10) == "logout"
        assert list(lines) == ["data: {}", ""]  # the server closed the stream
