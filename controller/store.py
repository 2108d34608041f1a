"""Repository functions: every read and write of the controller's database.

Functions take a SQLAlchemy ``Connection`` (the caller owns the transaction, see
``Database.begin``) and return plain frozen dataclasses. Statements are Core and portable
between SQLite and PostgreSQL; upserts use each dialect's ``ON CONFLICT``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from sqlalchemy import JSON, Connection, and_, bindparam, delete, func, insert, select, update

from controller.db.models import (
    api_tokens,
    device_streams,
    device_tags,
    devices,
    events,
    models,
    telemetry,
)
from protocol import Event, Reported, Status, Telemetry

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
TOKEN_PREFIX = "efc_"  # noqa: S105 - the public prefix of generated tokens, not a secret
_LAST_USED_EVERY_S = 60.0

Message = Status | Telemetry | Reported | Event
_JSON = msgspec.json.Encoder()


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamInfo:
    name: str
    source_state: str | None
    error: str | None
    active_model: str | None
    previous_model: str | None
    installed: list[str]
    phase: str | None
    target: str | None
    reason: str | None
    updated_at: float
    gate: dict[str, Any] | None = None
    """The health gate's evidence for ``target`` (``protocol.GateEvidence`` as JSON)."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    online: bool
    state: str | None
    first_seen: float
    last_seen: float
    status_ts: float | None
    agent_version: str | None
    started_at: float | None
    desired_rev: int | None
    reported_at: float | None
    last_telemetry_at: float | None
    facts: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    streams: list[StreamInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TelemetryRow:
    device_id: str
    ts: float
    resolution_s: int
    samples: int
    interval_s: float
    cpu_percent: float
    mem_percent: float
    mem_used_bytes: int
    temp_c: float | None
    disk_percent: float
    disk_free_bytes: int
    spool_depth: int
    spool_dropped: int
    streams: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    device_id: str
    ts: float
    received_at: float
    code: str
    level: str
    message: str
    stream: str | None
    phase: str | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: Role
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class RetentionResult:
    downsampled_rows: int = 0
    """Raw telemetry rows folded into averages."""
    buckets_written: int = 0
    deleted_raw: int = 0
    deleted_downsampled: int = 0
    deleted_events: int = 0


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message waiting to be written; ``received_at`` is controller time."""

    topic: str
    device_id: str
    message: Message
    received_at: float


# --- dialect helpers --------------------------------------------------------------------


def _upsert(conn: Connection, table: Any) -> Any:
    """``insert(table)`` with the dialect's ON CONFLICT support."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)
    raise NotImplementedError(f"unsupported database dialect {conn.dialect.name}")


# --- tokens -----------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """sha256 hex of the token: tokens are 256-bit random, so a plain hash is enough."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def role_allows(have: str, need: Role) -> bool:
    return have in ROLES and ROLES.index(have) >= ROLES.index(need)


def _token_info(row: Any) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def create_token(conn: Connection, *, name: str, role: Role, now: float) -> tuple[TokenInfo, str]:
    """Create a token; returns its info and the token itself (shown once, stored as a hash)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    prefix = token[: len(TOKEN_PREFIX) + 6]
    result = conn.execute(
        insert(api_tokens)
        .values(name=name, role=role, token_hash=hash_token(token), prefix=prefix, created_at=now)
        .returning(api_tokens.c.id)
    )
    token_id = int(result.scalar_one())
    info = TokenInfo(
        id=token_id,
        name=name,
        role=role,
        prefix=prefix,
        created_at=now,
        last_used_at=None,
        revoked_at=None,
    )
    return info, token


def verify_token(conn: Connection, token: str, *, now: float) -> TokenInfo | None:
    """The token's info if it exists and is not revoked; None otherwise."""
    digest = hash_token(token)
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
        return None
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY_S:
        conn.execute(update(api_tokens).where(api_tokens.c.id == row.id).values(last_used_at=now))
    return _token_info(row)


def list_tokens(conn: Connection, *, include_revoked: bool = False) -> list[TokenInfo]:
    query = select(api_tokens).order_by(api_tokens.c.id)
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    return [_token_info(r) for r in conn.execute(query)]


def revoke_token(conn: Connection, token_id: int, *, now: float) -> bool:
    """Revoke by id; False if there is no such active token."""
    result = conn.execute(
        update(api_tokens)
        .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(result.rowcount)


def revoke_tokens_named(conn: Connection, name: str, *, now: float) -> int:
    result = conn.execute(
        update(api_tokens)
        .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)


# --- devices ----------------------------------------------------------------------------


def _stream_info(row: Any) -> StreamInfo:
    return StreamInfo(
        name=row.name,
        source_state=row.source_state,
        error=row.error,
        active_model=row.active_model,
        previous_model=row.previous_model,
        installed=list(row.installed or []),
        phase=row.phase,
        target=row.target,
        reason=row.reason,
        updated_at=row.updated_at,
        gate=dict(row.gate) if row.gate else None,
    )


def _device_info(row: Any, tags: list[str], streams: list[StreamInfo]) -> DeviceInfo:
    return DeviceInfo(
        id=row.id,
        online=bool(row.online),
        state=row.state,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        status_ts=row.status_ts,
        agent_version=row.agent_version,
        started_at=row.started_at,
        desired_rev=row.desired_rev,
        reported_at=row.reported_at,
        last_telemetry_at=row.last_telemetry_at,
        facts=dict(row.facts or {}),
        tags=tags,
        streams=streams,
    )


def list_devices(
    conn: Connection,
    *,
    tags: Sequence[str] = (),
    online: bool | None = None,
    model: str | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> list[DeviceInfo]:
    """Devices ordered by id; ``tags`` must all be present, ``model`` active on any stream."""
    query = select(devices).order_by(devices.c.id).limit(limit).offset(offset)
    for tag in tags:
        query = query.where(
            devices.c.id.in_(select(device_tags.c.device_id).where(device_tags.c.tag == tag))
        )
    if online is not None:
        query = query.where(devices.c.online.is_(online))
    if model is not None:
        query = query.where(
            devices.c.id.in_(
                select(device_streams.c.device_id).where(device_streams.c.active_model == model)
            )
        )
    rows = list(conn.execute(query))
    ids = [r.id for r in rows]
    tag_map: dict[str, list[str]] = defaultdict(list)
    stream_map: dict[str, list[StreamInfo]] = defaultdict(list)
    if ids:
        for t in conn.execute(
            select(device_tags).where(device_tags.c.device_id.in_(ids)).order_by(device_tags.c.tag)
        ):
            tag_map[t.device_id].append(t.tag)
        for s in conn.execute(
            select(device_streams)
            .where(device_streams.c.device_id.in_(ids))
            .order_by(device_streams.c.name)
        ):
            stream_map[s.device_id].append(_stream_info(s))
    return [_device_info(r, tag_map[r.id], stream_map[r.id]) for r in rows]


def get_device(conn: Connection, device_id: str) -> DeviceInfo | None:
    row = conn.execute(select(devices).where(devices.c.id == device_id)).first()
    if row is None:
        return None
    tags = list(
        conn.execute(
            select(device_tags.c.tag)
            .where(device_tags.c.device_id == device_id)
            .order_by(device_tags.c.tag)
        ).scalars()
    )
    streams = [
        _stream_info(s)
        for s in conn.execute(
            select(device_streams)
            .where(device_streams.c.device_id == device_id)
            .order_by(device_streams.c.name)
        )
    ]
    return _device_info(row, tags, streams)


def set_tags(
    conn: Connection, device_id: str, *, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> list[str] | None:
    """Add and remove tags; returns the device's tags, or None if there is no such device."""
    if conn.execute(select(devices.c.id).where(devices.c.id == device_id)).first() is None:
        return None
    to_remove = sorted(set(remove))
    if to_remove:
        conn.execute(
            delete(device_tags).where(
                device_tags.c.device_id == device_id, device_tags.c.tag.in_(to_remove)
            )
        )
    to_add = sorted(set(add) - set(to_remove))
    if to_add:
        conn.execute(
            _upsert(conn, device_tags).on_conflict_do_nothing(),
            [{"device_id": device_id, "tag": t} for t in to_add],
        )
    return list(
        conn.execute(
            select(device_tags.c.tag)
            .where(device_tags.c.device_id == device_id)
            .order_by(device_tags.c.tag)
        ).scalars()
    )


def device_counts(conn: Connection) -> dict[str, int]:
    """``{"online": n, "offline": m}``."""
    counts = {"online": 0, "offline": 0}
    for online, n in conn.execute(
        select(devices.c.online, func.count()).group_by(devices.c.online)
    ):
        counts["online" if online else "offline"] += int(n)
    return counts


def model_counts(conn: Connection) -> dict[str, int]:
    """Active model (``name@version``) to the number of devices running it on any stream."""
    query = (
        select(device_streams.c.active_model, func.count(func.distinct(device_streams.c.device_id)))
        .where(device_streams.c.active_model.is_not(None))
        .group_by(device_streams.c.active_model)
    )
    return {str(m): int(n) for m, n in conn.execute(query)}


# --- telemetry and events ---------------------------------------------------------------


def _telemetry_row(row: Any) -> TelemetryRow:
    return TelemetryRow(
        device_id=row.device_id,
        ts=row.ts,
        resolution_s=row.resolution_s,
        samples=row.samples,
        interval_s=row.interval_s,
        cpu_percent=row.cpu_percent,
        mem_percent=row.mem_percent,
        mem_used_bytes=row.mem_used_bytes,
        temp_c=row.temp_c,
        disk_percent=row.disk_percent,
        disk_free_bytes=row.disk_free_bytes,
        spool_depth=row.spool_depth,
        spool_dropped=row.spool_dropped,
        streams=list(row.streams or []),
    )


def telemetry_history(
    conn: Connection,
    device_id: str,
    *,
    since: float | None = None,
    until: float | None = None,
    limit: int = 1000,
) -> list[TelemetryRow]:
    """The newest ``limit`` samples in [since, until), returned oldest first (raw and averaged)."""
    query = select(telemetry).where(telemetry.c.device_id == device_id)
    if since is not None:
        query = query.where(telemetry.c.ts >= since)
    if until is not None:
        query = query.where(telemetry.c.ts < until)
    query = query.order_by(telemetry.c.ts.desc(), telemetry.c.id.desc()).limit(limit)
    return [_telemetry_row(r) for r in reversed(list(conn.execute(query)))]


def count_telemetry(conn: Connection, device_id: str | None = None) -> int:
    query = select(func.count()).select_from(telemetry)
    if device_id is not None:
        query = query.where(telemetry.c.device_id == device_id)
    return int(conn.execute(query).scalar_one())


def list_events(
    conn: Connection,
    *,
    device_id: str | None = None,
    since: float | None = None,
    code: str | None = None,
    level: str | None = None,
    limit: int = 100,
) -> list[EventRow]:
    """The newest ``limit`` matching events, newest first."""
    query = select(events)
    if device_id is not None:
        query = query.where(events.c.device_id == device_id)
    if since is not None:
        query = query.where(events.c.ts >= since)
    if code is not None:
        query = query.where(events.c.code == code)
    if level is not None:
        query = query.where(events.c.level == level)
    query = query.order_by(events.c.ts.desc(), events.c.id.desc()).limit(limit)
    return [
        EventRow(
            id=r.id,
            device_id=r.device_id,
            ts=r.ts,
            received_at=r.received_at,
            code=r.code,
            level=r.level,
            message=r.message,
            stream=r.stream,
            phase=r.phase,
            details=dict(r.details or {}),
        )
        for r in conn.execute(query)
    ]


# --- ingestion --------------------------------------------------------------------------


def _status_stream_rows(device_id: str, status: Status, now: float) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {
        s.name: {
            "device_id": device_id,
            "name": s.name,
            "source_state": s.source_state,
            "error": s.error,
            "active_model": s.model,
            "installed": [],
            "updated_at": now,
        }
        for s in status.streams
    }
    return list(rows.values())


def _reported_stream_rows(device_id: str, rep: Reported, now: float) -> list[dict[str, Any]]:
    return [
        {
            "device_id": device_id,
            "name": name,
            "active_model": s.active,
            "previous_model": s.previous,
            "installed": list(s.installed),
            "phase": s.phase,
            "target": s.target,
            "reason": s.reason,
            "gate": None if s.gate is None else msgspec.to_builtins(s.gate),
            "updated_at": now,
        }
        for name, s in rep.streams.items()
    ]


_TELEMETRY_COLUMNS = (
    "device_id",
    "ts",
    "resolution_s",
    "samples",
    "interval_s",
    "cpu_percent",
    "mem_percent",
    "mem_used_bytes",
    "temp_c",
    "disk_percent",
    "disk_free_bytes",
    "spool_depth",
    "spool_dropped",
    "streams",
)


@functools.cache
def _telemetry_sql(dialect: str) -> str:
    """The raw INSERT for telemetry rows: executemany on the driver, no per-row SQLAlchemy work."""
    if dialect == "postgresql":
        marks = ", ".join(["%s"] * (len(_TELEMETRY_COLUMNS) - 1) + ["%s::json"])
    else:
        marks = ", ".join(["?"] * len(_TELEMETRY_COLUMNS))
    columns = ", ".join(_TELEMETRY_COLUMNS)
    return f"INSERT INTO telemetry ({columns}) VALUES ({marks})"  # noqa: S608 - constants only


def _telemetry_tuple(device_id: str, t: Telemetry) -> tuple[Any, ...]:
    return (
        device_id,
        t.ts,
        0,
        1,
        t.interval_s,
        t.cpu_percent,
        t.mem_percent,
        t.mem_used_bytes,
        t.temp_c,
        t.disk_percent,
        t.disk_free_bytes,
        t.spool_depth,
        t.spool_dropped,
        _JSON.encode(t.streams).decode(),
    )


def _event_values(device_id: str, e: Event, received_at: float) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": e.ts,
        "received_at": received_at,
        "code": e.code,
        "level": e.level,
        "message": e.message,
        "stream": e.stream,
        "phase": e.phase,
        "details": dict(e.details),
    }


_LAST_SEEN = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(
        last_seen=bindparam("b_last_seen"),
        last_telemetry_at=func.coalesce(bindparam("b_tele"), devices.c.last_telemetry_at),
    )
)
_STATUS = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(
        online=bindparam("b_online"),
        state=bindparam("b_state"),
        status_ts=bindparam("b_ts"),
        agent_version=bindparam("b_version"),
        started_at=bindparam("b_started"),
        facts=bindparam("b_facts", type_=JSON()),
    )
)
_REPORTED = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(desired_rev=bindparam("b_rev"), reported_at=bindparam("b_ts"))
)


