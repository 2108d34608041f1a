"""Console entry, login, logout and the two static files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from controller.api.auth import AuthLimiter, client_address
from controller.console.render import render
from controller.console.session import (
    COOKIE,
    COOKIE_PATH,
    ConsoleUser,
    PageError,
    any_form,
    close_session,
    open_session,
    read_form,
    session_user,
)
from controller.fleet.tokens import verify_token

router = APIRouter()

STATIC = Path(__file__).resolve().parent / "static"
_STATIC_TYPES = {"console.css": "text/css", "console.js": "text/javascript"}


@router.get("/")
def index(request: Request) -> Response:
    target = "/ui/fleet" if session_user(request) is not None else "/ui/login"
    return RedirectResponse(target, status_code=303)


@router.get("/static/{name}")
def static(name: str) -> Response:
    media_type = _STATIC_TYPES.get(name)
    if media_type is None:
        raise PageError(404, f"no static file {name!r}")
    body = (STATIC / name).read_bytes()
    return Response(
        body, media_type=f"{media_type}; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/login")
def login_page(request: Request) -> Response:
    if session_user(request) is not None:
        return RedirectResponse("/ui/fleet", status_code=303)
    return render(request, "login.html", user=None)


def _limiter(request: Request) -> AuthLimiter | None:
    limiter: AuthLimiter | None = getattr(request.app.state, "auth_limiter", None)
    return limiter


def _login(request: Request, token: str) -> Response:
    limiter = _limiter(request)
    address = client_address(request)
    if limiter is not None:
        wait = limiter.retry_after(address)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            raise PageError(
                429,
                f"too many failed token attempts from {address}: try again in {seconds}s",
                headers={"Retry-After": str(seconds)},
            )
    if not token:
        return render(request, "login.html", status_code=401, user=None, error="enter an API token")
    now = request.app.state.clock()
    with request.app.state.db.begin() as conn:
        info = verify_token(conn, token, now=now)
        session_id = None if info is None else open_session(conn, info.id, now=now)
    if info is None or session_id is None:
        if limiter is not None:
            limiter.failed(address)
        return render(
            request,
            "login.html",
            status_code=401,
            user=None,
            error="that token is unknown or revoked; create one on the controller host with "
            "`edgefleet tokens create --role viewer --name NAME`",
        )
    response = RedirectResponse("/ui/fleet", status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = await read_form(request)
    return await run_in_threadpool(_login, request, form.get("token", "").strip())


@router.post("/logout")
def logout(
    request: Request, _posted: Annotated[tuple[ConsoleUser, dict[str, str]], Depends(any_form)]
) -> Response:
    session_id = request.cookies.get(COOKIE, "")
    with request.app.state.db.begin() as conn:
        close_session(conn, session_id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response
