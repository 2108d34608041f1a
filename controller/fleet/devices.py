"""Devices with their streams and tags: queries, tag edits and fleet counts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from controller.db.models import device_streams, device_tags, devices
from controller.db.sql import chunks, from_row, upsert

MAX_TAGS_PER_DEVICE = 64
"""Most tags one device may carry (``set_tags`` refuses more with TooManyTagsError)."""


class TooManyTagsError(ValueError):
    """A tag change would leave a device with more than ``MAX_TAGS_PER_DEVICE`` tags."""


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


def stream_info(row: Any) -> StreamInfo:
    return from_row(
        StreamInfo,
        row,
        installed=list(row.installed or []),
        gate=dict(row.gate) if row.gate else None,
    )


def device_info(row: Any, tags: list[str], streams: list[StreamInfo]) -> DeviceInfo:
    return from_row(
        DeviceInfo,
        row,
        online=bool(row.online),
        facts=dict(row.facts or {}),
        tags=tags,
        streams=streams,
    )


def device_records(conn: Connection, ids: Sequence[str]) -> list[DeviceInfo]:
    """The full records of ``ids`` (as ``devices.get_device`` gives them) in that order,
    with three queries per 500 ids."""
    found: dict[str, Any] = {}
    tag_map: dict[str, list[str]] = defaultdict(list)
    stream_map: dict[str, list[StreamInfo]] = defaultdict(list)
    for part in chunks(ids):
        found.update((r.id, r) for r in conn.execute(select(devices).where(devices.c.id.in_(part))))
        for t in conn.execute(
            select(device_tags).where(device_tags.c.device_id.in_(part)).order_by(device_tags.c.tag)
        ):
            tag_map[t.device_id].append(t.tag)
        for st in conn.execute(
            select(device_streams)
            .where(device_streams.c.device_id.in_(part))
            .order_by(device_streams.c.name)
        ):
            stream_map[st.device_id].append(stream_info(st))
    return [device_info(found[i], tag_map[i], stream_map[i]) for i in ids if i in found]


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
        stream_info(s)
        for s in conn.execute(
            select(device_streams)
            .where(device_streams.c.device_id == device_id)
            .order_by(device_streams.c.name)
        )
    ]
    return device_info(row, tags, streams)


def set_tags(
    conn: Connection, device_id: str, *, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> list[str] | None:
    """Add and remove tags; returns the device's tags, or None if there is no such device.

    Raises TooManyTagsError, changing nothing, when the device would end up with more than
    ``MAX_TAGS_PER_DEVICE`` tags. A no-op update of the device row serialises tag changes
    first (a row lock on PostgreSQL, the write lock on SQLite), so concurrent changes
    cannot pass the limit together.
    """
    touched = conn.execute(
        update(devices).where(devices.c.id == device_id).values(last_seen=devices.c.last_seen)
    )
    if not touched.rowcount:
        return None
    have = set(
        conn.execute(
            select(device_tags.c.tag).where(device_tags.c.device_id == device_id)
        ).scalars()
    )
    after = (have - set(remove)) | (set(add) - set(remove))
    if len(after) > MAX_TAGS_PER_DEVICE:
        raise TooManyTagsError(
            f"device {device_id!r} would have {len(after)} tags; at most "
            f"{MAX_TAGS_PER_DEVICE} per device: remove some (remove=[...]) first"
        )
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
            upsert(conn, device_tags).on_conflict_do_nothing(),
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