@dataclass(frozen=True, slots=True)
class Seen:
    """When a device was first/last heard of in a batch, and its last telemetry (or None)."""

    first: float
    last: float
    telemetry: float | None

    def merge(self, newer: Seen) -> Seen:
        return Seen(
            first=min(self.first, newer.first),
            last=max(self.last, newer.last),
            telemetry=newer.telemetry if newer.telemetry is not None else self.telemetry,
        )


@dataclass(slots=True)
class MessageBatch:
    """Decoded messages sorted by what they update (built by ``collect``)."""

    seen: dict[str, Seen] = field(default_factory=dict)
    statuses: dict[str, tuple[Status, float]] = field(default_factory=dict)
    reports: dict[str, tuple[Reported, float]] = field(default_factory=dict)
    telemetry: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def collect(items: Sequence[Received]) -> MessageBatch:
    """Sort a batch: last status/reported per device wins (arrival order), rows for the rest."""
    batch = MessageBatch()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tele: dict[str, float] = {}
    for it in items:
        device_id, msg, at = it.device_id, it.message, it.received_at
        if device_id not in first:
            first[device_id] = at
        last[device_id] = at
        if isinstance(msg, Telemetry):
            batch.telemetry.append(_telemetry_tuple(device_id, msg))
            tele[device_id] = at
        elif isinstance(msg, Status):
            batch.statuses[device_id] = (msg, at)
        elif isinstance(msg, Reported):
            batch.reports[device_id] = (msg, at)
        else:
            batch.events.append(_event_values(device_id, msg, at))
    batch.seen = {d: Seen(first=first[d], last=last[d], telemetry=tele.get(d)) for d in first}
    return batch


