"""The fleet page: one page of devices with their latest telemetry summary, filtered,
sorted and counted on the server, fast at 10,000 devices on SQLite and PostgreSQL.

``fleet_page`` runs one query for the fleet's counts, one for the page's device ids in
order (filters, sort key, ``LIMIT``/``OFFSET``; with filters, a window ``count(*)`` in the
same query gives the number matching), then the rows, tags and streams of just the page's
ids. ``page_ids`` is the ids query alone (``GET /api/v1/devices`` uses it with the full
device records, ``devices.device_records``).

No index serves a text search (``q``: substring scans of ids, tags and models) or the
``fps``/``p95`` sort (an aggregate over streams): both scan the tables, tens of ms at
10,000 devices (bench/fleet.py, docs/controller.md). Unfiltered, the ``id`` sort walks
the primary key and stops after the page; a tag filter uses ``ix_device_tags_tag``.

Sort keys: ``id``, ``state``, ``last_seen``, ``cpu``, ``temp``, ``agent``, ``fps`` (the
largest over the device's streams) and ``p95`` (the largest ``infer_ms_p95``). Missing
values (NULL) come last in both orders; ties are broken by ascending id, so pages never
overlap or skip a device while the data stays put.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    func,
    or_,
    select,
)

from controller.db.models import device_streams, device_tags, devices
from controller.db.sql import chunks
from controller.errors import ControllerError

SortKey = Literal["id", "state", "last_seen", "cpu", "temp", "fps", "p95", "agent"]
Order = Literal["asc", "desc"]
StateFilter = Literal["online", "offline", "revoked"]
SORT_KEYS: Final[tuple[str, ...]] = get_args(SortKey)
ORDERS: Final[tuple[str, ...]] = get_args(Order)
STATES: Final[tuple[str, ...]] = get_args(StateFilter)
MAX_PAGE: Final = 10_000
"""Largest ``limit`` (``GET /api/v1/fleet`` allows 1000, ``GET /api/v1/devices`` 10,000)."""
MAX_QUERY_LEN: Final = 200
"""Longest free-text ``q``."""


class FleetQueryError(ControllerError, ValueError):
    """A fleet listing was asked for an unknown sort key, order or state, or a bad page."""


@dataclass(frozen=True, slots=True)
class FleetStream:
    name: str
    active_model: str | None
    fps: float | None
    infer_ms_p95: float | None
    latency_ms_p95: float | None
    phase: str | None


@dataclass(frozen=True, slots=True)
class FleetRow:
    id: str
    online: bool
    state: str | None
    agent_version: str | None
    last_seen: float
    cpu_percent: float | None
    mem_percent: float | None
    temp_c: float | None
    tags: list[str] = field(default_factory=list)
    streams: list[FleetStream] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FleetPage:
    """``total``: devices matching the filters; ``counts``: the whole fleet's ``total``,
    ``online``, ``offline`` (not online, not revoked) and ``revoked``."""

    rows: list[FleetRow]
    total: int
    counts: dict[str, int]
    limit: int
    offset: int
    sort: str
    order: str


def _check(sort: str, order: str, state: str | None, limit: int, offset: int) -> None:
    if sort not in SORT_KEYS:
        raise FleetQueryError(f"unknown sort key {sort!r}: use one of {', '.join(SORT_KEYS)}")
    if order not in ORDERS:
        raise FleetQueryError(f"unknown sort order {order!r}: use asc or desc")
    if state is not None and state not in STATES:
        raise FleetQueryError(
            f"unknown state filter {state!r}: use one of {', '.join(STATES)} (or none for all)"
        )
    if not 1 <= limit <= MAX_PAGE:
        raise FleetQueryError(f"limit {limit} is out of range: use 1 to {MAX_PAGE}")
    if offset < 0:
        raise FleetQueryError(f"offset {offset} is negative: use 0 or more")


def _revoked() -> ColumnElement[bool]:
    return devices.c.state == "revoked"


def _text_match(column: ColumnElement[Any], needle: str, dialect: str) -> ColumnElement[bool]:
    """``column`` contains ``needle`` in any case, LIKE wildcards taken literally. SQLite's
    LIKE already ignores ASCII case (ids, tags and model names are ASCII), and an index-free
    scan without ``lower()`` is about 3x faster there; PostgreSQL's LIKE needs ``lower()``
    (faster than ILIKE)."""
    if dialect == "sqlite":
        return column.contains(needle, autoescape=True)
    return func.lower(column).contains(needle.lower(), autoescape=True)


def _filters(
    dialect: str,
    *,
    q: str | None,
    tags: Sequence[str],
    model: str | None,
    state: str | None,
    online: bool | None = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if q:
        if len(q) > MAX_QUERY_LEN:
            raise FleetQueryError(
                f"the search text is {len(q)} characters long: use at most {MAX_QUERY_LEN}"
            )
        where.append(
            or_(
                _text_match(devices.c.id, q, dialect),
                devices.c.id.in_(
                    select(device_tags.c.device_id).where(
                        _text_match(device_tags.c.tag, q, dialect)
                    )
                ),
                devices.c.id.in_(
                    select(device_streams.c.device_id).where(
                        _text_match(device_streams.c.active_model, q, dialect)
                    )
                ),
            )
        )
    where.extend(
        devices.c.id.in_(select(device_tags.c.device_id).where(device_tags.c.tag == tag))
        for tag in tags
    )
    if model is not None:
        where.append(
            devices.c.id.in_(
                select(device_streams.c.device_id).where(device_streams.c.active_model == model)
            )
        )
    if online is not None:
        where.append(devices.c.online.is_(online))
    if state == "online":
        where.append(devices.c.online.is_(True))
    elif state == "offline":
        where.append(and_(devices.c.online.is_(False), or_(devices.c.state.is_(None), ~_revoked())))
    elif state == "revoked":
        where.append(_revoked())
    return where


def _ordered(query: Select[Any], sort: str, order: str) -> Select[Any]:
    """``query`` ordered by ``sort``: NULLs last in both orders, then ascending id."""
    if sort == "id":
        return query.order_by(devices.c.id.desc() if order == "desc" else devices.c.id)
    key: ColumnElement[Any]
    nullable = True
    if sort in {"fps", "p95"}:
        # Join the streams, then group by device: cheaper on both databases than joining
        # a grouped subquery (SQLite walks both primary keys in order).
        column = device_streams.c.fps if sort == "fps" else device_streams.c.infer_ms_p95
        query = query.select_from(
            devices.outerjoin(device_streams, device_streams.c.device_id == devices.c.id)
        ).group_by(devices.c.id)
        key = func.max(column)
    else:
        key = {
            "state": devices.c.state,
            "last_seen": devices.c.last_seen,
            "cpu": devices.c.cpu_percent,
            "temp": devices.c.temp_c,
            "agent": devices.c.agent_version,
        }[sort]
        nullable = sort != "last_seen"
    keys: list[ColumnElement[Any]] = []
    if nullable:
        # Portable NULLS LAST: (key IS NULL) sorts false (0) before true (1) everywhere.
        keys.append(case((key.is_(None), 1), else_=0))
    keys.append(key.desc() if order == "desc" else key.asc())
    return query.order_by(*keys, devices.c.id)


def page_ids(
    conn: Connection,
    *,
    q: str | None = None,
    tags: Sequence[str] = (),
    model: str | None = None,
    state: str | None = None,
    online: bool | None = None,
    sort: str = "id",
    order: str = "asc",
    limit: int = 50,
    offset: int = 0,
) -> list[str]:
    """The ids of one page of matching devices, in order (one query)."""
    _check(sort, order, state, limit, offset)
    where = _filters(conn.dialect.name, q=q, tags=tags, model=model, state=state, online=online)
    query = _ordered(select(devices.c.id).where(*where), sort, order)
    return list(conn.execute(query.limit(limit).offset(offset)).scalars())


def _filtered_page(
    conn: Connection,
    where: list[ColumnElement[bool]],
    sort: str,
    order: str,
    limit: int,
    offset: int,
) -> tuple[list[str], int | None]:
    """A filtered page's ids and, with a window ``count(*)``, how many match (the filters
    are evaluated once, not again by a separate count); None when the page is empty."""
    query = _ordered(select(devices.c.id, func.count().over()).where(*where), sort, order)
    rows = conn.execute(query.limit(limit).offset(offset)).all()
    return [r[0] for r in rows], (int(rows[0][1]) if rows else None)


def count_matching(
    conn: Connection,
    *,
    q: str | None = None,
    tags: Sequence[str] = (),
    model: str | None = None,
    state: str | None = None,
    online: bool | None = None,
) -> int:
    """How many devices match the filters."""
    _check("id", "asc", state, 1, 0)
    where = _filters(conn.dialect.name, q=q, tags=tags, model=model, state=state, online=online)
    return int(conn.execute(select(func.count()).select_from(devices).where(*where)).scalar_one())


def fleet_counts(conn: Connection) -> dict[str, int]:
    """``total``, ``online``, ``offline`` (neither online nor revoked) and ``revoked``."""

    def count(*where: ColumnElement[bool]) -> Any:
        return select(func.count()).select_from(devices).where(*where).scalar_subquery()

    # Three counts in one statement: SQLite answers the first two from indexes.
    total, online, revoked_n = conn.execute(
        select(count(), count(devices.c.online.is_(True)), count(_revoked()))
    ).one()
    total, online, revoked_n = int(total), int(online), int(revoked_n)
    return {
        "total": total,
        "online": online,
        "offline": total - online - revoked_n,
        "revoked": revoked_n,
    }


def fleet_rows(conn: Connection, ids: Sequence[str]) -> list[FleetRow]:
    """The rows of ``ids`` in that order, with their tags and streams (three queries)."""
    if not ids:
        return []
    found: dict[str, Any] = {}
    tag_map: dict[str, list[str]] = defaultdict(list)
    stream_map: dict[str, list[FleetStream]] = defaultdict(list)
    columns = (
        devices.c.id,
        devices.c.online,
        devices.c.state,
        devices.c.agent_version,
        devices.c.last_seen,
        devices.c.cpu_percent,
        devices.c.mem_percent,
        devices.c.temp_c,
    )
    for part in chunks(ids):
        for r in conn.execute(select(*columns).where(devices.c.id.in_(part))):
            found[r.id] = r
        for device_id, tag in conn.execute(
            select(device_tags.c.device_id, device_tags.c.tag)
            .where(device_tags.c.device_id.in_(part))
            .order_by(device_tags.c.device_id, device_tags.c.tag)
        ):
            tag_map[device_id].append(tag)
        for s in conn.execute(
            select(
                device_streams.c.device_id,
                device_streams.c.name,
                device_streams.c.active_model,
                device_streams.c.fps,
                device_streams.c.infer_ms_p95,
                device_streams.c.latency_ms_p95,
                device_streams.c.phase,
            )
            .where(device_streams.c.device_id.in_(part))
            .order_by(device_streams.c.device_id, device_streams.c.name)
        ):
            stream_map[s.device_id].append(
                FleetStream(
                    name=s.name,
                    active_model=s.active_model,
                    fps=s.fps,
                    infer_ms_p95=s.infer_ms_p95,
                    latency_ms_p95=s.latency_ms_p95,
                    phase=s.phase,
                )
            )
    return [
        FleetRow(
            id=r.id,
            online=bool(r.online),
            state=r.state,
            agent_version=r.agent_version,
            last_seen=r.last_seen,
            cpu_percent=r.cpu_percent,
            mem_percent=r.mem_percent,
            temp_c=r.temp_c,
            tags=tag_map[r.id],
            streams=stream_map[r.id],
        )
        for r in (found[i] for i in ids if i in found)
    ]


def fleet_page(
    conn: Connection,
    *,
    q: str | None = None,
    tags: Sequence[str] = (),
    model: str | None = None,
    state: str | None = None,
    sort: str = "id",
    order: str = "asc",
    limit: int = 50,
    offset: int = 0,
) -> FleetPage:
    """One page of the fleet (see the module docstring). Raises FleetQueryError for an
    unknown ``sort``/``order``/``state``, a ``limit`` outside 1..10,000, a negative
    ``offset`` or a ``q`` over 200 characters."""
    _check(sort, order, state, limit, offset)
    where = _filters(conn.dialect.name, q=q, tags=tags, model=model, state=state)
    counts = fleet_counts(conn)
    if where:
        ids, found = _filtered_page(conn, where, sort, order, limit, offset)
        # Past the last match the window count is not there: count on its own.
        total = (
            found
            if found is not None
            else count_matching(conn, q=q, tags=tags, model=model, state=state)
        )
    else:  # no filter: an index walk can stop after the page; the total is the fleet's
        ids = page_ids(conn, sort=sort, order=order, limit=limit, offset=offset)
        total = counts["total"]
    return FleetPage(
        rows=fleet_rows(conn, ids),
        total=total,
        counts=counts,
        limit=limit,
        offset=offset,
        sort=sort,
        order=order,
    )
