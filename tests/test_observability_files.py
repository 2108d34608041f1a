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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
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

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "packaging" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "packaging" / "prometheus" / "alerts_test.yml"
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
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_LABEL_REF = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
_ALERTS_QUERY = re.compile(r'ALERTS\{alertname="([A-Za-z0-9_]+)",alertstate="firing"\}')
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')

SUMMARIES = {
    "DeviceOffline": "1 edgefleet device(s) offline",
    "RolloutAborted": "1 edgefleet rollout(s) aborted in the last 10 minutes",
    "IngestLagHigh": "Controller ingest lag p95 is 9s",
    "IngestDroppingMessages": "Controller dropped 5 MQTT messages in 10 min",
    "ControllerDatabaseDown": "Controller ctl cannot query its database",
    "ControllerMqttDisconnected": "Controller ctl is not connected to the MQTT broker",
    "StreamDown": "Stream front on cam delivers no results",
    "AgentInferenceLatencyHigh": "Inference p95 250ms on cam/front",
    "SpoolGrowing": "Detections spool of cam keeps growing (1000 messages waiting)",
    "DetectionRateDrift": "Detection scores drifted on cam/front (PSI 400m)",
}
"""Each alert's summary where it first fires in alerts_test.yml."""


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


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _dashboard_targets() -> list[dict[str, Any]]:
    return [t for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _dashboard_queries() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for t in _dashboard_targets()]
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
    for rule in _rules():
        shown = _LABEL_REF.findall(" ".join(rule["annotations"].values()))
        _check_expr(rule["expr"], f"alert {rule['alert']}", shown=shown)


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    queries = _dashboard_queries()
    assert len(queries) > 15
    for expr in queries:
        _check_expr(expr, "dashboard")
    for target in _dashboard_targets():
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
        "RolloutAborted",
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
        "rollout",
        "progress",
        "stage",
    ):
        assert topic in titles, f"dashboard has no panel about {topic}"


# `make promtool` takes the binary out of the Debian package into .venv/tools (nothing is
# installed system-wide); a promtool on PATH is used where that folder has none.
PROMTOOL_LOCAL = REPO / ".venv" / "tools" / "promtool"
PROMTOOL: str | None = str(PROMTOOL_LOCAL) if PROMTOOL_LOCAL.is_file() else shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: run `make promtool`"
)


def _promtool(*args: str | Path) -> str:
    """Run promtool; assert it succeeded and return its standard output."""
    result = subprocess.run(
        [str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _unit_tests() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    return data


def _firing(test: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """Each alert's first case in one test of alerts_test.yml where it fires alone: the
    evaluation time and the alert's labels (those of its ALERTS sample)."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for case in test.get("promql_expr_test", []):
        if len(case["exp_samples"]) != 1:
            continue
        labels = dict(_LABEL_PAIR.findall(case["exp_samples"][0]["labels"]))
        if labels.pop("alertstate", None) == "firing" and "alertname" in labels:
            found.setdefault(labels.pop("alertname"), (case["eval_time"], labels))
    return found


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    assert f"{len(_rules())} rules found" in _promtool("check", "rules", ALERTS)


@needs_promtool
def test_promtool_unit_tests_fire_the_alerts_on_synthetic_series() -> None:
    _promtool("test", "rules", ALERTS_TEST)


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests()["tests"]:
        for case in test.get("promql_expr_test", []):
            alert = _ALERTS_QUERY.fullmatch(case["expr"])
            if alert is not None:
                (fires if case["exp_samples"] else quiet).add(alert[1])
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in _rules()}
    assert not names - fires, f"alerts_test.yml never has {sorted(names - fires)} firing"
    assert not names - quiet, f"alerts_test.yml never has {sorted(names - quiet)} quiet"
    unknown = sorted((fires | quiet) - names)
    assert not unknown, f"alerts_test.yml tests alerts alerts.yml does not have: {unknown}"


@needs_promtool
def test_alert_summaries_show_the_value_and_labels(tmp_path: Path) -> None:
    """The summaries rendered on alerts_test.yml's series (descriptions, prose, are only
    checked for presence: the rules are tested here without them)."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    _write_yaml(tmp_path / "alerts.yml", rules)
    unit = _unit_tests()
    checked: set[str] = set()
    for test in unit["tests"]:
        firing = _firing(test)
        test["alert_rule_test"] = [
            {
                "eval_time": eval_time,
                "alertname": name,
                "exp_alerts": [
                    {"exp_labels": labels, "exp_annotations": {"summary": SUMMARIES[name]}}
                ],
            }
            for name, (eval_time, labels) in firing.items()
        ]
        test.pop("promql_expr_test", None)
        checked |= firing.keys()
    assert checked == SUMMARIES.keys()
    _promtool("test", "rules", _write_yaml(tmp_path / "alerts_test.yml", unit))


def _promql(expr: str) -> str:
    """A dashboard query with Grafana's interval variables replaced (``$instance`` and
    ``$stream`` only occur inside regex matchers, where they stay literal)."""
    for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return expr


def _panel_exprs(title: str) -> dict[str, str]:
    panel = next(p for p in _dashboard()["panels"] if p["title"] == title)
    return {t["refId"]: _promql(t["expr"]) for t in panel["targets"]}


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = [_promql(t["expr"]) for t in _dashboard_targets()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    out = _promtool("check", "rules", _write_yaml(tmp_path / "dashboard_rules.yml", rules))
    assert f"{len(exprs)} rules found" in out


@needs_promtool
def test_rollout_panels_count_each_rollout_once_with_two_controller_replicas(
    tmp_path: Path,
) -> None:
    """Both replicas export the same database figures: the panels must not add them up."""
    live = 'rollout="7",model="m@2",stream="cam0"'
    series = []
    for instance in ("ctl", "ctl-2"):
        target = f'instance="{instance}",job="edgefleet-controller"'
        for status, n in (("pending", 2), ("queued", 4), ("succeeded", 3), ("failed", 1)):
            series.append(
                {
                    "series": f'edgefleet_rollout_executions{{{live},status="{status}",{target}}}',
                    "values": f"{n}x60",
                }
            )
        series += [
            {"series": f"edgefleet_rollout_stage{{{live},{target}}}", "values": "2x60"},
            {"series": f"edgefleet_rollout_stages{{{live},{target}}}", "values": "3x60"},
            {"series": f'edgefleet_rollouts{{state="aborted",{target}}}', "values": "1x30 2x30"},
            {"series": f'edgefleet_rollouts{{state="active",{target}}}', "values": "1x60"},
        ]
    table = _panel_exprs("Live rollouts: stage and executions")
    key = '{model="m@2",rollout="7",stream="cam0"}'
    cases: list[tuple[str, str, float]] = [  # expression, labels and value of its one sample
        (_panel_exprs("Rollout progress (finished executions)")["A"], key, 0.4),
        (table["A"], key, 2),
        (table["B"], key, 3),
        (table["C"], key, 4),
        (table["D"], key, 1),
        (table["E"], key, 10),
        (_panel_exprs("Rollouts active")["A"], "{}", 1),
        (_panel_exprs("Rollouts aborted in the time range")["A"], "{}", 1),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "60m",
                        "exp_samples": [{"labels": labels, "value": value}],
                    }
                    for expr, labels, value in cases
                ],
            }
        ],
    }
    _promtool("test", "rules", _write_yaml(tmp_path / "dashboard_test.yml", tests))
