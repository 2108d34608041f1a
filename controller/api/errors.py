"""One error shape for every 4xx/5xx answer of the API, and the OpenAPI ``responses`` for it.

Every error body is ``{"detail": "what is wrong and what to do"}``; a 422 for invalid
parameters or body adds ``errors``, one entry per invalid value (``loc``, ``msg``,
``type``), and its ``detail`` joins them as ``query.limit: ...; body.select.0: ...``.
``responses(401, 404, ...)`` documents the codes a route can answer with that shape.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api.params import PATTERN_HINTS


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: path, query, header or body, then the name")
    msg: str = Field(description="what is wrong with the value")
    type: str = Field(description="the kind of error (pydantic's error type)")


class ErrorOut(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="what is wrong and what to do about it")
    errors: list[FieldError] | None = Field(
        default=None, description="422 only: each invalid parameter or body value"
    )


DESCRIPTIONS: dict[int, str] = {
    400: "the body could not be read (not UTF-8 JSON)",
    401: "missing, unknown or revoked bearer token",
    403: "the token's role is too low for this request",
    404: "no such device, token, model or rollout",
    409: "the request conflicts with the current state (see detail)",
    410: "the bundle file is missing from the blob store",
    413: "the request body is too large",
    422: "invalid parameters or body (see detail and errors)",
    429: "too many failed token attempts from this address (Retry-After)",
    503: "this controller does not host models (no blob store configured)",
}


def responses(*codes: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error ``codes`` (descriptions overridable as ``e404=...``)."""
    return {
        code: {
            "model": ErrorOut,
            "description": described.get(f"e{code}", DESCRIPTIONS[code]),
        }
        for code in codes
    }


AUTH = responses(401, 403, 422, 429)
"""What every authenticated route can answer besides its own codes."""


def _clean(text: str, limit: int = 1000) -> str:
    """``text`` safe to send as UTF-8 JSON (lone surrogates escaped), at most ``limit`` chars."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err.get("type") == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
        return PATTERN_HINTS[ctx["pattern"]]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({ctx.get('error', 'decode error')})"
    return str(err.get("msg", "invalid value"))


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        loc = [p if isinstance(p, int) else _clean(str(p), 80) for p in err.get("loc", ())]
        out.append(FieldError(loc=loc, msg=_clean(_message(err)), type=str(err.get("type", ""))))
    return out


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _field_errors(exc)
    parts = [f"{'.'.join(str(p) for p in e.loc)}: {e.msg}" for e in errors[:10]]
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more")
    body = ErrorOut(detail="invalid request: " + "; ".join(parts), errors=errors)
    return JSONResponse(body.model_dump(), status_code=422)


_CLEARER: dict[int, str] = {
    400: "the request body could not be read: send UTF-8 JSON with Content-Type: application/json",
    404: "no such API path {path}; the API is described at /docs and /openapi.json",
    405: "{method} is not allowed on {path}; see the Allow header",
}
"""Messages for the framework's own errors, which say only 'Not Found' and the like."""
_FRAMEWORK_DETAILS = {"There was an error parsing the body", "Not Found", "Method Not Allowed"}


_METHODS = ("get", "put", "post", "delete", "patch")


def _allowed_methods(request: Request) -> str | None:
    """Every method the OpenAPI documents for the request's path (Starlette's 405 lists
    only those of the first route that matched the path)."""
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        request.app.state, "allow_table", None
    )
    if table is None:
        table = []
        for path, ops in request.app.openapi().get("paths", {}).items():
            parts = ["[^/]+" if p.startswith("{") else re.escape(p) for p in path.split("/")]
            methods = [m.upper() for m in _METHODS if m in ops]
            table.append((re.compile("/".join(parts)), methods))
        request.app.state.allow_table = table
    path = request.scope.get("path", "")
    found = sorted({m for pattern, methods in table if pattern.fullmatch(path) for m in methods})
    return ", ".join(found) if found else None


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=headers)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if detail in _FRAMEWORK_DETAILS and exc.status_code in _CLEARER:
        detail = _CLEARER[exc.status_code].format(
            path=_clean(request.url.path, 100), method=request.method
        )
    return JSONResponse(
        ErrorOut(detail=detail).model_dump(exclude_none=True), exc.status_code, headers
    )


def install(app: FastAPI) -> None:
    """Answer validation and HTTP errors of ``app`` in the one error shape."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
