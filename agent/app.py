"""Composition root of the agent daemon: the only place that builds objects.

Config → sequence counter, spool, publisher → OTA manager (restart recovery picks each
stream's model) → per stream: detector + camera source + inference pipeline → desired-state
subscription, telemetry loop, metrics endpoint, signal handling.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from agent import __version__
from agent.batching import BatchGroup, attach_batching, close_batches
from agent.config import LoadedConfig, StreamConfig, resolve_model, source_uri
from agent.drift import StreamDrift
from agent.errors import AgentError
from agent.facts import collect_facts
from agent.homeassistant import discovery_messages
from agent.http_api import HttpApi, start_http
from agent.metrics import AgentMetrics, serve_metrics
from agent.ota import OtaError
from agent.ota.manager import OtaManager
from agent.ota.model_store import ModelStore
from agent.ota.services import StreamIO
from agent.ota.shadow import ShadowRunner
from agent.ota.wiring import FAULT_ENV, build_services, fault_hook_from_env
from agent.pipeline import ObserverGroup, StreamPipeline
from agent.publisher import Publisher
from agent.sdnotify import Notifier, ProgressWatchdog, ReadinessGate
from agent.sequence import SequenceCounter
from agent.snapshots import snapshot_worker
from agent.sources import FrameSource
from agent.spool.queue import Spool
from agent.status import StatusMessages
from agent.stream import StreamHandle
from agent.telemetry import TelemetryLoop, build_telemetry, sample_system
from agent.tuning import tune_process as tune_process  # noqa: PLC0414 - benches import it here
from inference.backends import model_family
from inference.detector import Detector, load_detector, read_manifest
from inference.errors import InferenceError
from protocol import (
    SCHEMA_VERSION,
    Event,
    EventLevel,
    Telemetry,
    desired_topic,
    encode_checked,
)
from protocol.messages import DeviceState

log = logging.getLogger(__name__)

NOT_SERVING: frozenset[str] = frozenset({"failed", "ended", "reconnecting"})
"""Source states that count as "reported failed" for systemd readiness: a camera that is not
there does not hold up the other streams."""

SHUTDOWN_BUDGET_S = 4.0
"""SIGTERM to exit: publish `stopping`, stop streams, flush; systemd allows 5 s by default here."""
SOURCE_JOIN_S = 1.0
"""Longest the shutdown waits for the capture threads together; one still inside OpenCV
(a network open/read, bounded by its timeout) is left behind and the process ends without
interpreter finalization (``agent.cli``)."""

EXIT_STREAMS_FAILED = 3
"""``run``'s exit code when the agent stopped on its own (no stream can deliver frames any
more) and a stream had failed (its model did not load, its video file cannot be read):
systemd's ``Restart=on-failure`` restarts it. SIGTERM/SIGINT and files that simply ended: 0."""


