"""Per-device desired states written by rollouts, and their publication (retained MQTT)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, or_, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from controller.db.models import device_desired, devices
from controller.db.sql import chunks, from_row, upsert
from controller.rollouts.faults import (
    DESIRED_WRITE_FAILED,
    MALFORMED_STATE,
    DeviceFault,
    check_models,
    next_rev,
)
from controller.rollouts.faults import (
    REPAIR as _REPAIR,
)

log = logging.getLogger(__name__)


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
    """A stored desired state; DeviceFault when it is not what the engine writes."""
    if not isinstance(row.rev, int) or isinstance(row.rev, bool):
        raise DeviceFault(
            MALFORMED_STATE,
            f"device {row.device_id}'s stored desired rev is {row.rev!r:.80}, not an integer; "
            f"{_REPAIR}",
        )
    return from_row(
        DesiredRow,
        row,
        rev=row.rev,
        models=check_models(row.device_id, row.models),
        published=bool(row.published),
    )


def read_desired(
    conn: Connection, device_ids: Iterable[str]
) -> tuple[dict[str, DesiredRow], dict[str, DeviceFault]]:
    """The stored desired states of these devices, and the faults of those that are malformed."""
    out: dict[str, DesiredRow] = {}
    faults: dict[str, DeviceFault] = {}
    for chunk in chunks(sorted(set(device_ids))):
        for row in conn.execute(
            select(device_desired).where(device_desired.c.device_id.in_(chunk))
        ):
            try:
                out[row.device_id] = _desired(row)
            except DeviceFault as fault:
                faults[row.device_id] = fault
    return out, faults


def get_desired(conn: Connection, device_ids: Iterable[str]) -> dict[str, DesiredRow]:
    """The stored desired states of these devices; DeviceFault if one is malformed."""
    rows, faults = read_desired(conn, device_ids)
    for fault in faults.values():
        raise fault
    return rows


@dataclass(frozen=True, slots=True)
class DesiredWrite:
    revs: dict[str, int]
    """Device → the rev written."""
    faults: dict[str, DeviceFault]
    """Device → why nothing was written for it."""


def write_desired(
    conn: Connection,
    changes: Mapping[str, Mapping[str, dict[str, Any] | None]],
    *,
    rollout_id: int | None,
    now: float,
) -> DesiredWrite:
    """Apply per-device stream changes (a ModelRef dict, or None = back to the baseline) to
    the desired states, each device's ``rev`` one above both its last desired rev and the
    rev it last reported (``faults.next_rev``). The rows are left unpublished.

    One device's problem never stops the others: a device whose stored state is malformed,
    whose next rev would not be JSON-safe, or whose row the database refuses is left as it
    was and reported in ``faults``. Only a lost connection raises (the caller's transaction
    is gone then)."""
    ids = sorted(changes)
    if not ids:
        return DesiredWrite({}, {})
    current, faults = read_desired(conn, ids)
    reported: dict[str, object] = {}
    for chunk in chunks(ids):
        for device_id, rev in conn.execute(
            select(devices.c.id, devices.c.desired_rev).where(devices.c.id.in_(chunk))
        ):
            reported[device_id] = rev
    rows: list[dict[str, Any]] = []
    for device_id in (d for d in ids if d not in faults):
        old = current.get(device_id)
        models = dict(old.models) if old else {}
        for stream, ref in changes[device_id].items():
            if ref is None:
                models.pop(stream, None)
            else:
                models[stream] = dict(ref)
        try:
            rev = next_rev(device_id, old.rev if old else None, reported.get(device_id))
        except DeviceFault as fault:
            faults[device_id] = fault
            continue
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
    for row, err in _upsert_each(conn, rows):
        faults[row["device_id"]] = DeviceFault(
            DESIRED_WRITE_FAILED,
            f"the database refused device {row['device_id']}'s desired state (rev {row['rev']}): "
            f"{_first_line(err)}",
        )
    revs = {r["device_id"]: r["rev"] for r in rows if r["device_id"] not in faults}
    return DesiredWrite(revs, faults)


def upsert_desired(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE of ``device_desired`` rows."""
    stmt = upsert(conn, device_desired)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id"],
            set_={
                c: getattr(stmt.excluded, c)
                for c in ("rev", "models", "rollout_id", "published", "updated_at", "published_at")
            },
        ),
        list(rows),
    )


_REFUSED = (SQLAlchemyError, OverflowError, ValueError, TypeError)
"""What a database driver raises for a row it refuses (constraint, trigger, value it cannot
bind or serialise)."""


def _upsert_each(
    conn: Connection, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any], Exception]]:
    """Upsert ``rows`` in a savepoint; if that fails, each row in its own savepoint. Returns
    the rows the database refused with its error; a lost connection raises."""
    if not rows:
        return []
    try:
        with conn.begin_nested():
            upsert_desired(conn, rows)
        return []
    except _REFUSED as err:
        _raise_if_lost(err)
        log.warning(
            "writing %d desired states failed (%s); writing them one by one", len(rows), err
        )
    refused: list[tuple[Mapping[str, Any], Exception]] = []
    for row in rows:
        try:
            with conn.begin_nested():
                upsert_desired(conn, [row])
        except _REFUSED as err:
            _raise_if_lost(err)
            log.error("the desired state of %s was not written: %s", row["device_id"], err)
            refused.append((row, err))
    return refused


def _raise_if_lost(err: BaseException) -> None:
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        raise err


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


@dataclass(frozen=True, slots=True)
class UnpublishedPage:
    rows: list[DesiredRow]
    faults: dict[str, DeviceFault]
    """Malformed rows of this page (left unpublished)."""
    last: tuple[float, str] | None
    """(updated_at, device_id) of the page's last row, for the next page; None: empty page."""
    size: int


def unpublished_desired(
    conn: Connection, *, limit: int = 1000, after: tuple[float, str] | None = None
) -> UnpublishedPage:
    """Unpublished desired states by (updated_at, device_id), after ``after``."""
    dd = device_desired
    query = (
        select(dd)
        .where(dd.c.published.is_(False))
        .order_by(dd.c.updated_at, dd.c.device_id)
        .limit(limit)
    )
    if after is not None:
        at, device_id = after
        query = query.where(
            or_(dd.c.updated_at > at, and_(dd.c.updated_at == at, dd.c.device_id > device_id))
        )
    rows: list[DesiredRow] = []
    faults: dict[str, DeviceFault] = {}
    last = None
    size = 0
    for r in conn.execute(query):
        size += 1
        last = (r.updated_at, r.device_id)
        try:
            rows.append(_desired(r))
        except DeviceFault as fault:
            faults[r.device_id] = fault
    return UnpublishedPage(rows, faults, last, size)


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
