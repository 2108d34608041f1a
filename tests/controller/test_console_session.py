"""Console login on SQLite and PostgreSQL: sessions, cookie flags, CSRF, roles, security
headers, expiry and token revocation, and failed logins counted by the API's limiter."""

from __future__ import annotations

import hashlib
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.api import create_app
from controller.api.auth import AuthLimiter
from controller.console.session import COOKIE, IDLE_S
from controller.db.models import console_sessions
from controller.db.session import Database
from controller.fleet.tokens import list_tokens, revoke_token
from tests.controller.conftest import Clock
from tests.controller.console_support import CSP, client_for, csrf_of, login

ACTIONS = ("pause", "resume", "abort", "rollback")


@pytest.fixture
def client(database: Database, clock: Clock) -> TestClient:
    return client_for(database, clock)


def test_entry_redirects_to_login_then_to_the_fleet(
    client: TestClient, tokens: dict[str, str]
) -> None:
    assert client.get("/ui/").headers["location"] == "/ui/login"
    assert client.get("/ui/fleet").headers["location"] == "/ui/login"
    page = client.get("/ui/login")
    assert page.status_code == 200
    assert '<form id="login-form" method="post" action="/ui/login">' in page.text
    assert 'id="token" name="token" type="password" autocomplete="current-password"' in page.text
    assert '<label for="token">API token</label>' in page.text
    login(client, tokens["viewer"])
    assert client.get("/ui/").headers["location"] == "/ui/fleet"
    assert client.get("/ui/login").headers["location"] == "/ui/fleet"


def test_login_sets_a_strict_httponly_cookie_and_stores_only_its_hash(
    database: Database, clock: Clock, tokens: dict[str, str]
) -> None:
    client = client_for(database, clock)
    resp = client.post("/ui/login", data={"token": tokens["operator"]})
    assert resp.status_code == 303
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http
    session_id = cookie.split(";")[0].split("=", 1)[1]
    with database.connect() as conn:
        stored = list(conn.execute(select(console_sessions)))
    assert len(stored) == 1
    assert stored[0].id_hash == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in {stored[0].id_hash, stored[0].csrf}
    assert stored[0].expires_at == clock() + IDLE_S
    page = client.get("/ui/fleet")
    assert '<span id="whoami">t-operator (operator)</span>' in page.text
    assert tokens["operator"] not in page.text and session_id not in page.text

    secure = client_for(database, clock, https=True)
    resp = secure.post("/ui/login", data={"token": tokens["viewer"]})
    assert "Secure" in resp.headers["set-cookie"]


def test_bad_token_gets_401_page_and_counts_toward_the_api_limiter(
    database: Database, clock: Clock, tokens: dict[str, str]
) -> None:
    app = create_app(db=database, clock=clock, auth_limiter=AuthLimiter(max_failures=3))
    client = TestClient(app, follow_redirects=False)
    for _ in range(2):
        resp = client.post("/ui/login", data={"token": "efc_wrong"})
        assert resp.status_code == 401
        assert re.search(r'<p id="error" role="alert">[^<]*unknown or revoked', resp.text)
        assert "set-cookie" not in resp.headers
    # The API's bearer failures and the console's failed logins share one count.
    api = client.get("/api/v1/devices", headers={"Authorization": "Bearer efc_wrong"})
    assert api.status_code == 401
    blocked = client.post("/ui/login", data={"token": tokens["admin"]})
    assert blocked.status_code == 429
    assert "too many failed token attempts" in blocked.text
    assert int(blocked.headers["retry-after"]) >= 1
    refused = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert refused.status_code == 429


def test_every_console_answer_has_the_csp_and_security_headers(
    client: TestClient, tokens: dict[str, str]
) -> None:
    paths = ["/ui/login", "/ui/", "/ui/static/console.css", "/ui/static/console.js"]
    login(client, tokens["operator"])
    paths += ["/ui/fleet", "/ui/models", "/ui/rollouts", "/ui/rollouts/new", "/ui/devices/none"]
    paths += ["/ui/rollouts/999", "/ui/static/nothing.js", "/ui/no-such-page"]
    for path in paths:
        resp = client.get(path)
        assert resp.headers["content-security-policy"] == CSP, path
        assert resp.headers["x-content-type-options"] == "nosniff", path
        assert resp.headers["referrer-policy"] == "no-referrer", path
        if resp.headers.get("content-type", "").startswith("text/html"):
            assert "style=" not in resp.text and " onclick" not in resp.text, path
            assert "<script>" not in resp.text, path
    assert "content-security-policy" not in client.get("/healthz").headers


