"""Prometheus endpoint of the agent (off by default).

A custom collector reads the same counters telemetry uses at scrape time, so the
inference loop pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    name: str
    model: str
    up: bool
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    detections: int
    errors: int
    reconnects: int
    infer_seconds_total: float
    infer_ms_p50: float | None
    infer_ms_p95: float | None
    latency_ms_p95: float | None
    last_progress_age_s: float | None
    score_psi: float | None = None
    snapshots: Mapping[str, int] | None = None
    """Snapshots by result (published, too_large, skipped); None with ``[snapshots]`` off."""
    skipped_fps: int = 0
    """Frames not inferred because of the stream's fps cap."""
    skipped_motion: int = 0
    """Frames not inferred because the motion gate saw no change."""
    grab_only: int = 0
    """Frames only grabbed from the source, never converted to an image (motion gating's
    frames between two checks, and frames the fps cap skips); part of ``frames_captured``,
    each one skipped or dropped."""


@dataclass(frozen=True, slots=True)
class AgentMetrics:
    mqtt_connected: bool
    spool_depth: int
    spool_dropped: int
    streams: Sequence[StreamMetrics]


class AgentCollector(Collector):
    def __init__(self, read: Callable[[], AgentMetrics], *, device_id: str, version: str) -> None:
        self._read = read
        self._device_id = device_id
        self._version = version

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self._read()
        info = GaugeMetricFamily(
            "edgefleet_agent_info", "Agent build and identity", labels=["device_id", "version"]
        )
        info.add_metric([self._device_id, self._version], 1)
        yield info
        yield GaugeMetricFamily(
            "edgefleet_agent_mqtt_connected",
            "1 while connected to the broker",
            value=int(m.mqtt_connected),
        )
        yield GaugeMetricFamily(
            "edgefleet_agent_spool_messages",
            "Messages waiting in the on-disk spool",
            value=m.spool_depth,
        )
        yield CounterMetricFamily(
            "edgefleet_agent_spool_dropped",
            "Messages dropped because the spool was full",
            value=m.spool_dropped,
        )
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "up": GaugeMetricFamily(
                "edgefleet_stream_up",
                "1 while the source delivers frames",
                labels=["stream", "model"],
            ),
            "captured": CounterMetricFamily(
                "edgefleet_stream_frames_captured", "Frames read from the source", labels=["stream"]
            ),
            "processed": CounterMetricFamily(
                "edgefleet_stream_frames_processed", "Frames inferred", labels=["stream"]
            ),
            "dropped": CounterMetricFamily(
                "edgefleet_stream_frames_dropped",
                "Frames replaced by a newer one before inference",
                labels=["stream"],
            ),
            "skipped": CounterMetricFamily(
                "edgefleet_stream_frames_skipped",
                "Frames not inferred by choice, by reason (fps cap, motion gate)",
                labels=["stream", "reason"],
            ),
            "grab_only": CounterMetricFamily(
                "edgefleet_stream_frames_grab_only",
                "Frames decoded but never converted to an image (motion gating's frames "
                "between two checks, frames the fps cap skips); part of the captured frames, "
                "each skipped or dropped",
                labels=["stream"],
            ),
            "detections": CounterMetricFamily(
                "edgefleet_stream_detections", "Objects detected", labels=["stream"]
            ),
            "errors": CounterMetricFamily(
                "edgefleet_stream_inference_errors", "Inference failures", labels=["stream"]
            ),
            "reconnects": CounterMetricFamily(
                "edgefleet_stream_source_reconnects", "Source reconnect attempts", labels=["stream"]
            ),
            "infer_total": CounterMetricFamily(
                "edgefleet_stream_inference_seconds",
                "Time spent in model invoke",
                labels=["stream"],
            ),
            "infer_p50": GaugeMetricFamily(
                "edgefleet_stream_inference_p50_seconds",
                "Median inference time, recent frames",
                labels=["stream"],
            ),
            "infer_p95": GaugeMetricFamily(
                "edgefleet_stream_inference_p95_seconds",
                "95th percentile inference time, recent frames",
                labels=["stream"],
            ),
            "latency_p95": GaugeMetricFamily(
                "edgefleet_stream_latency_p95_seconds",
                "95th percentile capture-to-publish latency",
                labels=["stream"],
            ),
            "score_psi": GaugeMetricFamily(
                "edgefleet_stream_score_psi",
                "Drift KPI: PSI of recent detection scores against the active model's baseline",
                labels=["stream"],
            ),
            "snapshots": CounterMetricFamily(
                "edgefleet_agent_snapshots",
                "Camera snapshots by result: published, too_large (over max_bytes even at the "
                "lowest quality and half size: dropped), skipped (replaced by a newer frame "
                "before it was encoded, or failed)",
                labels=["stream", "result"],
            ),
            "progress_age": GaugeMetricFamily(
                "edgefleet_stream_last_inference_age_seconds",
                "Seconds since the last finished inference",
                labels=["stream"],
            ),
        }
        for s in m.streams:
            families["up"].add_metric([s.name, s.model], int(s.up))
            families["captured"].add_metric([s.name], s.frames_captured)
            families["processed"].add_metric([s.name], s.frames_processed)
            families["dropped"].add_metric([s.name], s.frames_dropped)
            families["skipped"].add_metric([s.name, "fps"], s.skipped_fps)
            families["skipped"].add_metric([s.name, "motion"], s.skipped_motion)
            families["grab_only"].add_metric([s.name], s.grab_only)
            families["detections"].add_metric([s.name], s.detections)
            families["errors"].add_metric([s.name], s.errors)
            families["reconnects"].add_metric([s.name], s.reconnects)
            families["infer_total"].add_metric([s.name], s.infer_seconds_total)
            for key, value in (
                ("infer_p50", s.infer_ms_p50),
                ("infer_p95", s.infer_ms_p95),
                ("latency_p95", s.latency_ms_p95),
            ):
                if value is not None:
                    families[key].add_metric([s.name], value / 1000.0)
            if s.score_psi is not None:
                families["score_psi"].add_metric([s.name], s.score_psi)
            for result, n in (s.snapshots or {}).items():
                families["snapshots"].add_metric([s.name, result], n)
            if s.last_progress_age_s is not None:
                families["progress_age"].add_metric([s.name], s.last_progress_age_s)
        yield from families.values()


def serve_metrics(
    read: Callable[[], AgentMetrics], *, device_id: str, version: str, bind: str, port: int
) -> Callable[[], None]:
    """Start the HTTP endpoint on its own registry; return a function that stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(read, device_id=device_id, version=version))
    server, thread = start_http_server(port, addr=bind, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(2.0)

    return stop