def _create_devices(conn: Connection, seen: dict[str, Seen], known: set[str] | None) -> None:
    new = [d for d in seen if known is None or d not in known]
    if new:
        conn.execute(
            _upsert(conn, devices).on_conflict_do_nothing(index_elements=["id"]),
            [
                {
                    "id": d,
                    "first_seen": seen[d].first,
                    "last_seen": seen[d].last,
                    "last_telemetry_at": seen[d].telemetry,
                    "online": False,
                    "facts": {},
                }
                for d in new
            ],
        )


def touch_devices(conn: Connection, seen: dict[str, Seen]) -> None:
    """Update last_seen / last_telemetry_at (one UPDATE per device, executemany)."""
    if seen:
        conn.execute(
            _LAST_SEEN,
            [{"b_id": d, "b_last_seen": v.last, "b_tele": v.telemetry} for d, v in seen.items()],
        )


def _upsert_streams(conn: Connection, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    stmt = _upsert(conn, device_streams)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "name"],
            set_={name: getattr(stmt.excluded, name) for name in columns},
        ),
        rows,
    )


def _write_statuses(conn: Connection, statuses: dict[str, tuple[Status, float]]) -> None:
    conn.execute(
        _STATUS,
        [
            {
                "b_id": d,
                "b_online": s.state == "online",
                "b_state": s.state,
                "b_ts": s.ts,
                "b_version": s.agent_version,
                "b_started": s.started_at,
                "b_facts": dict(s.facts),
            }
            for d, (s, _) in statuses.items()
        ],
    )
    rows = [r for d, (s, at) in statuses.items() for r in _status_stream_rows(d, s, at)]
    _upsert_streams(conn, rows, ("source_state", "error", "active_model", "updated_at"))


