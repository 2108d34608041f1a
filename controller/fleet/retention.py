"""Retention of telemetry and events: old raw samples folded into averages, old rows deleted."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select

from controller.db.models import events, telemetry


@dataclass(frozen=True, slots=True)
class RetentionResult:
    downsampled_rows: int = 0
    """Raw telemetry rows folded into averages."""
    buckets_written: int = 0
    deleted_raw: int = 0
    deleted_downsampled: int = 0
    deleted_events: int = 0


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
