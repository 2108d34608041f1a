"""Writing decoded device messages (the ingest path) in the caller's transaction.

``collect`` sorts a batch of ``Received`` messages by what they update; ``write_batch``
writes it with bulk statements (devices created on their first message, the last
status/reported per device, telemetry and event rows); ``write_messages`` does both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import Connection, bindparam, case, func, insert, update

from controller.db.models import device_streams, devices, events
from controller.db.sql import upsert
from controller.fleet.device_state import write_reports, write_statuses
from controller.fleet.snapshots import write_snapshots
from protocol import Event, Reported, Snapshot, Status, Telemetry

Message = Status | Telemetry | Reported | Event | Snapshot
_JSON = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message waiting to be written; ``received_at`` is controller time."""

    topic: str
    device_id: str
    message: Message
    received_at: float


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
_DEVICE_SUMMARY = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(
        cpu_percent=bindparam("b_cpu"), mem_percent=bindparam("b_mem"), temp_c=bindparam("b_temp")
    )
)
_STREAM_SUMMARY = (
    update(device_streams)
    .where(device_streams.c.device_id == bindparam("b_id"))
    .where(device_streams.c.name == bindparam("b_name"))
    .values(
        fps=bindparam("b_fps"),
        infer_ms_p95=bindparam("b_infer"),
        latency_ms_p95=bindparam("b_latency"),
    )
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
    summaries: dict[str, Telemetry] = field(default_factory=dict)
    """The last telemetry per device (arrival order): the fleet page's summary columns."""
    events: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[tuple[str, str], tuple[Snapshot, float]] = field(default_factory=dict)
    """The newest snapshot per (device, stream) (``controller.fleet.snapshots``)."""


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
            batch.summaries[device_id] = msg
            tele[device_id] = at
        elif isinstance(msg, Status):
            batch.statuses[device_id] = (msg, at)
        elif isinstance(msg, Reported):
            batch.reports[device_id] = (msg, at)
        elif isinstance(msg, Snapshot):
            held = batch.snapshots.get((device_id, msg.stream))
            if held is None or msg.ts > held[0].ts:
                batch.snapshots[(device_id, msg.stream)] = (msg, at)
        else:
            batch.events.append(_event_values(device_id, msg, at))
    batch.seen = {d: Seen(first=first[d], last=last[d], telemetry=tele.get(d)) for d in first}
    return batch


def _create_devices(conn: Connection, seen: dict[str, Seen], known: set[str] | None) -> None:
    new = sorted(d for d in seen if known is None or d not in known)  # lock order: by id
    if new:
        conn.execute(
            upsert(conn, devices).on_conflict_do_nothing(index_elements=["id"]),
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


def _create_and_lock_devices(
    conn: Connection, seen: dict[str, Seen], summaries: dict[str, Telemetry]
) -> None:
    """PostgreSQL, several replicas writing batches that name the same devices: create the
    new ones and row-lock the rest in ONE statement, in id order, so that the UPDATEs after
    it (each in its own order) cannot deadlock with another replica's batch. (A separate
    INSERT and SELECT ... FOR UPDATE still deadlocked: an INSERT waits on another
    transaction's uncommitted row of the same id.)

    The row is written anyway, so the same statement also moves ``last_seen`` and
    ``last_telemetry_at`` forward and sets the latest telemetry's summary (``summaries``):
    two UPDATEs per device fewer than ``touch_devices`` and ``_DEVICE_SUMMARY`` would run."""
    if not seen:
        return
    stmt = upsert(conn, devices)
    new = stmt.excluded

    def summary(column: str) -> Any:  # a device without telemetry in the batch keeps its own
        return case((new.mem_percent.is_(None), devices.c[column]), else_=new[column])

    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "first_seen": func.least(devices.c.first_seen, new.first_seen),
                "last_seen": func.greatest(devices.c.last_seen, new.last_seen),
                "last_telemetry_at": func.greatest(
                    devices.c.last_telemetry_at, new.last_telemetry_at
                ),
                "cpu_percent": summary("cpu_percent"),
                "mem_percent": summary("mem_percent"),
                "temp_c": summary("temp_c"),
            },
        ),
        [
            {
                "id": d,
                "first_seen": seen[d].first,
                "last_seen": seen[d].last,
                "last_telemetry_at": seen[d].telemetry,
                "online": False,
                "facts": {},
                "cpu_percent": t.cpu_percent if (t := summaries.get(d)) else None,
                "mem_percent": t.mem_percent if t else None,
                "temp_c": t.temp_c if t else None,
            }
            for d in sorted(seen)
        ],
    )


def touch_devices(conn: Connection, seen: dict[str, Seen]) -> None:
    """Update last_seen / last_telemetry_at (one UPDATE per device, executemany)."""
    if seen:
        conn.execute(
            _LAST_SEEN,
            [
                {"b_id": d, "b_last_seen": v.last, "b_tele": v.telemetry}
                for d, v in sorted(seen.items())  # lock order: by id (see write_batch)
            ],
        )


def _write_summaries(
    conn: Connection, summaries: dict[str, Telemetry], *, devices_too: bool = True
) -> None:
    """The latest telemetry's summary on the device row (unless ``devices_too`` is False:
    ``_create_and_lock_devices`` wrote it) and on the rows of the streams it names. Only
    stream rows that exist are updated (status and reported states create them, within
    ``MAX_STREAMS``): telemetry never adds streams. Executemany UPDATEs."""
    if devices_too:
        conn.execute(
            _DEVICE_SUMMARY,
            [
                {"b_id": d, "b_cpu": t.cpu_percent, "b_mem": t.mem_percent, "b_temp": t.temp_c}
                for d, t in summaries.items()
            ],
        )
    streams = [
        {
            "b_id": d,
            "b_name": s.name,
            "b_fps": s.fps,
            "b_infer": s.infer_ms_p95,
            "b_latency": s.latency_ms_p95,
        }
        for d, t in summaries.items()
        for s in {s.name: s for s in t.streams}.values()
    ]
    if streams:
        conn.execute(_STREAM_SUMMARY, streams)


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
    postgres = conn.dialect.name == "postgresql"
    if postgres:  # every device row this batch updates, touch too; sets last_seen and summaries
        seen = dict(touch or {})
        for d, v in batch.seen.items():
            seen[d] = seen[d].merge(v) if d in seen else v
        _create_and_lock_devices(conn, seen, batch.summaries)
    else:
        _create_devices(conn, batch.seen, known)
        if touch:
            touch_devices(conn, touch)
    if batch.statuses:
        write_statuses(conn, batch.statuses)
    if batch.reports:
        write_reports(conn, batch.reports)
    if batch.telemetry:
        conn.exec_driver_sql(_telemetry_sql(conn.dialect.name), batch.telemetry)
    if batch.summaries:
        _write_summaries(conn, batch.summaries, devices_too=not postgres)
    if batch.events:
        conn.execute(insert(events), batch.events)
    if batch.snapshots:
        write_snapshots(conn, batch.snapshots)


def write_messages(
    conn: Connection, items: Sequence[Received], *, known: set[str] | None = None
) -> set[str]:
    """Collect and write ``items`` (touching every device); returns the batch's device ids."""
    if not items:
        return set()
    batch = collect(items)
    write_batch(conn, batch, known=known, touch=batch.seen)
    return set(batch.seen)
