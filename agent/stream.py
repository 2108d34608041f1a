"""One configured stream on the device and everything running for it.

:class:`StreamHandle` holds a stream's config, its stats, health and drift recorders, the
detector, camera source and inference pipeline once the app started them, and its source
state; it answers for the stream in the status, telemetry and ``/metrics``. The app
(``agent.app``, the composition root) builds and starts the parts.
"""

from __future__ import annotations

import time

from agent.config import StreamConfig
from agent.drift import StreamDrift
from agent.metrics import StreamMetrics
from agent.ota.health import HealthRecorder
from agent.pipeline import StreamPipeline
from agent.sources import FrameSource
from agent.stats import StreamStats
from inference.detector import Detector
from protocol import StreamStatus, StreamTelemetry
from protocol.messages import SourceState

__all__ = ["StreamHandle"]


class StreamHandle:
    """One configured stream and everything running for it."""

    def __init__(self, config: StreamConfig, *, drift: StreamDrift) -> None:
        self.config = config
        self.name = config.name
        self.stats = StreamStats()
        self.health = HealthRecorder()
        self.drift = drift
        self.detector: Detector | None = None
        self.source: FrameSource | None = None
        self.pipeline: StreamPipeline | None = None
        self.state: SourceState = "starting"
        self.error: str | None = None
        self._last_processed = 0

    @property
    def model(self) -> str | None:
        return self.pipeline.detector.ref if self.pipeline else None

    def status(self) -> StreamStatus:
        return StreamStatus(
            name=self.name, source_state=self.state, model=self.model, error=self.error
        )

    def telemetry(self, interval_s: float) -> StreamTelemetry:
        snap = self.stats.snapshot(reset_window=True)
        src = self.source.stats() if self.source else None
        processed = snap.frames_processed - self._last_processed
        self._last_processed = snap.frames_processed
        return StreamTelemetry(
            name=self.name,
            source_state=self.state,
            fps=round(processed / interval_s, 2) if interval_s > 0 else 0.0,
            frames_captured=src.frames_captured if src else 0,
            frames_processed=snap.frames_processed,
            frames_dropped=src.frames_dropped if src else 0,
            infer_ms_p50=snap.infer_ms_p50,
            infer_ms_p95=snap.infer_ms_p95,
            latency_ms_p50=snap.latency_ms_p50,
            latency_ms_p95=snap.latency_ms_p95,
            errors=snap.errors,
            reconnects=src.reconnects if src else 0,
            frames_skipped=self.pipeline.frames_skipped if self.pipeline else 0,
            score_psi=self.drift.psi(),
        )

    def metrics(self) -> StreamMetrics:
        snap = self.stats.snapshot()
        shots = self.pipeline.snapshots if self.pipeline is not None else None
        src = self.source.stats() if self.source else None
        return StreamMetrics(
            name=self.name,
            model=self.model or "",
            up=self.state == "running",
            frames_captured=src.frames_captured if src else 0,
            frames_processed=snap.frames_processed,
            frames_dropped=src.frames_dropped if src else 0,
            detections=snap.detections,
            errors=snap.errors,
            reconnects=src.reconnects if src else 0,
            infer_seconds_total=snap.infer_seconds_total,
            infer_ms_p50=snap.infer_ms_p50,
            infer_ms_p95=snap.infer_ms_p95,
            latency_ms_p95=snap.latency_ms_p95,
            last_progress_age_s=time.monotonic() - snap.last_progress
            if snap.last_progress
            else None,
            score_psi=self.drift.psi(),
            snapshots=shots.counts() if shots is not None else None,
            skipped_fps=self.pipeline.skipped_fps if self.pipeline else 0,
            skipped_motion=self.pipeline.skipped_motion if self.pipeline else 0,
            grab_only=src.frames_grab_only if src else 0,
        )

    def stop_pipeline(self, timeout: float) -> None:
        """Stop the inference thread and close the detector, unless that thread is still
        inside it (closing a model under a running invoke can crash the process)."""
        if self.pipeline is not None:
            self.pipeline.stop(timeout=timeout)
        self.state = "stopped"
        if self.detector is not None and (self.pipeline is None or self.pipeline.finished.is_set()):
            self.detector.close()

    def last_progress(self) -> float | None:
        """Monotonic time of the last finished inference while the source runs, else None."""
        if self.state != "running" or self.pipeline is None:
            return None
        return self.stats.snapshot().last_progress or None
