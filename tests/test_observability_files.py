"""The Prometheus alert rules, their unit tests and the Grafana dashboard: well formed, every
alert tested firing and quiet, and promtool (when installed: `make promtool`) accepts the
rules, runs their unit tests, checks the rendered summaries and parses and evaluates the
dashboard's queries. That they use only exported metrics is tests/test_observability_metrics.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability_support import (
    ALERTS,
    ALERTS_TEST,
    REPO,
    alert_rules,
    dashboard,
    dashboard_targets,
)

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


def test_alert_rules_cover_the_fleet_failure_modes() -> None:
    rules = alert_rules()
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
    dash = dashboard()
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
    assert f"{len(alert_rules())} rules found" in _promtool("check", "rules", ALERTS)


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
    names = {r["alert"] for r in alert_rules()}
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
    panel = next(p for p in dashboard()["panels"] if p["title"] == title)
    return {t["refId"]: _promql(t["expr"]) for t in panel["targets"]}


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = [_promql(t["expr"]) for t in dashboard_targets()]
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