def _write_reports(conn: Connection, reports: dict[str, tuple[Reported, float]]) -> None:
    conn.execute(
        _REPORTED,
        [{"b_id": d, "b_rev": r.desired_rev, "b_ts": r.ts} for d, (r, _) in reports.items()],
    )
    for d, (r, _) in reports.items():
        # The reported state is the device's whole truth: streams it no longer has go.
        conn.execute(
            delete(device_streams).where(
                device_streams.c.device_id == d, device_streams.c.name.not_in(list(r.streams))
            )
        )
    rows = [row for d, (r, at) in reports.items() for row in _reported_stream_rows(d, r, at)]
    _upsert_streams(
        conn,
        rows,
        (
            "active_model",
            "previous_model",
            "installed",
            "phase",
            "target",
            "reason",
            "gate",
            "updated_at",
        ),
    )


def write_batch(
    conn: Connection,
    batch: MessageBatch,
    *,
    known: set[str] | None = None,
    touch: dict[str, Seen] | None = None,
) -> None:
    """Write a collected batch in the caller's transaction.

    Devices are created on their first message (``known``: ids known to exist, to skip
    that insert). ``touch`` updates last_seen of those devices; the ingestor passes it
    at most about once a second under load (see ``Ingestor``), so a busy fleet does not
    cost one UPDATE per message.
    """
    _create_devices(conn, batch.seen, known)
    if touch:
        touch_devices(conn, touch)
    if batch.statuses:
        _write_statuses(conn, batch.statuses)
    if batch.reports:
        _write_reports(conn, batch.reports)
    if batch.telemetry:
        conn.exec_driver_sql(_telemetry_sql(conn.dialect.name), batch.telemetry)
    if batch.events:
        conn.execute(insert(events), batch.events)


