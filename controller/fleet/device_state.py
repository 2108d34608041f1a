"""Writing devices' statuses and reported states (the ingest path, in the caller's
transaction): each only when at least as new as the stored one, and counted in
``devices.state_seq`` (the rollout engine's change counter, ``controller.rollouts.watch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import JSON, BigInteger, Boolean, Connection, bindparam, delete, or_, select, update

from controller.db.models import device_streams, devices
from controller.db.sql import upsert
from protocol import Reported, Status
from protocol.limits import MAX_STREAMS


def _status_stream_rows(device_id: str, status: Status, now: float) -> list[dict[str, Any]]:
    """One row per stream the status names. An ``offline`` status is usually the last will,
    built when the agent connected: it does not know the active models (older agents sent
    ``model: null`` per stream there), so its rows carry no ``active_model`` and the one the
    ``reported`` state or the last online status wrote stays."""
    offline = status.state == "offline"
    rows: dict[str, dict[str, Any]] = {}
    for s in status.streams:
        row: dict[str, Any] = {
            "device_id": device_id,
            "name": s.name,
            "source_state": s.source_state,
            "error": s.error,
            "installed": [],
            "updated_at": now,
        }
        if not offline:
            row["active_model"] = s.model
        rows[s.name] = row
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


_STATUS = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .where(
        or_(
            bindparam("b_unordered", type_=Boolean()),
            devices.c.status_seq.is_(None),
            devices.c.started_at.is_(None),
            devices.c.started_at != bindparam("b_started"),
            devices.c.status_seq <= bindparam("b_seq"),
        )
    )
    .values(
        online=bindparam("b_online"),
        state=bindparam("b_state"),
        status_ts=bindparam("b_ts"),
        agent_version=bindparam("b_version"),
        started_at=bindparam("b_started"),
        facts=bindparam("b_facts", type_=JSON()),
        status_seq=bindparam("b_seq", type_=BigInteger()),
        state_seq=devices.c.state_seq + 1,
    )
)
"""Only a status at least as new as the stored one of the same agent process (``seq``,
``protocol.Status.seq``): replicas may commit a device's statuses out of order. A status
without ``seq`` (an older agent) or of another process is written as it comes."""
_REPORTED = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .where(or_(devices.c.reported_at.is_(None), devices.c.reported_at <= bindparam("b_ts")))
    .values(
        desired_rev=bindparam("b_rev"),
        reported_at=bindparam("b_ts"),
        state_seq=devices.c.state_seq + 1,
    )
)
"""Only a reported state at least as new as the stored one: with several controller replicas
a device's messages are split between them and may be committed out of order. Both this and
``_STATUS`` count the write in ``state_seq`` (the rollout engine's change counter: the stream
rows written after them belong to the same device and transaction)."""


def _upsert_streams(conn: Connection, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    stmt = upsert(conn, device_streams)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "name"],
            set_={name: getattr(stmt.excluded, name) for name in columns},
        ),
        rows,
    )


def _within_stream_cap(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop status rows that would give a device more than MAX_STREAMS streams: a status
    adds stream rows, only a reported state removes them, so a device naming new streams in
    every status would otherwise grow its rows without end."""
    if not rows:
        return rows
    known: dict[str, set[str]] = {}
    ids = sorted({r["device_id"] for r in rows})
    query = select(device_streams.c.device_id, device_streams.c.name).where(
        device_streams.c.device_id.in_(ids)
    )
    for device_id, name in conn.execute(query):
        known.setdefault(device_id, set()).add(name)
    kept = []
    for row in rows:
        names = known.setdefault(row["device_id"], set())
        if row["name"] in names or len(names) < MAX_STREAMS:
            names.add(row["name"])
            kept.append(row)
    return kept


def _still_written(
    conn: Connection, columns: Sequence[Any], wrote: dict[str, tuple[Any, ...]]
) -> set[str]:
    """The devices of ``wrote`` whose ``columns`` hold the values this transaction's guarded
    UPDATE wrote: those it changed (it locked their rows, so no other replica's write came
    in between), not those the guard left alone."""
    if not wrote:
        return set()
    query = select(devices.c.id, *columns).where(devices.c.id.in_(list(wrote)))
    return {d for d, *values in conn.execute(query) if tuple(values) == wrote[d]}


def write_statuses(conn: Connection, statuses: dict[str, tuple[Status, float]]) -> None:
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
                "b_seq": s.seq,
                "b_unordered": s.seq is None,
            }
            for d, (s, _) in statuses.items()
        ],
    )
    # A status older than the stored one of its process (committed by another replica) is
    # left out of the stream rows too.
    ordered = {d: (s.started_at, s.seq) for d, (s, _) in statuses.items() if s.seq is not None}
    kept = _still_written(conn, (devices.c.started_at, devices.c.status_seq), ordered)
    statuses = {d: v for d, v in statuses.items() if d not in ordered or d in kept}
    rows = _within_stream_cap(
        conn, [r for d, (s, at) in statuses.items() for r in _status_stream_rows(d, s, at)]
    )
    # An offline status leaves active_model alone (see _status_stream_rows): its rows go
    # in a statement of their own that neither inserts nor updates that column.
    with_model = [r for r in rows if "active_model" in r]
    without = [r for r in rows if "active_model" not in r]
    _upsert_streams(conn, with_model, ("source_state", "error", "active_model", "updated_at"))
    _upsert_streams(conn, without, ("source_state", "error", "updated_at"))


def write_reports(conn: Connection, reports: dict[str, tuple[Reported, float]]) -> None:
    conn.execute(
        _REPORTED,
        [{"b_id": d, "b_rev": r.desired_rev, "b_ts": r.ts} for d, (r, _) in reports.items()],
    )
    # A report older than the stored one (committed by another replica) is left out.
    wrote = {d: (r.ts,) for d, (r, _) in reports.items()}
    kept = _still_written(conn, (devices.c.reported_at,), wrote)
    reports = {d: v for d, v in reports.items() if d in kept}
    if not reports:
        return
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
