"""The fleet console: server-rendered HTML pages under /ui on the controller's own app.

``install(app)`` adds the console's routes, its security headers (a strict CSP on every /ui
answer) and its error pages. Pages read the database through the same functions as the API
(``controller.fleet``, ``controller.rollouts``); actions call the same rollout commands.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.console.live import PATH as LIVE_PATH
from controller.console.live import router as live_router
from controller.console.pages_device import router as device_router
from controller.console.pages_fleet import router as fleet_router
from controller.console.pages_login import router as login_router
from controller.console.pages_models import router as models_router
from controller.console.pages_rollouts import router as rollouts_router
from controller.console.render import render
from controller.console.session import LoginRequired, PageError

PREFIX = "/ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """ASGI middleware: every answer under /ui gets the console's CSP and related headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    response = render(request, "error.html", status_code=exc.status_code, error=exc.message)
    response.headers.update(exc.headers)
    return response


def _login_required(request: Request, exc: Exception) -> Response:
    if request.url.path == LIVE_PATH:
        return Response("log in first: /ui/login\n", status_code=401, media_type="text/plain")
    return RedirectResponse(f"{PREFIX}/login", status_code=303)


def install(app: FastAPI) -> None:
    """Serve the console under /ui on ``app`` (uses ``app.state.db``, ``clock``,
    ``auth_limiter`` and, for golden samples, ``models``)."""
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(PageError, _page_error)
    app.add_exception_handler(LoginRequired, _login_required)
    for router in (
        login_router,
        fleet_router,
        device_router,
        models_router,
        rollouts_router,
        live_router,
    ):
        app.include_router(router, prefix=PREFIX, include_in_schema=False)
