"""Composition root of the agent daemon: the only place that builds objects.

Config → sequence counter, spool, publisher → per stream: detector + camera source +
inference pipeline → telemetry loop, metrics endpoint, signal handling.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from agent import __version__
from agent.config import LoadedConfig, StreamConfig, resolve_model
from agent.detector import Detector, load_detector
from agent.errors import AgentError
from agent.facts import collect_facts
from agent.metrics import AgentMetrics, StreamMetrics, serve_metrics
from agent.pipeline import StreamPipeline
from agent.publisher import Publisher
from agent.sequence import SequenceCounter
from agent.sources import FrameSource
from agent.spool import Spool
from agent.stats import StreamStats
from agent.telemetry import TelemetryLoop, build_telemetry, sample_system
from protocol import (
    SCHEMA_VERSION,
    Event,
    Status,
    StreamStatus,
    StreamTelemetry,
    Telemetry,
    encode,
)
from protocol.messages import DeviceState, SourceState

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 4.0
"""SIGTERM to exit: publish `stopping`, stop streams, flush; systemd allows 5 s by default here."""


def tune_process() -> None:
    """Per-process settings for the daemon: one core for inference, the others for capture.

    OpenCV's own thread pool would compete with the inference thread for the same cores
    (measured: the detector's invoke() got 1.5-2x slower); each capture thread already
    runs on its own core.
    """
    import cv2

    cv2.setNumThreads(1)


def _source_uri(loaded: LoadedConfig, source: str) -> str:
    """Resolve relative video file paths against the config file's folder."""
    if "://" in source or source.isdigit() or source.startswith(("v4l2:", "/dev/")):
        return source
    return str(loaded.resolve(source))


class StreamHandle:
    """One configured stream and everything running for it."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.stats = StreamStats()
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
        )

    def metrics(self) -> StreamMetrics:
        snap = self.stats.snapshot()
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
        )


class AgentApp:
    """The device daemon. ``run()`` blocks until SIGTERM/SIGINT or every finite source ended."""

    def __init__(self, loaded: LoadedConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._loaded = loaded
        self._config = loaded.config
        self._clock = clock
        self._started_at = clock()
        self._facts = collect_facts()
        self._stop = threading.Event()
        self._status_lock = threading.Lock()
        self.streams = [StreamHandle(s) for s in self._config.streams if s.enabled]
        self.state_dir = loaded.resolve(self._config.state_dir)
        self._publisher: Publisher | None = None
        self._telemetry: TelemetryLoop | None = None
        self._stop_metrics: Callable[[], None] | None = None

    # --- messages ------------------------------------------------------------------------

    def _status(self, state: DeviceState) -> bytes:
        return encode(
            Status(
                schema=SCHEMA_VERSION,
                device_id=self._config.device_id,
                state=state,
                ts=self._clock(),
                agent_version=__version__,
                started_at=self._started_at,
                streams=[h.status() for h in self.streams],
                facts=self._facts,
            )
        )

    def _event(self, code: str, level: str, message: str, stream: str | None) -> None:
        if self._publisher is None:
            return
        event = Event(
            schema=SCHEMA_VERSION,
            device_id=self._config.device_id,
            ts=self._clock(),
            code=code,
            level=level,  # type: ignore[arg-type]
            message=message,
            stream=stream,
        )
        self._publisher.publish_event(encode(event))

    def _telemetry_message(self, interval_s: float) -> Telemetry:
        assert self._publisher is not None
        return build_telemetry(
            device_id=self._config.device_id,
            interval_s=round(interval_s, 3),
            system=sample_system(self.state_dir),
            streams=[h.telemetry(interval_s) for h in self.streams],
            spool_depth=self._publisher.spool_depth,
            spool_dropped=self._publisher.spool_dropped,
            ts=self._clock(),
        )

    def _metrics(self) -> AgentMetrics:
        pub = self._publisher
        return AgentMetrics(
            mqtt_connected=bool(pub and pub.connected),
            spool_depth=pub.spool_depth if pub else 0,
            spool_dropped=pub.spool_dropped if pub else 0,
            streams=[h.metrics() for h in self.streams],
        )

    def publish_status(self) -> None:
        if self._publisher is not None and not self._stop.is_set():
            with self._status_lock:
                self._publisher.publish_status(self._status("online"))

    # --- lifecycle -----------------------------------------------------------------------

    def _on_source_state(self, handle: StreamHandle) -> Callable[[str, str | None], None]:
        def changed(state: str, error: str | None) -> None:
            previous = handle.state
            handle.state = state  # type: ignore[assignment]
            handle.error = error
            if state in ("failed", "reconnecting") and previous != state:
                log.warning("stream %s: source %s: %s", handle.name, state, error)
                self._event(
                    f"source.{state}",
                    "error" if state == "failed" else "warning",
                    error or state,
                    handle.name,
                )
            elif state == "running" and previous == "reconnecting":
                log.info("stream %s: source is back", handle.name)
                self._event("source.recovered", "info", "source delivers frames again", handle.name)
            self.publish_status()

        return changed

    def _start_stream(self, handle: StreamHandle, next_seq: Callable[[], int]) -> None:
        assert self._publisher is not None
        cfg = handle.config
        base = self._loaded.path.parent if self._loaded.path else Path.cwd()
        try:
            handle.detector = load_detector(
                resolve_model(cfg.model, base),
                backend=cfg.backend,
                threads=cfg.threads,
                min_score=cfg.min_score,
            )
        except AgentError as err:
            handle.state, handle.error = "failed", str(err)
            log.error("stream %s: %s", handle.name, err)
            self._event("model.load_failed", "error", str(err), handle.name)
            return
        handle.source = FrameSource(
            name=cfg.name,
            uri=_source_uri(self._loaded, cfg.source),
            loop=cfg.loop,
            realtime=cfg.realtime,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            on_state=self._on_source_state(handle),
        )
        handle.pipeline = StreamPipeline(
            device_id=self._config.device_id,
            config=cfg,
            source=handle.source,
            detector=handle.detector,
            publish=self._publisher.publish_detections,
            next_seq=next_seq,
            stats=handle.stats,
        )
        handle.pipeline.start()
        handle.source.start()
        log.info(
            "stream %s: %s on %s (%s)",
            handle.name,
            handle.detector.ref,
            cfg.source,
            handle.detector.backend_name,
        )

    def start(self) -> None:
        cfg = self._config
        tune_process()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        seq = SequenceCounter(self.state_dir / "seq.json")
        spool = Spool(self.state_dir / "spool", max_bytes=cfg.spool.max_bytes)
        self._publisher = Publisher(
            device_id=cfg.device_id,
            broker=cfg.broker,
            spool=spool,
            will_payload=self._status("offline"),
            tls_resolver=self._loaded.resolve,
        )
        self._publisher.start()
        for handle in self.streams:
            self._start_stream(handle, seq.next)
        self.publish_status()
        self._telemetry = TelemetryLoop(
            interval_s=cfg.telemetry.interval_s,
            make=self._telemetry_message,
            publish=self._publisher.publish_telemetry,
        )
        self._telemetry.start()
        if cfg.metrics.enabled:
            self._stop_metrics = serve_metrics(
                self._metrics,
                device_id=cfg.device_id,
                version=__version__,
                bind=cfg.metrics.bind,
                port=cfg.metrics.port,
            )
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.bind, cfg.metrics.port)

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Block until a stop is requested or every stream's source has ended."""
        pipelines = [h.pipeline for h in self.streams if h.pipeline is not None]
        while not self._stop.wait(0.2):
            if pipelines and all(p.finished.is_set() for p in pipelines):
                log.info("every source ended; stopping")
                break

    def shutdown(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        pub = self._publisher
        if pub is not None:
            with self._status_lock:
                pub.publish_status(self._status("stopping"))
            # Subscribers see `stopping` before the final `offline` replaces it.
            pub.flush_retained(timeout=0.5)
        self._stop.set()
        for h in self.streams:
            if h.source is not None:
                h.source.stop(timeout=1.0)
        for h in self.streams:
            if h.pipeline is not None:
                h.pipeline.stop(timeout=max(0.1, deadline - time.monotonic() - 2.0))
            h.state = "stopped"
            if h.detector is not None:
                h.detector.close()
        if self._telemetry is not None:
            self._telemetry.stop()
        if self._stop_metrics is not None:
            self._stop_metrics()
        if pub is not None:
            pub.close(
                final_status=self._status("offline"), timeout=max(0.5, deadline - time.monotonic())
            )

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            if self.streams and all(h.pipeline is None for h in self.streams):
                errors = "; ".join(f"{h.name}: {h.error}" for h in self.streams)
                raise AgentError(f"no stream could start ({errors})")
            self.wait()
        finally:
            self.shutdown()
        return 0
