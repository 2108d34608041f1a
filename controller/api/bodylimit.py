"""A limit on the size of request bodies (JSON bodies: ``MAX_JSON_BODY_BYTES``).

Model uploads are exempt: ``POST /api/v1/models`` streams the bundle to the blob store with
its own limit (``models.max_bundle_bytes``). A larger body gets 413 in the API's error
shape, whether its Content-Length says so up front or it arrives chunked.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXEMPT: frozenset[tuple[str, str]] = frozenset({("POST", "/api/v1/models")})


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes; send less per request"


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 (``exempt``: (method, path) pairs)."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, exempt: frozenset[tuple[str, str]] = EXEMPT
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": _too_large(self.max_bytes)}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException from reading the body: the app's
                    # handler answers it in the error shape.
                    raise HTTPException(status_code=413, detail=_too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)
