"""The fleet page: every device, 50 per page, filtered, sorted and counted on the server."""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from controller.console.render import render
from controller.console.session import ConsoleUser, PageError, viewer
from controller.fleet.listing import FleetQueryError, fleet_page

router = APIRouter()

PAGE_SIZE = 50
COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("Device", "id"),
    ("State", "state"),
    ("Models", None),
    ("FPS", "fps"),
    ("Inference p95 (ms)", "p95"),
    ("CPU %", "cpu"),
    ("Temp °C", "temp"),
    ("Last seen", "last_seen"),
)
"""(heading, sort key or None) of the table's columns."""
NUMERIC = frozenset({"fps", "p95", "cpu", "temp"})


def _text(request: Request, name: str, limit: int = 200) -> str:
    return request.query_params.get(name, "").strip()[:limit]


@router.get("/fleet")
def fleet(request: Request, _user: Annotated[ConsoleUser, Depends(viewer)]) -> Response:
    q = _text(request, "q")
    tag = _text(request, "tag", 64)
    model = _text(request, "model")
    state = _text(request, "state", 16)
    sort = _text(request, "sort", 16) or "id"
    order = _text(request, "order", 8) or "asc"
    raw_page = _text(request, "page", 9) or "1"
    if not raw_page.isdigit() or int(raw_page) < 1:
        raise PageError(400, f"page {raw_page!r} is not a page number: use 1, 2, ...")
    page = int(raw_page)
    try:
        with request.app.state.db.connect() as conn:
            found = fleet_page(
                conn,
                q=q or None,
                tags=[tag] if tag else [],
                model=model or None,
                state=state or None,
                sort=sort,
                order=order,
                limit=PAGE_SIZE,
                offset=(page - 1) * PAGE_SIZE,
            )
    except FleetQueryError as err:
        raise PageError(400, str(err)) from err
    pages = max(1, math.ceil(found.total / PAGE_SIZE))
    filters = {"q": q, "tag": tag, "model": model, "state": state}
    kept = {k: v for k, v in filters.items() if v}

    def link(**changes: str | int) -> str:
        params: dict[str, str | int] = {**kept, "sort": sort, "order": order, "page": page}
        params.update(changes)
        return "/ui/fleet?" + urlencode(params)

    headers = []
    for title, key in COLUMNS:
        if key is None:
            headers.append({"title": title, "key": None, "href": None, "aria": None, "num": False})
            continue
        next_order = "desc" if key == sort and order == "asc" else "asc"
        aria = None
        if key == sort:
            aria = "ascending" if order == "asc" else "descending"
        headers.append(
            {
                "title": title,
                "key": key,
                "href": link(sort=key, order=next_order, page=1),
                "aria": aria,
            }
        )
    return render(
        request,
        "fleet.html",
        live="fleet",
        fleet=found,
        filters=filters,
        headers=headers,
        page=page,
        pages=pages,
        prev_href=link(page=page - 1) if page > 1 else None,
        next_href=link(page=page + 1) if page < pages else None,
        now=request.app.state.clock(),
    )
