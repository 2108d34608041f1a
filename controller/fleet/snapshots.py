"""Camera snapshots: the latest JPEG per device and stream (table ``device_snapshots``).

The ingest path (``controller.fleet.writes``) stores a ``snapshot`` message with
:func:`write_snapshots`: one row per (device, stream), replaced only by a snapshot with a
newer ``ts`` (a retained snapshot delivered again after a reconnect, or an older one
arriving late, changes nothing). The API and the console read them with
:func:`list_snapshots` (no image bytes) and :func:`read_snapshot`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from sqlalchemy import Connection, Table, func, select

from controller.db.models import DeviceSnapshot
from controller.db.sql import upsert
from protocol import Snapshot

JPEG_SOI = b"\xff\xd8\xff"
"""The first bytes of every JPEG file (start-of-image marker and the next marker's 0xFF)."""

_table = cast(Table, DeviceSnapshot.__table__)


def jpeg_bytes(snapshot: Snapshot) -> bytes | None:
    """The snapshot's JPEG file, or None when ``jpeg`` is not base64 of a JPEG."""
    try:
        data = base64.b64decode(snapshot.jpeg, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(JPEG_SOI) else None


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A stored snapshot without its image."""

    stream: str
    ts: float
    received_at: float
    model: str | None
    width: int
    height: int
    detections: list[dict[str, Any]]
    bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotImage:
    """A stored snapshot's JPEG and when it was taken."""

    stream: str
    ts: float
    jpeg: bytes


def _row(device_id: str, snapshot: Snapshot, received_at: float) -> dict[str, Any] | None:
    jpeg = jpeg_bytes(snapshot)
    if jpeg is None:  # the ingest decoder refuses these; never store one
        return None
    return {
        "device_id": device_id,
        "stream": snapshot.stream,
        "ts": snapshot.ts,
        "received_at": received_at,
        "model": snapshot.model,
        "width": snapshot.width,
        "height": snapshot.height,
        "detections": msgspec.to_builtins(snapshot.detections),
        "jpeg": jpeg,
    }


def write_snapshots(
    conn: Connection, snapshots: Mapping[tuple[str, str], tuple[Snapshot, float]]
) -> None:
    """Store the newest snapshot per (device, stream) of a batch (``(snapshot, received_at)``
    by key); an existing row is replaced only by a newer ``ts``."""
    rows = [
        row
        for (device_id, _), (snapshot, at) in snapshots.items()
        if (row := _row(device_id, snapshot, at)) is not None
    ]
    if not rows:
        return
    stmt = upsert(conn, _table)
    columns = ("ts", "received_at", "model", "width", "height", "detections", "jpeg")
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "stream"],
            set_={name: getattr(stmt.excluded, name) for name in columns},
            where=_table.c.ts < stmt.excluded.ts,
        ),
        rows,
    )


def list_snapshots(conn: Connection, device_id: str) -> list[SnapshotInfo]:
    """The device's snapshots, one per stream, by stream name (without the images)."""
    t = _table.c
    query = (
        select(
            t.stream,
            t.ts,
            t.received_at,
            t.model,
            t.width,
            t.height,
            t.detections,
            func.length(t.jpeg).label("bytes"),
        )
        .where(t.device_id == device_id)
        .order_by(t.stream)
    )
    return [
        SnapshotInfo(
            stream=r.stream,
            ts=r.ts,
            received_at=r.received_at,
            model=r.model,
            width=r.width,
            height=r.height,
            detections=list(r.detections or []),
            bytes=int(r.bytes),
        )
        for r in conn.execute(query)
    ]


def read_snapshot(conn: Connection, device_id: str, stream: str) -> SnapshotImage | None:
    """The latest JPEG of one stream of a device, or None when there is none."""
    t = _table.c
    row = conn.execute(
        select(t.stream, t.ts, t.jpeg).where(t.device_id == device_id, t.stream == stream)
    ).first()
    return None if row is None else SnapshotImage(stream=row.stream, ts=row.ts, jpeg=row.jpeg)
