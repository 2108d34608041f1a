"""The protocol messages a simulated device sends (status, reported state, telemetry, events)
when it does not act on desired states: plausible values, fresh on every call."""

from __future__ import annotations

import random
from collections.abc import Sequence

from protocol import Event, Reported, Status, StreamReport, StreamStatus, StreamTelemetry, Telemetry

AGENT_VERSION = "sim-0.1.0"
DEFAULT_MODEL = "blazeface-short-int8@1"


def status_message(
    device_id: str,
    *,
    state: str,
    ts: float,
    started_at: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    agent_version: str = AGENT_VERSION,
) -> Status:
    return Status(
        schema=1,
        device_id=device_id,
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version=agent_version,
        started_at=started_at,
        streams=[
            StreamStatus(
                name=s,
                source_state="running" if state == "online" else "stopped",
                model=model,
            )
            for s in streams
        ],
    )


def reported_message(
    device_id: str,
    *,
    ts: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    previous: str | None = None,
    desired_rev: int | None = None,
) -> Reported:
    return Reported(
        schema=1,
        device_id=device_id,
        ts=ts,
        desired_rev=desired_rev,
        streams={
            s: StreamReport(
                active=model,
                previous=previous,
                installed=[m for m in (model, previous) if m],
                phase="idle",
            )
            for s in streams
        },
    )


def telemetry_message(
    device_id: str,
    *,
    ts: float,
    rng: random.Random,
    streams: Sequence[str] = ("cam0",),
    interval_s: float = 10.0,
) -> Telemetry:
    return Telemetry(
        schema=1,
        device_id=device_id,
        ts=ts,
        interval_s=interval_s,
        cpu_percent=round(rng.uniform(5, 90), 1),
        mem_percent=round(rng.uniform(20, 70), 1),
        mem_used_bytes=rng.randrange(200, 900) * 1024 * 1024,
        temp_c=round(rng.uniform(40, 75), 1),
        disk_percent=round(rng.uniform(10, 60), 1),
        disk_free_bytes=rng.randrange(1, 30) * 1024**3,
        spool_depth=0,
        spool_dropped=0,
        streams=[
            StreamTelemetry(
                name=s,
                source_state="running",
                fps=round(rng.uniform(10, 30), 2),
                frames_captured=rng.randrange(100, 1000),
                frames_processed=rng.randrange(100, 1000),
                frames_dropped=rng.randrange(0, 20),
                infer_ms_p50=round(rng.uniform(0.5, 2), 3),
                infer_ms_p95=round(rng.uniform(2, 5), 3),
                latency_ms_p50=round(rng.uniform(5, 20), 3),
                latency_ms_p95=round(rng.uniform(20, 60), 3),
            )
            for s in streams
        ],
    )


def event_message(
    device_id: str, *, ts: float, code: str, level: str = "info", message: str = ""
) -> Event:
    return Event(
        schema=1,
        device_id=device_id,
        ts=ts,
        code=code,
        level=level,  # type: ignore[arg-type]
        message=message or code,
    )
