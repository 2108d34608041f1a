"""The shipped observability files (Prometheus alert rules and their unit tests, the Grafana
dashboard), read for tests/test_observability_*.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "packaging" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "packaging" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "edgefleet-fleet.json"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_targets() -> list[dict[str, Any]]:
    return [t for p in dashboard()["panels"] for t in p.get("targets", [])]
