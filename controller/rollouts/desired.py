"""Per-device desired states written by rollouts, and their publication (retained MQTT)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from controller.db.models import device_desired, devices
from controller.db.sql import chunks, from_row, upsert


@dataclass(frozen=True, slots=True)
class DesiredRow:
    device_id: str
    rev: int
    models: dict[str, Any]
    rollout_id: int | None
    published: bool
    updated_at: float
    published_at: float | None


def _desired(row: Any) -> DesiredRow:
    return from_row(
        DesiredRow,
        row,
        rev=int(row.rev),
        models=dict(row.models or {}),
        published=bool(row.published),
    )


def get_desired(conn: Connection, device_ids: Iterable[str]) -> dict[str, DesiredRow]:
    out: dict[str, DesiredRow] = {}
    for chunk in chunks(sorted(set(device_ids))):
        for row in conn.execute(
            select(device_desired).where(device_desired.c.device_id.in_(chunk))
        ):
            out[row.device_id] = _desired(row)
    return out


def write_desired(
    conn: Connection,
    changes: Mapping[str, Mapping[str, dict[str, Any] | None]],
    *,
    rollout_id: int | None,
    now: float,
) -> dict[str, int]:
    """Apply per-device stream changes (a ModelRef dict, or None = back to the baseline) to
    the desired states, each device's ``rev`` one above both its last desired rev and the
    rev it last reported; returns device → new rev. The rows are left unpublished."""
    if not changes:
        return {}
    ids = sorted(changes)
    current = get_desired(conn, ids)
    reported: dict[str, int | None] = {}
    for chunk in chunks(ids):
        for device_id, rev in conn.execute(
            select(devices.c.id, devices.c.desired_rev).where(devices.c.id.in_(chunk))
        ):
            reported[device_id] = rev
    rows = []
    revs: dict[str, int] = {}
    for device_id in ids:
        old = current.get(device_id)
        models = dict(old.models) if old else {}
        for stream, ref in changes[device_id].items():
            if ref is None:
                models.pop(stream, None)
            else:
                models[stream] = dict(ref)
        rev = max(old.rev if old else 0, reported.get(device_id) or 0) + 1
        revs[device_id] = rev
        rows.append(
            {
                "device_id": device_id,
                "rev": rev,
                "models": models,
                "rollout_id": rollout_id,
                "published": False,
                "updated_at": now,
                "published_at": None,
            }
        )
    stmt = upsert(conn, device_desired)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id"],
            set_={
                c: getattr(stmt.excluded, c)
                for c in ("rev", "models", "rollout_id", "published", "updated_at", "published_at")
            },
        ),
        rows,
    )
    return revs


def unpublished_desired(conn: Connection, *, limit: int = 1000) -> list[DesiredRow]:
    query = (
        select(device_desired)
        .where(device_desired.c.published.is_(False))
        .order_by(device_desired.c.updated_at, device_desired.c.device_id)
        .limit(limit)
    )
    return [_desired(r) for r in conn.execute(query)]


_PUBLISHED = (
    update(device_desired)
    .where(
        device_desired.c.device_id == bindparam("b_device"),
        device_desired.c.rev == bindparam("b_rev"),
    )
    .values(published=True, published_at=bindparam("b_now"))
)


def mark_published(conn: Connection, acked: Sequence[tuple[str, int]], *, now: float) -> None:
    """Mark (device, rev) published; a row whose rev changed meanwhile stays unpublished."""
    if acked:
        conn.execute(_PUBLISHED, [{"b_device": d, "b_rev": r, "b_now": now} for d, r in acked])


def mark_all_unpublished(conn: Connection) -> int:
    """Publish every desired state again (the broker may have lost its retained messages)."""
    result = conn.execute(
        update(device_desired).where(device_desired.c.published.is_(True)).values(published=False)
    )
    return int(result.rowcount)
