"""The Prometheus alert rules and the Grafana dashboard use only metrics the code exports.

Exported names come from the real collectors (agent.metrics.AgentCollector and the
controller's registry over a real SQLite database), rendered with
prometheus_client.generate_latest and parsed back. The files' own form and what promtool
says of them are tests/test_observability_files.py.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentCollector, AgentMetrics, StreamMetrics
from controller.db.session import Database
from controller.fleet.registry import add_model
from controller.fleet.writes import Received, write_messages
from controller.ingest.stats import IngestSnapshot
from controller.metrics import build_registry
from controller.rollouts import commands
from protocol import SCHEMA_VERSION, Status, StreamStatus, status_topic
from tests.observability_support import alert_rules, dashboard, dashboard_targets

# Metrics the rules and the dashboard may use before the code exports them, with their
# labels (empty: everything they use is exported). test_pending_metrics_are_not_exported_yet
# reminds whoever exports one to remove it here.
PENDING_METRICS: dict[str, frozenset[str]] = {}
TARGET_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus adds to every scraped series."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"\bedgefleet_[a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"\b(edgefleet_[a-zA-Z0-9_:]*)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_LABEL_REF = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")


def _names_in(expr: str) -> set[str]:
    return set(_NAME.findall(_STRING.sub('""', expr)))


def _labels_in(expr: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(expr):
        found.setdefault(name, set()).update(_MATCHER.findall(matchers))
    return found


def _grouping_in(expr: str) -> set[str]:
    """Labels named by by/without/on/ignoring/group_left/group_right clauses."""
    return {
        label.strip()
        for labels in _GROUPING.findall(_STRING.sub('""', expr))
        for label in labels.split(",")
        if label.strip()
    }


def _exposition(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Sample name (and family name, for types without samples) to its label names."""
    text = generate_latest(registry).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        out.setdefault(name, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _agent_metrics() -> dict[str, set[str]]:
    stream = StreamMetrics(
        name="front",
        model="blazeface@1",
        up=True,
        frames_captured=100,
        frames_processed=90,
        frames_dropped=10,
        detections=40,
        errors=1,
        reconnects=2,
        infer_seconds_total=0.09,
        infer_ms_p50=0.6,
        infer_ms_p95=0.9,
        latency_ms_p95=12.0,
        last_progress_age_s=0.1,
        score_psi=0.03,
    )
    sample = AgentMetrics(mqtt_connected=True, spool_depth=3, spool_dropped=1, streams=[stream])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(lambda: sample, device_id="cam-01", version="0.1.0"))
    return _exposition(registry)


def _controller_metrics(tmp: Path) -> dict[str, set[str]]:
    db = Database.from_url(f"sqlite:///{tmp / 'controller.db'}")
    try:
        db.upgrade()
        status = Status(
            schema=SCHEMA_VERSION,
            device_id="cam-01",
            state="online",
            ts=1000.0,
            agent_version="0.1.0",
            started_at=900.0,
            streams=[StreamStatus(name="front", source_state="running", model="blazeface@1")],
        )
        with db.begin() as conn:
            write_messages(conn, [Received(status_topic("cam-01"), "cam-01", status, 1000.0)])
            # a live rollout, so the per-rollout series (and their labels) are exported
            add_model(
                conn,
                name="blazeface",
                version="2",
                sha256="0" * 64,
                size=1,
                runtime="litert",
                manifest={},
                signature=None,
                key_id=None,
                now=1000.0,
            )
            commands.create_rollout(
                conn,
                commands.RolloutRequest(model="blazeface@2", select=["all"], stream="front"),
                now=1000.0,
            )
        snapshot = IngestSnapshot(
            received=10,
            queued=10,
            malformed=1,
            ignored=0,
            dropped=0,
            stored=9,
            rejected=0,
            batches=2,
            stored_by_kind={"status": 1, "telemetry": 8},
            malformed_by_kind={"events": 1},
            queue_depth=0,
            rate_per_s=1.5,
            lag_p50_s=0.01,
            lag_p95_s=0.05,
            lag_max_s=0.1,
            last_batch_lag_s=0.02,
            mqtt_connected=True,
        )
        return _exposition(build_registry(db=db, ingest_snapshot=lambda: snapshot))
    finally:
        db.dispose()


