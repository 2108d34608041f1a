"""Messages of every kind for the protocol-bounds tests (tests/test_protocol_bounds*.py):
valid ones with a field changed, and the figures of the worst case."""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import (
    Detection,
    Detections,
    Event,
    Reported,
    StreamReport,
    StreamTelemetry,
    Telemetry,
)
from protocol import limits as L

F = 1.2345678901234567e-300
"""A float within every non-negative range whose JSON is as long as any (23 characters)."""
BIG = L.MAX_SAFE_INT
REF = "m" * 64 + "@" + "v" * 64


def uid(i: int, n: int = 64) -> str:
    return (f"{i:03d}" + "a" * n)[:n]


def stream_telemetry(name: str = "cam0", **over: Any) -> StreamTelemetry:
    fields: dict[str, Any] = {
        "name": name,
        "source_state": "running",
        "fps": 10.0,
        "frames_captured": 5,
        "frames_processed": 5,
        "frames_dropped": 0,
        "infer_ms_p50": 1.0,
        "infer_ms_p95": None,
        "latency_ms_p50": 2.0,
        "latency_ms_p95": None,
    }
    fields.update(over)
    return StreamTelemetry(**fields)


def telemetry(**over: Any) -> Telemetry:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "interval_s": 10.0,
        "cpu_percent": 50.0,
        "mem_percent": 40.0,
        "mem_used_bytes": 1000,
        "temp_c": 50.0,
        "disk_percent": 30.0,
        "disk_free_bytes": 2000,
        "spool_depth": 3,
        "spool_dropped": 0,
    }
    fields.update(over)
    return Telemetry(**fields)


def event(**over: Any) -> Event:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "code": "source.failed",
        "level": "error",
        "message": "cannot open the camera",
    }
    fields.update(over)
    return Event(**fields)


def reported(**over: Any) -> Reported:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "desired_rev": 7,
        "streams": {"cam0": StreamReport(active="m@2", previous="m@1")},
    }
    fields.update(over)
    return Reported(**fields)


def detections(**over: Any) -> Detections:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "stream": "cam0",
        "seq": 1,
        "frame_ts": 1_800_000_000.0,
        "frame_index": 0,
        "model": "face@1.0.0",
        "infer_ms": 1.5,
        "width": 640,
        "height": 480,
        "detections": [Detection(label="face", score=0.9, box=(0.1, 0.2, 0.3, 0.4))],
    }
    fields.update(over)
    return Detections(**fields)


def with_fields(original: msgspec.Struct, **fields: Any) -> bytes:
    doc = msgspec.to_builtins(original)
    doc.update(fields)
    return msgspec.json.encode(doc)