def test_post_without_the_right_csrf_value_is_refused(
    client: TestClient, tokens: dict[str, str]
) -> None:
    csrf = login(client, tokens["operator"])
    for data in ({}, {"csrf": "wrong"}, {"csrf": csrf[:-1]}):
        resp = client.post("/ui/logout", data=data)
        assert resp.status_code == 403
        assert re.search(r'<p id="error"[^>]*>[^<]*CSRF', resp.text)
        resp = client.post("/ui/rollouts/1/pause", data=data)
        assert resp.status_code == 403
    assert client.get("/ui/fleet").status_code == 200  # still logged in


def test_viewer_sees_no_actions_and_every_action_url_answers_403(
    client: TestClient, tokens: dict[str, str]
) -> None:
    csrf = login(client, tokens["viewer"])
    rollouts = client.get("/ui/rollouts")
    assert 'id="new-rollout"' not in rollouts.text
    new = client.get("/ui/rollouts/new")
    assert new.status_code == 403 and "needs an operator token" in new.text
    urls = [f"/ui/rollouts/1/{a}" for a in ACTIONS] + ["/ui/rollouts", "/ui/rollouts/preview"]
    for url in urls:
        resp = client.post(url, data={"csrf": csrf, "model": "m@1", "select": "all"})
        assert resp.status_code == 403, url
        assert "has role viewer; this needs operator" in resp.text, url


def test_logout_ends_the_session_server_side(
    database: Database, client: TestClient, tokens: dict[str, str]
) -> None:
    csrf = login(client, tokens["viewer"])
    old_cookie = client.cookies.get(COOKIE)
    resp = client.post("/ui/logout", data={"csrf": csrf})
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login"
    assert client.get("/ui/fleet").headers["location"] == "/ui/login"
    with database.connect() as conn:
        assert list(conn.execute(select(console_sessions))) == []
    client.cookies.set(COOKIE, old_cookie or "", path="/ui")  # replaying the old cookie
    assert client.get("/ui/fleet").headers["location"] == "/ui/login"


def test_session_expires_after_12_hours_idle_and_use_extends_it(
    client: TestClient, tokens: dict[str, str], clock: Clock
) -> None:
    login(client, tokens["viewer"])
    clock.advance(IDLE_S - 60)
    assert client.get("/ui/fleet").status_code == 200  # used: 12 h more from now
    clock.advance(IDLE_S - 60)
    assert client.get("/ui/fleet").status_code == 200
    clock.advance(IDLE_S + 1)
    assert client.get("/ui/fleet").headers["location"] == "/ui/login"


def test_revoking_the_token_ends_its_sessions_at_once(
    database: Database, client: TestClient, tokens: dict[str, str], clock: Clock
) -> None:
    login(client, tokens["operator"])
    assert client.get("/ui/rollouts").status_code == 200
    with database.begin() as conn:
        token = next(t for t in list_tokens(conn) if t.role == "operator")
        revoke_token(conn, token.id, now=clock())
    assert client.get("/ui/rollouts").headers["location"] == "/ui/login"
    again = client.post("/ui/login", data={"token": tokens["operator"]})
    assert again.status_code == 401


def test_no_token_in_any_url_or_page(client: TestClient, tokens: dict[str, str]) -> None:
    login(client, tokens["admin"])
    for path in ("/ui/fleet", "/ui/models", "/ui/rollouts", "/ui/rollouts/new"):
        page = client.get(path)
        assert tokens["admin"] not in page.text
        assert csrf_of(page.text)  # every page carries the logout form's CSRF field
        assert 'id="logout-form" method="post" action="/ui/logout"' in page.text
    assert all(tokens["admin"] not in str(r.url) for r in [client.get("/ui/fleet")])
