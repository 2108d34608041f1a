"""Periodic device telemetry: system health (psutil) plus per-stream rates and latencies."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.tuning import name_os_threads
from protocol import SCHEMA_VERSION, StreamTelemetry, Telemetry, encode_checked
from protocol.limits import MAX_TEMP_C, MIN_TEMP_C

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SystemSample:
    cpu_percent: float
    mem_percent: float
    mem_used_bytes: int
    temp_c: float | None
    disk_percent: float
    disk_free_bytes: int


def read_temperature() -> float | None:
    """Highest CPU/SoC temperature the OS exposes (Raspberry Pi: cpu_thermal; Jetson: *-thermal).

    Readings outside the protocol's plausible range (a broken or unconnected sensor reports
    e.g. -273 or 6553.5) are left out."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except OSError:
        return None
    temps = [
        t.current
        for entries in sensors.values()
        for t in entries
        if t.current and MIN_TEMP_C <= t.current <= MAX_TEMP_C
    ]
    return round(max(temps), 1) if temps else None


def sample_system(disk_path: Path) -> SystemSample:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    return SystemSample(
        cpu_percent=psutil.cpu_percent(interval=None),
        mem_percent=mem.percent,
        mem_used_bytes=int(mem.total - mem.available),
        temp_c=read_temperature(),
        disk_percent=disk.percent,
        disk_free_bytes=int(disk.free),
    )


class StreamView:
    """What telemetry needs from one stream; implemented by the app's stream handle."""

    name: str

    def telemetry(self, interval_s: float) -> StreamTelemetry:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class SpoolView:
    depth: Callable[[], int]
    dropped: Callable[[], int]


def build_telemetry(
    *,
    device_id: str,
    interval_s: float,
    system: SystemSample,
    streams: Sequence[StreamTelemetry],
    spool_depth: int,
    spool_dropped: int,
    ts: float,
) -> Telemetry:
    return Telemetry(
        schema=SCHEMA_VERSION,
        device_id=device_id,
        ts=ts,
        interval_s=interval_s,
        cpu_percent=system.cpu_percent,
        mem_percent=system.mem_percent,
        mem_used_bytes=system.mem_used_bytes,
        temp_c=system.temp_c,
        disk_percent=system.disk_percent,
        disk_free_bytes=system.disk_free_bytes,
        spool_depth=spool_depth,
        spool_dropped=spool_dropped,
        streams=list(streams),
    )


class TelemetryLoop:
    """Every ``interval_s``: sample, build a Telemetry message, hand it to ``publish``."""

    def __init__(
        self,
        *,
        interval_s: float,
        make: Callable[[float], Telemetry],
        publish: Callable[[bytes], None],
    ) -> None:
        self._interval = interval_s
        self._make = make
        self._publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self.last: Telemetry | None = None

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first reading is relative to this
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        name_os_threads()  # the streams, the publisher and paho's thread are running by now
        last = time.monotonic()
        while not self._stop.wait(self._interval):
            name_os_threads()  # threads started since (a reconnecting camera, a server)
            now = time.monotonic()
            try:
                self.last = self._make(now - last)
                self._publish(encode_checked(self.last, fit=True))
            except Exception:
                log.exception("telemetry failed; will retry next interval")
            last = now
