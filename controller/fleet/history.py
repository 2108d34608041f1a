"""Telemetry and event history of devices (reads; ``writes`` stores, ``retention`` prunes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from controller.db.models import events, telemetry
from controller.db.sql import from_row


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
    return [
        from_row(TelemetryRow, r, streams=list(r.streams or []))
        for r in reversed(list(conn.execute(query)))
    ]


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
    return [from_row(EventRow, r, details=dict(r.details or {})) for r in conn.execute(query)]
