"""Counters of the ingestion path (``IngestStats``) and their snapshot (``/metrics``, benchmarks)."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from controller.fleet.writes import Message, Received
from protocol import Event, Reported, Snapshot, Status, Telemetry

Outcome = Literal["queued", "malformed", "ignored", "dropped"]
"""What ``Ingestor.handle`` did with a message."""
_LAG_SAMPLES = 20_000


@dataclass(frozen=True, slots=True)
class IngestSnapshot:
    received: int
    queued: int
    malformed: int
    ignored: int
    dropped: int
    stored: int
    rejected: int
    batches: int
    stored_by_kind: dict[str, int]
    malformed_by_kind: dict[str, int]
    queue_depth: int
    rate_per_s: float
    """Messages stored per second over the last ``rate_window_s``."""
    lag_p50_s: float | None
    """Receipt-to-commit time of recently stored messages."""
    lag_p95_s: float | None
    lag_max_s: float | None
    last_batch_lag_s: float | None
    """Receipt-to-commit time of the oldest message of the last batch."""
    mqtt_connected: bool
    rejected_by_reason: dict[tuple[str, str], int] = field(default_factory=dict)
    """Messages refused (by the protocol's checks or the database), by (kind, reason)."""


@dataclass(slots=True)
class IngestStats:
    """Thread-safe counters of the ingestion path (read by /metrics, tests and benchmarks)."""

    rate_window_s: float = 10.0
    received: int = 0
    queued: int = 0
    malformed: int = 0
    ignored: int = 0
    dropped: int = 0
    stored: int = 0
    rejected: int = 0
    batches: int = 0
    mqtt_connected: bool = False
    last_batch_lag_s: float | None = None
    stored_by_kind: Counter[str] = field(default_factory=Counter)
    malformed_by_kind: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lags: deque[float] = field(default_factory=lambda: deque(maxlen=_LAG_SAMPLES))
    _rate: deque[tuple[float, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: Outcome, kind: str | None = None, reason: str | None = None) -> None:
        """Count one handled message; a ``malformed`` one also by (kind, ``reason``)."""
        with self._lock:
            self.received += 1
            if outcome == "queued":
                self.queued += 1
            elif outcome == "malformed":
                self.malformed += 1
                self.malformed_by_kind[kind or "unknown"] += 1
                self.rejected_by_reason[(kind or "unknown", reason or "invalid")] += 1
            elif outcome == "ignored":
                self.ignored += 1
            else:
                self.dropped += 1

    def record_batch(self, items: list[Received], *, committed_at: float, mono: float) -> None:
        lags = [committed_at - it.received_at for it in items]
        kinds = Counter(kind_name(it.message) for it in items)
        with self._lock:
            self.stored += len(items)
            self.batches += 1
            self.stored_by_kind.update(kinds)
            self._lags.extend(lags)
            self.last_batch_lag_s = max(lags) if lags else None
            self._rate.append((mono, self.stored))
            while self._rate and mono - self._rate[0][0] > self.rate_window_s:
                self._rate.popleft()

    def record_rejected(self, kind: str) -> None:
        with self._lock:
            self.rejected += 1
            self.malformed_by_kind[f"{kind}:database"] += 1
            self.rejected_by_reason[(kind, "database")] += 1

    def snapshot(self, *, queue_depth: int = 0, mono: float | None = None) -> IngestSnapshot:
        now = time.monotonic() if mono is None else mono
        with self._lock:
            lags = sorted(self._lags)
            rate = 0.0
            if self._rate:
                t0, n0 = self._rate[0]
                # Stored since the oldest point of the window, over the window length.
                window = max(now - t0, 1e-3)
                rate = (self.stored - n0) / window if now - t0 <= self.rate_window_s * 2 else 0.0
            return IngestSnapshot(
                received=self.received,
                queued=self.queued,
                malformed=self.malformed,
                ignored=self.ignored,
                dropped=self.dropped,
                stored=self.stored,
                rejected=self.rejected,
                batches=self.batches,
                stored_by_kind=dict(self.stored_by_kind),
                malformed_by_kind=dict(self.malformed_by_kind),
                queue_depth=queue_depth,
                rate_per_s=rate,
                lag_p50_s=_percentile(lags, 0.50),
                lag_p95_s=_percentile(lags, 0.95),
                lag_max_s=lags[-1] if lags else None,
                last_batch_lag_s=self.last_batch_lag_s,
                mqtt_connected=self.mqtt_connected,
                rejected_by_reason=dict(self.rejected_by_reason),
            )

    def reset_lags(self) -> None:
        with self._lock:
            self._lags.clear()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.floor(q * len(sorted_values)))]


def kind_name(message: Message) -> str:
    if isinstance(message, Telemetry):
        return "telemetry"
    if isinstance(message, Status):
        return "status"
    if isinstance(message, Reported):
        return "reported"
    if isinstance(message, Snapshot):
        return "snapshot"
    return "events" if isinstance(message, Event) else "unknown"
