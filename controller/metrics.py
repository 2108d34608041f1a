"""Prometheus metrics of one controller: a per-app CollectorRegistry, no global state.

Fleet and rollout gauges are read from the database at scrape time; ingest figures come
from the ingestor's counters, API authentication figures from the app's ``AuthLimiter``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.db.session import Database
from controller.fleet.devices import device_counts, model_counts
from controller.ingest.stats import IngestSnapshot
from controller.rollouts import records

log = logging.getLogger(__name__)


class FleetCollector(Collector):
    """Devices online/offline and devices per active model, from the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "edgefleet_devices", "Devices known to the controller, by state", labels=["state"]
        )
        models = GaugeMetricFamily(
            "edgefleet_model_devices",
            "Devices running a model (name@version) on at least one stream",
            labels=["model"],
        )
        up = GaugeMetricFamily("edgefleet_database_up", "1 if the last database query worked")
        try:
            with self.db.connect() as conn:
                counts = device_counts(conn)
                per_model = model_counts(conn)
        except Exception as err:  # noqa: BLE001 - a scrape must answer even when the DB is down
            log.warning("metrics: cannot read the fleet from the database: %s", err)
            up.add_metric([], 0)
            yield up
            return
        for state, n in sorted(counts.items()):
            devices.add_metric([state], n)
        for model, n in sorted(per_model.items()):
            models.add_metric([model], n)
        up.add_metric([], 1)
        yield devices
        yield models
        yield up


def _with_zeros(known: Sequence[str], counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Every known key with its count (0 if absent), then any other key of ``counts``, sorted."""
    return [(k, counts.get(k, 0)) for k in (*known, *sorted(counts.keys() - set(known)))]


class RolloutCollector(Collector):
    """Rollouts by state, and the progress of the live (active or paused) ones, from the database.

    Every state is exported, 0 when no rollout is in it, so alert expressions always have a
    series. A live rollout's series carry its id, model (``name@version``) and stream
    (``*``: every stream); they go away when it ends (its state count then moves). When the
    database is down nothing is exported here: ``edgefleet_database_up`` (FleetCollector)
    says why.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        try:
            with self.db.connect() as conn:
                by_state = records.state_counts(conn)
                live = records.list_rollouts(conn, states=records.LIVE_STATES, limit=None)
                counts = records.status_counts(conn, [r.id for r in live])
        except Exception as err:  # noqa: BLE001 - a scrape must answer even when the DB is down
            log.warning("metrics: cannot read the rollouts from the database: %s", err)
            return
        rollouts = GaugeMetricFamily(
            "edgefleet_rollouts", "Rollouts known to the controller, by state", labels=["state"]
        )
        for state, n in _with_zeros(records.LIVE_STATES + records.ENDED_STATES, by_state):
            rollouts.add_metric([state], n)
        yield rollouts
        labels = ["rollout", "model", "stream"]
        executions = GaugeMetricFamily(
            "edgefleet_rollout_executions",
            "(device, stream) executions of a live rollout, by status",
            labels=[*labels, "status"],
        )
        stage = GaugeMetricFamily(
            "edgefleet_rollout_stage", "Current stage of a live rollout, 1-based", labels=labels
        )
        stages = GaugeMetricFamily(
            "edgefleet_rollout_stages", "Number of stages of a live rollout", labels=labels
        )
        for r in sorted(live, key=lambda r: r.id):
            key = [str(r.id), r.model, r.stream]
            for status, n in _with_zeros(records.DEVICE_STATUSES, counts.get(r.id, {})):
                executions.add_metric([*key, status], n)
            stage.add_metric(key, r.current_stage + 1)
            stages.add_metric(key, len(r.stages))
        yield executions
        yield stage
        yield stages


class IngestCollector(Collector):
    """Ingest counters, rate and lag from ``snapshot()``."""

    def __init__(self, snapshot: Callable[[], IngestSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        stored = CounterMetricFamily(
            "edgefleet_ingest_messages_stored",
            "MQTT messages written to the database, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(s.stored_by_kind.items()):
            stored.add_metric([kind], n)
        yield stored
        malformed = CounterMetricFamily(
            "edgefleet_ingest_messages_malformed",
            "MQTT messages skipped because they break the protocol or the database rejected them",
            labels=["kind"],
        )
        for kind, n in sorted(s.malformed_by_kind.items()):
            malformed.add_metric([kind], n)
        yield malformed
        rejected = CounterMetricFamily(
            "edgefleet_ingest_rejected",
            "MQTT messages refused and not stored, by kind and reason (too_large, not_json, "
            "invalid, out_of_bounds, topic_mismatch, nul, not_jpeg, topic, empty, error, database)",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(s.rejected_by_reason.items()):
            rejected.add_metric([kind, reason], n)
        yield rejected
        for name, value, doc in (
            ("received", s.received, "MQTT messages received"),
            ("dropped", s.dropped, "MQTT messages dropped because the ingest queue was full"),
            ("ignored", s.ignored, "Empty retained messages (cleared topics)"),
            ("batches", s.batches, "Database write batches"),
        ):
            yield CounterMetricFamily(f"edgefleet_ingest_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "edgefleet_ingest_rate_messages_per_second",
            "Messages stored per second over the last 10 s",
            value=s.rate_per_s,
        )
        yield GaugeMetricFamily(
            "edgefleet_ingest_queue_depth", "Messages waiting for the writer", value=s.queue_depth
        )
        lag = GaugeMetricFamily(
            "edgefleet_ingest_lag_seconds",
            "Receipt-to-commit time of recently stored messages",
            labels=["quantile"],
        )
        for q, v in (("0.5", s.lag_p50_s), ("0.95", s.lag_p95_s), ("1", s.lag_max_s)):
            if v is not None:
                lag.add_metric([q], v)
        yield lag
        yield GaugeMetricFamily(
            "edgefleet_mqtt_connected",
            "1 while the controller is connected to the MQTT broker",
            value=1 if s.mqtt_connected else 0,
        )


class AuthCounts(Protocol):
    """What AuthCollector reads (``controller.api.auth.AuthLimiter`` provides it)."""

    failures_total: int
    refused_total: int

    def blocked_addresses(self) -> int: ...


class AuthCollector(Collector):
    """Failed token attempts and the requests refused because their address is blocked."""

    def __init__(self, auth: AuthCounts) -> None:
        self.auth = auth

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "edgefleet_api_auth_failures",
            "API requests with an unknown or revoked bearer token (answered 401)",
            value=self.auth.failures_total,
        )
        yield CounterMetricFamily(
            "edgefleet_api_auth_refused",
            "API requests refused with 429 because their address had too many failed tokens",
            value=self.auth.refused_total,
        )
        yield GaugeMetricFamily(
            "edgefleet_api_auth_blocked_addresses",
            "Client addresses blocked now after too many failed token attempts",
            value=self.auth.blocked_addresses(),
        )


def build_registry(
    *,
    db: Database,
    ingest_snapshot: Callable[[], IngestSnapshot] | None = None,
    auth: AuthCounts | None = None,
) -> CollectorRegistry:
    """A fresh registry for one app (tests may build many side by side)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(db))
    registry.register(RolloutCollector(db))
    if ingest_snapshot is not None:
        registry.register(IngestCollector(ingest_snapshot))
    if auth is not None:
        registry.register(AuthCollector(auth))
    return registry