@functools.cache
def _exported() -> dict[str, frozenset[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        merged = {**_agent_metrics(), **_controller_metrics(Path(tmp))}
    return {name: frozenset(labels) for name, labels in merged.items()}


def _known() -> dict[str, frozenset[str]]:
    return {**_exported(), **PENDING_METRICS}


def _dashboard_queries() -> list[str]:
    dash = dashboard()
    exprs = [t["expr"] for t in dashboard_targets()]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _check_expr(expr: str, where: str, *, shown: Iterable[str] = ()) -> None:
    """Metrics exported; matcher labels on their metric; grouping labels and the labels a
    legend or an annotation shows (``shown``) on one of the expression's metrics."""
    known = _known()
    names = _names_in(expr)
    assert names, f"{where}: {expr!r} uses no edgefleet metric"
    unknown = sorted(names - known.keys())
    assert not unknown, f"{where}: {expr!r} uses metrics the code does not export: {unknown}"
    for name, labels in _labels_in(expr).items():
        missing = sorted(labels - known[name] - TARGET_LABELS)
        assert not missing, f"{where}: {name} has no label(s) {missing}"
    anywhere = set(TARGET_LABELS).union(*(known[n] for n in names))
    for kind, labels in (
        ("grouping", _grouping_in(expr)),
        ("shown", set(shown)),
    ):
        missing = sorted(labels - anywhere)
        assert not missing, f"{where}: {kind} label(s) {missing} on none of {sorted(names)}"


def test_collectors_export_the_names_the_checks_rely_on() -> None:
    exported = _exported()
    # counters appear with _total; a labelled gauge of the controller keeps its labels
    assert "edgefleet_stream_frames_processed_total" in exported
    assert "edgefleet_agent_spool_messages" in exported
    assert exported["edgefleet_devices"] == {"state"}
    assert exported["edgefleet_model_devices"] == {"model"}
    assert exported["edgefleet_ingest_lag_seconds"] == {"quantile"}
    assert exported["edgefleet_rollouts"] == {"state"}
    live = {"rollout", "model", "stream"}
    assert exported["edgefleet_rollout_executions"] == live | {"status"}
    assert exported["edgefleet_rollout_stage"] == live
    assert exported["edgefleet_rollout_stages"] == live


def test_pending_metrics_are_not_exported_yet() -> None:
    already = sorted(set(PENDING_METRICS) & _exported().keys())
    assert not already, f"{already} are exported now: remove them from PENDING_METRICS"


def test_alert_expressions_use_only_exported_metrics_and_labels() -> None:
    for rule in alert_rules():
        shown = _LABEL_REF.findall(" ".join(rule["annotations"].values()))
        _check_expr(rule["expr"], f"alert {rule['alert']}", shown=shown)


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    queries = _dashboard_queries()
    assert len(queries) > 15
    for expr in queries:
        _check_expr(expr, "dashboard")
    for target in dashboard_targets():
        legend = _LEGEND.findall(target.get("legendFormat", ""))
        _check_expr(target["expr"], "dashboard", shown=legend)


def test_the_name_check_catches_a_misspelled_metric() -> None:
    with pytest.raises(AssertionError, match="does not export"):
        _check_expr("rate(edgefleet_stream_frames_procesed_total[5m])", "test")
    with pytest.raises(AssertionError, match="no label"):
        _check_expr('edgefleet_devices{status="offline"}', "test")
    with pytest.raises(AssertionError, match="grouping label"):
        _check_expr("sum by (rolout) (edgefleet_rollout_stage)", "test")
    with pytest.raises(AssertionError, match="shown label"):
        _check_expr("edgefleet_rollout_stage", "test", shown=_LEGEND.findall("{{modle}}"))
    _check_expr(
        'sum by (rollout, job) (edgefleet_rollout_executions{status="failed"})',
        "test",
        shown=["rollout", "instance"],
    )
