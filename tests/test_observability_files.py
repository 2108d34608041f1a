"""The Prometheus alert rules and the Grafana dashboard use only metrics the code exports.

Exported names come from the real collectors (agent.metrics.AgentCollector and the
controller's registry over a real SQLite database), rendered with
prometheus_client.generate_latest and parsed back.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentCollector, AgentMetrics, StreamMetrics
from controller import store
from controller.db.session import Database
from controller.ingest import IngestSnapshot
from controller.metrics import build_registry
from protocol import SCHEMA_VERSION, Status, StreamStatus, status_topic

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "packaging" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "edgefleet-fleet.json"

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


def _names_in(expr: str) -> set[str]:
    return set(_NAME.findall(_STRING.sub('""', expr)))


def _labels_in(expr: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(expr):
        found.setdefault(name, set()).update(_MATCHER.findall(matchers))
    return found


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
            store.write_messages(
                conn, [store.Received(status_topic("cam-01"), "cam-01", status, 1000.0)]
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


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _dashboard_queries() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _check_expr(expr: str, where: str) -> None:
    known = _known()
    names = _names_in(expr)
    assert names, f"{where}: {expr!r} uses no edgefleet metric"
    unknown = sorted(names - known.keys())
    assert not unknown, f"{where}: {expr!r} uses metrics the code does not export: {unknown}"
    for name, labels in _labels_in(expr).items():
        missing = sorted(labels - known[name] - TARGET_LABELS)
        assert not missing, f"{where}: {name} has no label(s) {missing}"


def test_collectors_export_the_names_the_checks_rely_on() -> None:
    exported = _exported()
    # counters appear with _total; a labelled gauge of the controller keeps its labels
    assert "edgefleet_stream_frames_processed_total" in exported
    assert "edgefleet_agent_spool_messages" in exported
    assert exported["edgefleet_devices"] == {"state"}
    assert exported["edgefleet_model_devices"] == {"model"}
    assert exported["edgefleet_ingest_lag_seconds"] == {"quantile"}


def test_pending_metrics_are_not_exported_yet() -> None:
    already = sorted(set(PENDING_METRICS) & _exported().keys())
    assert not already, f"{already} are exported now: remove them from PENDING_METRICS"


def test_alert_expressions_use_only_exported_metrics_and_labels() -> None:
    for rule in _rules():
        _check_expr(rule["expr"], f"alert {rule['alert']}")


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    queries = _dashboard_queries()
    assert len(queries) > 15
    for expr in queries:
        _check_expr(expr, "dashboard")


def test_the_name_check_catches_a_misspelled_metric() -> None:
    with pytest.raises(AssertionError, match="does not export"):
        _check_expr("rate(edgefleet_stream_frames_procesed_total[5m])", "test")
    with pytest.raises(AssertionError, match="no label"):
        _check_expr('edgefleet_devices{status="offline"}', "test")


def test_alert_rules_cover_the_fleet_failure_modes() -> None:
    rules = _rules()
    names = {r["alert"] for r in rules}
    assert {
        "DeviceOffline",
        "AgentInferenceLatencyHigh",
        "SpoolGrowing",
        "DetectionRateDrift",
        "StreamDown",
        "IngestLagHigh",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
    drift = next(r for r in rules if r["alert"] == "DetectionRateDrift")
    assert drift["expr"] == "edgefleet_stream_score_psi > 0.25"
    assert drift["for"] == "15m"


def test_dashboard_panels_are_well_formed_and_do_not_overlap() -> None:
    dash = _dashboard()
    assert dash["uid"] == "edgefleet-fleet"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not (mine & cells), f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(set(refs)) == len(refs)
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in (
        "online",
        "offline",
        "ingest",
        "model",
        "per second",
        "p95",
        "latency",
        "dropped",
        "spool",
        "psi",
    ):
        assert topic in titles, f"dashboard has no panel about {topic}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_rules())} rules found" in result.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_unit_tests_fire_the_alerts_on_synthetic_series(tmp_path: Path) -> None:
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'edgefleet_devices{state="offline",instance="ctl"}', "values": "0 1x30"},
                    {"series": 'edgefleet_stream_score_psi{instance="cam",stream="front"}', "values": "0.05x10 0.4x30"},
                    {"series": 'edgefleet_agent_spool_messages{instance="cam"}', "values": "0+50x40"},
                    {"series": 'edgefleet_ingest_lag_seconds{quantile="0.95",instance="ctl"}', "values": "0.1x5 9x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "DeviceOffline", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "DeviceOffline",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "state": "offline", "instance": "ctl"},
                                "exp_annotations": {
                                    "summary": "1 edgefleet device(s) offline",
                                    "description": "The controller counts 1 device(s) whose retained status is offline (clean stop or the broker's last will). List them with `edgefleet devices list --offline`.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "20m", "alertname": "DetectionRateDrift", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "DetectionRateDrift",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "info", "instance": "cam", "stream": "front"},
                                "exp_annotations": {
                                    "summary": "Detection scores drifted on cam/front (PSI 400m)",
                                    "description": "The distribution of detection scores differs significantly (population stability index > 0.25) from the baseline learned when the model became active: the scene, the camera or the model changed. Review samples before trusting the detections.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "12m", "alertname": "IngestLagHigh", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "IngestLagHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "quantile": "0.95", "instance": "ctl"},
                                "exp_annotations": {
                                    "summary": "Controller ingest lag p95 is 9s",
                                    "description": "MQTT messages take more than 5 s from receipt to database commit. Check the database (slow disk, locks) and edgefleet_ingest_queue_depth; add controller replicas with broker.shared_group to split the load.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "10m", "alertname": "SpoolGrowing", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "SpoolGrowing",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "instance": "cam"},
                                "exp_annotations": {
                                    "summary": "Detections spool of cam keeps growing (1000 messages waiting)",
                                    "description": "The agent cannot deliver detections to the broker and stores them on disk; once the spool is full the oldest are dropped (edgefleet_agent_spool_dropped_total). Check the device's network and broker credentials.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
