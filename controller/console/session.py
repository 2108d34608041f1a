"""Console login: sessions stored hashed in ``console_sessions``, CSRF and role checks.

Logging in with an API token (any role) opens a session: a random 256-bit id sent as the
``edgefleet_session`` cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure over https) and
kept in the database only as its sha256, with a per-session CSRF secret. A session ends 12 h
after its last use, at logout, or at once when its API token is revoked (every lookup joins
the token and checks ``revoked_at``). Failed logins count toward the API's ``AuthLimiter``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from sqlalchemy import Connection, delete, insert, select, update

from controller.db.models import api_tokens, console_sessions
from controller.fleet.tokens import Role, role_allows

COOKIE = "edgefleet_session"
COOKIE_PATH = "/ui"
IDLE_S = 12 * 3600.0
"""A session ends this long after its last use."""
TOUCH_EVERY_S = 60.0
"""``last_used_at`` and the expiry are written at most this often per session."""
MAX_FORM_BYTES = 64 * 1024


class PageError(Exception):
    """Answered as an HTML error page (``error.html``) with ``status_code``."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers or {}


class LoginRequired(Exception):
    """No valid session: pages redirect to /ui/login (the live stream answers 401)."""


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    token_id: int
    name: str
    role: str
    csrf: str

    @property
    def can_act(self) -> bool:
        return role_allows(self.role, "operator")


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def open_session(conn: Connection, token_id: int, *, now: float) -> str:
    """Store a new session for ``token_id``; returns its id (the cookie value)."""
    conn.execute(delete(console_sessions).where(console_sessions.c.expires_at <= now))
    session_id = secrets.token_urlsafe(32)
    conn.execute(
        insert(console_sessions).values(
            id_hash=_digest(session_id),
            token_id=token_id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            last_used_at=now,
            expires_at=now + IDLE_S,
        )
    )
    return session_id


def find_session(
    conn: Connection, session_id: str, *, now: float, touch: bool = True
) -> ConsoleUser | None:
    """The session's user if it exists, has not expired and its token is not revoked;
    ``touch`` counts this as a use (the session lasts 12 h more)."""
    s, t = console_sessions, api_tokens
    row = conn.execute(
        select(s.c.id_hash, s.c.csrf, s.c.last_used_at, t.c.id, t.c.name, t.c.role)
        .join(t, t.c.id == s.c.token_id)
        .where(
            s.c.id_hash == _digest(session_id),
            s.c.expires_at > now,
            t.c.revoked_at.is_(None),
        )
    ).first()
    if row is None:
        return None
    if touch and now - row.last_used_at >= TOUCH_EVERY_S:
        conn.execute(
            update(s)
            .where(s.c.id_hash == row.id_hash)
            .values(last_used_at=now, expires_at=now + IDLE_S)
        )
    return ConsoleUser(token_id=int(row.id), name=str(row.name), role=str(row.role), csrf=row.csrf)


def close_session(conn: Connection, session_id: str) -> None:
    conn.execute(delete(console_sessions).where(console_sessions.c.id_hash == _digest(session_id)))


def session_user(request: Request) -> ConsoleUser | None:
    """The request's console user (cached on ``request.state``), or None."""
    cached: ConsoleUser | None = getattr(request.state, "console_user", None)
    if cached is not None:
        return cached
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 128:
        return None
    with request.app.state.db.begin() as conn:
        user = find_session(conn, session_id, now=request.app.state.clock())
    request.state.console_user = user
    return user


def viewer(request: Request) -> ConsoleUser:
    """Dependency of every page: the logged-in user (any role), else a redirect to login."""
    user = session_user(request)
    if user is None:
        raise LoginRequired
    return user


async def read_form(request: Request) -> dict[str, str]:
    """The url-encoded form of a POST (the last value of a repeated field wins)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PageError(413, f"the form is larger than {MAX_FORM_BYTES} bytes; send less")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PageError(400, "the form is not UTF-8; send it from the console's page") from None
    return dict(parse_qsl(text, keep_blank_values=True))


def check_csrf(user: ConsoleUser, form: dict[str, Any]) -> None:
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(
        sent.encode("utf-8"), user.csrf.encode("utf-8")
    ):
        raise PageError(
            403,
            "the form's CSRF value is missing or wrong (the session may have changed): "
            "reload the page and submit again",
        )


def check_role(user: ConsoleUser, need: Role) -> None:
    if not role_allows(user.role, need):
        raise PageError(
            403,
            f"token {user.name!r} has role {user.role}; this needs {need} or higher: "
            f"log in with a token made by `edgefleet tokens create --role {need}`",
        )


async def posted(request: Request, need: Role = "viewer") -> tuple[ConsoleUser, dict[str, str]]:
    """A POST's user and form after the session, CSRF and role checks (403 on failure)."""
    form = await read_form(request)
    from starlette.concurrency import run_in_threadpool

    user = await run_in_threadpool(viewer, request)
    check_csrf(user, form)
    check_role(user, need)
    return user, form


async def operator_form(request: Request) -> tuple[ConsoleUser, dict[str, str]]:
    """Dependency of action URLs: an operator (or admin) session and a valid CSRF field."""
    return await posted(request, "operator")


async def any_form(request: Request) -> tuple[ConsoleUser, dict[str, str]]:
    """Dependency of POSTs any role may make (logout): a session and a valid CSRF field."""
    return await posted(request, "viewer")