class AgentApp:
    """The device daemon. ``run()`` blocks until SIGTERM/SIGINT or every finite source ended."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        """``stop``: an event the caller may already have set (a SIGTERM during startup)."""
        self._loaded = loaded
        self._config = loaded.config
        self._clock = clock
        self._facts = collect_facts()
        self._statuses = StatusMessages(self._config.device_id, clock, self._facts)
        self._stop = stop if stop is not None else threading.Event()
        self._status_lock = threading.Lock()
        self.state_dir = loaded.resolve(self._config.state_dir)
        drift = self._config.drift
        self.streams = [
            StreamHandle(
                s,
                drift=StreamDrift(
                    baseline_path=self.state_dir / "drift" / f"{s.name}.json",
                    window=drift.window,
                    baseline_size=drift.baseline_size,
                ),
            )
            for s in self._config.streams
            if s.enabled
        ]
        self._notifier = Notifier.from_env()
        self._ready = ReadinessGate([h.name for h in self.streams], on_ready=self._on_ready)
        self._watchdog: ProgressWatchdog | None = None
        self._seq: SequenceCounter | None = None
        self._publisher: Publisher | None = None
        self._telemetry: TelemetryLoop | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._ota: OtaManager | None = None
        self._http: HttpApi | None = None
        self._batches: list[BatchGroup] = []

    # --- messages ------------------------------------------------------------------------

    def _status(self, state: DeviceState) -> bytes:
        connection = self._publisher.connections if self._publisher else 0
        streams = [h.status() for h in self.streams]
        return self._statuses.status(state, streams, connection=connection)

    def _event(self, code: str, level: EventLevel, message: str, stream: str | None) -> None:
        if self._publisher is None:
            return
        event = Event(
            schema=SCHEMA_VERSION,
            device_id=self._config.device_id,
            ts=self._clock(),
            code=code,
            level=level,
            message=message,
            stream=stream,
        )
        self._publisher.publish_event(encode_checked(event, fit=True))

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

    def _connection_changed(self, connected: bool) -> None:
        """On every (re)connect retain a fresh status: its ``ts`` says the device is back.

        The sender would otherwise re-send the status retained before the outage, and the
        controller's "last status" would not move (paho's network thread calls this)."""
        if connected:
            self.publish_status()

    # --- lifecycle -----------------------------------------------------------------------

    def _on_source_state(self, handle: StreamHandle) -> Callable[[str, str | None], None]:
        def changed(state: str, error: str | None) -> None:
            previous = handle.state
            handle.state = state  # type: ignore[assignment]
            handle.error = error
            if state in NOT_SERVING:
                self._ready.stream_failed(handle.name)
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

    def _baseline_manifest(self, cfg: StreamConfig) -> Path:
        return resolve_model(
            cfg.model, self._loaded.path.parent if self._loaded.path else Path.cwd()
        )

    def _load_model(self, cfg: StreamConfig, manifest: Path) -> Detector:
        """Load a model for stream ``cfg``; its ``backend`` applies when it runs that format."""
        backend = cfg.backend
        if backend is not None:
            runtime = read_manifest(manifest).runtime
            if model_family(backend) != model_family(runtime):
                backend = None  # an OTA model of another format runs on its own runtime
        return load_detector(
            manifest, backend=backend, threads=cfg.threads, min_score=cfg.min_score
        )

    def _swap(self, handle: StreamHandle, detector: Detector) -> Detector:
        if handle.pipeline is None:
            raise OtaError(
                "stream_not_running",
                f"stream {handle.name} is not running ({handle.error}); fix it and restart the "
                "agent before deploying a model to it",
            )
        old = handle.pipeline.swap_detector(detector)
        handle.detector = detector
        log.info("stream %s: now running %s (was %s)", handle.name, detector.ref, old.ref)
        return old

    def _stream_io(self, handle: StreamHandle) -> StreamIO:
        baseline = self._baseline_manifest(handle.config)
        try:
            baseline_ref: str | None = read_manifest(baseline).ref
        except (AgentError, InferenceError):
            baseline_ref = None
        return StreamIO(
            name=handle.name,
            baseline_manifest=baseline,
            baseline_ref=baseline_ref,
            load=lambda path: self._load_model(handle.config, path),
            swap=lambda detector: self._swap(handle, detector),
            active=lambda: handle.model,
            health=handle.health,
            shadow=lambda runner: self._set_shadow(handle, runner),
        )

    def _set_shadow(self, handle: StreamHandle, runner: ShadowRunner | None) -> None:
        if handle.pipeline is None:
            if runner is None:
                return
            raise OtaError("stream_not_running", f"stream {handle.name} is not running")
        handle.pipeline.set_shadow(runner)

    def _build_ota(self) -> OtaManager:
        assert self._publisher is not None
        cfg = self._config
        store = ModelStore(self.state_dir / "models")
        services = build_services(
            cfg.ota,
            ota_dir=self.state_dir / "ota",
            store=store,
            key_paths=[self._loaded.resolve(k) for k in cfg.ota.trusted_keys],
            runtimes={r for r in str(self._facts.get("runtimes") or "").split(",") if r},
            fault=fault_hook_from_env(os.environ.get(FAULT_ENV)),
        )
        return OtaManager(
            device_id=cfg.device_id,
            services=services,
            streams=[self._stream_io(h) for h in self.streams],
            publish_reported=self._publisher.publish_reported,
            publish_event=self._publisher.publish_event,
            on_change=self.publish_status,
            enabled=cfg.ota.enabled,
            clock=self._clock,
        )

    def _start_stream(
        self, handle: StreamHandle, next_seq: Callable[[], int], installed: Path | None = None
    ) -> None:
        assert self._publisher is not None
        cfg = handle.config
        handle.detector = None
        if installed is not None:
            try:
                handle.detector = self._load_model(cfg, installed)
            except (AgentError, InferenceError) as err:
                log.error("stream %s: installed model: %s; using the baseline", handle.name, err)
                if self._ota is not None:
                    self._ota.startup_failed(handle.name, err)
        try:
            if handle.detector is None:
                handle.detector = self._load_model(cfg, self._baseline_manifest(cfg))
        except (AgentError, InferenceError) as err:
            handle.state, handle.error = "failed", str(err)
            self._ready.stream_failed(handle.name)
            log.error("stream %s: %s", handle.name, err)
            self._event("model.load_failed", "error", str(err), handle.name)
            return
        handle.source = FrameSource(
            name=cfg.name,
            uri=source_uri(self._loaded, cfg.source),
            loop=cfg.loop,
            realtime=cfg.realtime,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            decode_threads=cfg.decode_threads,
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
            observer=ObserverGroup(handle.health, handle.drift, self._ready.observer(handle.name)),
            snapshots=snapshot_worker(self._config, cfg.name, self._publisher.publish_retained),
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
        seq = self._seq = SequenceCounter(self.state_dir / "seq.json")
        spool = Spool(self.state_dir / "spool", max_bytes=cfg.spool.max_bytes)
        self._publisher = Publisher(
            device_id=cfg.device_id,
            broker=cfg.broker,
            spool=spool,
            will_payload=self._statuses.will,
            tls_resolver=self._loaded.resolve,
            on_connection_change=self._connection_changed,
        )
        self._publisher.start()
        if cfg.homeassistant.enabled:
            self._announce_to_home_assistant()
        self._ota = self._build_ota()
        installed = self._ota.recover()
        for handle in self.streams:
            self._start_stream(handle, seq.next, installed.get(handle.name))
        self._batches = attach_batching(self.streams, cfg.batching)
        self.publish_status()
        self._ota.start()
        if self._ota.enabled:
            ota = self._ota
            self._publisher.subscribe(
                desired_topic(cfg.device_id), lambda message: ota.handle_desired(message.payload)
            )
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
        self._http = start_http(self._loaded, self.streams)
        interval = self._notifier.watchdog_interval_s
        if interval is not None:
            self._watchdog = ProgressWatchdog(
                self._notifier,
                interval_s=interval,
                stall_s=cfg.watchdog.stall_s,
                progress=self._progress,
            )
            self._watchdog.start()

    def _announce_to_home_assistant(self) -> None:
        assert self._publisher is not None
        ha = self._config.homeassistant
        for message in discovery_messages(
            device_id=self._config.device_id,
            streams=[h.name for h in self.streams],
            agent_version=__version__,
            off_delay_s=ha.off_delay_s,
            prefix=ha.prefix,
            cameras=self._config.snapshots.enabled,
        ):
            self._publisher.publish_retained(message.topic, message.payload)
        log.info("announced %d streams to Home Assistant (%s/…)", len(self.streams), ha.prefix)

    def _progress(self) -> list[float]:
        """Last inference time of every stream whose source runs (for the systemd watchdog)."""
        return [t for h in self.streams if (t := h.last_progress()) is not None]

    def _on_ready(self) -> None:
        failed = [h.name for h in self.streams if h.state in NOT_SERVING]
        running = len(self.streams) - len(failed)
        text = f"{running} of {len(self.streams)} streams running"
        if failed:
            text += f"; failed: {', '.join(failed)}"
        log.info("ready: %s", text)
        self._notifier.ready(text)

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> int:
        """Block until a stop is requested (returns 0) or no stream can deliver frames any
        more: 0 when every source simply ended, :data:`EXIT_STREAMS_FAILED` when one failed."""
        pipelines = [h.pipeline for h in self.streams if h.pipeline is not None]
        while not self._stop.wait(0.2):
            if pipelines and all(p.finished.is_set() for p in pipelines):
                failed = [f"{h.name}: {h.error}" for h in self.streams if h.state == "failed"]
                if failed:
                    log.error("no stream can deliver frames; failed: %s", "; ".join(failed))
                    return EXIT_STREAMS_FAILED
                log.info("every source ended; stopping")
                return 0
        return 0

    def shutdown(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        self._notifier.stopping()
        if self._watchdog is not None:
            self._watchdog.stop()
        pub = self._publisher
        if pub is not None:
            with self._status_lock:
                pub.publish_status(self._status("stopping"))
            # Subscribers see `stopping` before the final `offline` replaces it.
            pub.flush_retained(timeout=0.5)
        self._stop.set()
        if self._http is not None:
            self._http.stop(timeout=0.5)
        sources = [h.source for h in self.streams if h.source is not None]
        for source in sources:
            source.request_stop()
        if self._ota is not None:
            self._ota.stop(timeout=0.5)
        joined = time.monotonic() + SOURCE_JOIN_S
        for source in sources:
            source.join(joined - time.monotonic())
        for h in self.streams:
            h.stop_pipeline(timeout=max(0.1, deadline - time.monotonic() - 2.0))
        close_batches(self._batches, self.streams)
        if self._seq is not None:
            self._seq.close()
        if self._telemetry is not None:
            self._telemetry.stop()
        if self._stop_metrics is not None:
            self._stop_metrics()
        if pub is not None:
            pub.close(
                final_status=self._status("offline"), timeout=max(0.5, deadline - time.monotonic())
            )

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or no stream can deliver frames; returns the exit code
        (0, or :data:`EXIT_STREAMS_FAILED`; see :meth:`wait`)."""

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
            code = self.wait()
        finally:
            self.shutdown()
        return code
