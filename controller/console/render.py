"""The console's Jinja2 environment (autoescape on) and its HTML responses.

A request with the header ``X-Console-Fragment: main`` gets only the inner HTML of the
page's ``<main>`` (the ``main`` block): console.js swaps it in on a live update.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES = Path(__file__).resolve().parent / "templates"
FRAGMENT_HEADER = "x-console-fragment"


def ago(seconds: float | None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (``never`` for None)."""
    if seconds is None:
        return "never"
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


def utc(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, utc=utc, num=num, size=size)
    return env


ENV = _env()
NO_STORE = {"Cache-Control": "no-store", "Vary": "X-Console-Fragment"}


def render(request: Request, name: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render ``templates/NAME`` (or only its ``main`` block for a fragment request)."""
    context.setdefault("user", getattr(request.state, "console_user", None))
    context.setdefault("error", None)
    context.setdefault("live", None)
    context["request_path"] = request.url.path
    template = ENV.get_template(name)
    if request.headers.get(FRAGMENT_HEADER) == "main" and "main" in template.blocks:
        body = "".join(template.blocks["main"](template.new_context(context)))
    else:
        body = template.render(context)
    return HTMLResponse(body, status_code=status_code, headers=dict(NO_STORE))