def write_messages(
    conn: Connection, items: Sequence[Received], *, known: set[str] | None = None
) -> set[str]:
    """Collect and write ``items`` (touching every device); returns the batch's device ids."""
    if not items:
        return set()
    batch = collect(items)
    write_batch(conn, batch, known=known, touch=batch.seen)
    return set(batch.seen)


# --- retention --------------------------------------------------------------------------

_AVG_FLOATS = ("cpu_percent", "mem_percent", "disk_percent")
_AVG_INTS = ("mem_used_bytes", "disk_free_bytes", "spool_depth")
_STREAM_AVG = ("fps", "infer_ms_p50", "infer_ms_p95", "latency_ms_p50", "latency_ms_p95")


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _average_streams(samples: list[Any]) -> list[dict[str, Any]]:
    """Average fps/latencies per stream; other stream fields come from the newest sample."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        for stream in s.streams or []:
            if isinstance(stream, dict) and "name" in stream:
                by_name[str(stream["name"])].append(stream)
    out = []
    for name, entries in by_name.items():
        merged = dict(entries[-1])
        for key in _STREAM_AVG:
            merged[key] = _mean(e.get(key) for e in entries)
        merged["name"] = name
        out.append(merged)
    return out


def _average(device_id: str, bucket: float, size: int, rows: list[Any]) -> dict[str, Any]:
    total = sum(r.samples for r in rows)
    values: dict[str, Any] = {
        "device_id": device_id,
        "ts": bucket,
        "resolution_s": size,
        "samples": total,
        "interval_s": float(size),
        "temp_c": _mean(r.temp_c for r in rows),
        "spool_dropped": max(r.spool_dropped for r in rows),
        "streams": _average_streams(rows),
    }
    for key in _AVG_FLOATS:
        values[key] = sum(getattr(r, key) * r.samples for r in rows) / total
    for key in _AVG_INTS:
        values[key] = round(sum(getattr(r, key) * r.samples for r in rows) / total)
    return values


def _raw_before(before: float, bucket_s: int) -> Any:
    aligned = math.floor(before / bucket_s) * bucket_s
    return and_(telemetry.c.resolution_s == 0, telemetry.c.ts < aligned)


def devices_to_downsample(conn: Connection, *, before: float, bucket_s: int) -> list[str]:
    """Devices with raw samples in whole buckets older than ``before``."""
    query = select(telemetry.c.device_id).where(_raw_before(before, bucket_s)).distinct()
    return list(conn.execute(query).scalars())


def downsample_device(
    conn: Connection, device_id: str, *, before: float, bucket_s: int
) -> tuple[int, int]:
    """Fold one device's raw samples older than ``before`` into ``bucket_s`` averages.

    Only whole buckets are folded (``before`` is rounded down to a bucket boundary).
    Returns (raw rows folded, buckets written).
    """
    raw = and_(_raw_before(before, bucket_s), telemetry.c.device_id == device_id)
    rows = list(conn.execute(select(telemetry).where(raw).order_by(telemetry.c.ts, telemetry.c.id)))
    buckets: dict[float, list[Any]] = defaultdict(list)
    for r in rows:
        buckets[math.floor(r.ts / bucket_s) * bucket_s].append(r)
    averaged = [_average(device_id, b, bucket_s, rs) for b, rs in sorted(buckets.items())]
    if averaged:
        conn.execute(insert(telemetry), averaged)
    conn.execute(delete(telemetry).where(raw))
    return len(rows), len(averaged)


def apply_retention(
    begin: Callable[[], AbstractContextManager[Connection]],
    *,
    now: float,
    telemetry_raw_s: float,
    telemetry_downsample_s: int,
    telemetry_downsampled_s: float,
    events_s: float,
) -> RetentionResult:
    """Downsample (or delete) old raw telemetry, delete old averages and old events.

    ``begin`` opens a transaction (``Database.begin``); every device's downsampling and
    every delete gets its own, so the ingest writer never waits long for the database.
    """
    folded = written = deleted_raw = 0
    raw_cutoff = now - telemetry_raw_s
    if telemetry_downsample_s > 0:
        with begin() as conn:
            ids = devices_to_downsample(conn, before=raw_cutoff, bucket_s=telemetry_downsample_s)
        for device_id in ids:
            with begin() as conn:
                f, w = downsample_device(
                    conn, device_id, before=raw_cutoff, bucket_s=telemetry_downsample_s
                )
            folded += f
            written += w
    else:
        with begin() as conn:
            deleted_raw = conn.execute(
                delete(telemetry).where(telemetry.c.resolution_s == 0, telemetry.c.ts < raw_cutoff)
            ).rowcount
    with begin() as conn:
        deleted_avg = conn.execute(
            delete(telemetry).where(
                telemetry.c.resolution_s > 0, telemetry.c.ts < now - telemetry_downsampled_s
            )
        ).rowcount
    with begin() as conn:
        deleted_events = conn.execute(delete(events).where(events.c.ts < now - events_s)).rowcount
    return RetentionResult(
        downsampled_rows=folded,
        buckets_written=written,
        deleted_raw=int(deleted_raw),
        deleted_downsampled=int(deleted_avg),
        deleted_events=int(deleted_events),
    )


# --- models (OTA bundles) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    version: str
    sha256: str
    size: int
    runtime: str
    manifest: dict[str, Any]
    signature: str | None
    key_id: str | None
    download_key: str
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class DuplicateModelError(Exception):
    """``name@version`` is already stored (raised inside the caller's transaction)."""


def _model_info(row: Any) -> ModelInfo:
    return ModelInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        runtime=row.runtime,
        manifest=row.manifest,
        signature=row.signature,
        key_id=row.key_id,
        download_key=row.download_key,
        created_at=row.created_at,
    )


def add_model(
    conn: Connection,
    *,
    name: str,
    version: str,
    sha256: str,
    size: int,
    runtime: str,
    manifest: dict[str, Any],
    signature: str | None,
    key_id: str | None,
    now: float,
) -> ModelInfo:
    """Insert a model; raise DuplicateModelError when ``name@version`` exists."""
    from sqlalchemy.exc import IntegrityError

    if get_model(conn, name, version) is not None:
        raise DuplicateModelError(f"{name}@{version}")
    values: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": sha256,
        "size": size,
        "runtime": runtime,
        "manifest": manifest,
        "signature": signature,
        "key_id": key_id,
        "download_key": secrets.token_urlsafe(24),
        "created_at": now,
    }
    try:
        model_id = conn.execute(insert(models).values(**values).returning(models.c.id))
        values["id"] = int(model_id.scalar_one())
    except IntegrityError as err:  # a concurrent upload won; the caller's transaction rolls back
        raise DuplicateModelError(f"{name}@{version}") from err
    return ModelInfo(**values)


def get_model(conn: Connection, name: str, version: str) -> ModelInfo | None:
    row = conn.execute(
        select(models).where(models.c.name == name, models.c.version == version)
    ).first()
    return None if row is None else _model_info(row)


def list_models(conn: Connection, *, name: str | None = None) -> list[ModelInfo]:
    """Models, newest first (optionally only versions of ``name``)."""
    query = select(models).order_by(models.c.created_at.desc(), models.c.id.desc())
    if name is not None:
        query = query.where(models.c.name == name)
    return [_model_info(r) for r in conn.execute(query)]
