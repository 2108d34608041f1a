"""Pure parts of rollouts: durations, shares, stages, selectors, the status derivation from
the reported state (docs/ota.md). The health comparison: test_rollout_health.py."""

from __future__ import annotations

from typing import Any

import pytest

from controller.api.routes import bundle_path
from controller.errors import RolloutError
from controller.fleet.registry import ModelInfo
from controller.rollouts import spec
from controller.rollouts.engine import bundle_url, derive_status, next_status
from controller.rollouts.executions import Execution


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("90", 90),
        ("0", 0),
        ("2d", 172800),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert spec.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "1h 30m", "-5s", "s10"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(RolloutError, match=r"use e\.g\. 30s, 10m, 1h"):
        spec.parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (0, 0.5, 1, 59, 90, 3600, 5400, 90061, 2.5):
        assert spec.parse_duration(spec.format_duration(seconds)) == pytest.approx(seconds)


def test_shares() -> None:
    assert spec.parse_share("5%") == 0.05
    assert spec.parse_share("0.05") == 0.05
    assert spec.parse_share("100%") == 1.0
    for bad in ("5", "101%", "-1%", "x%", "nan"):
        with pytest.raises(RolloutError):
            spec.parse_share(bad)


@pytest.mark.parametrize(
    ("stages", "selected", "counts"),
    [
        ("1,10%,50%,100%", 1000, [1, 100, 500, 1000]),
        ("1,10%,50%,100%", 10, [1, 5, 10]),
        ("1,10%,50%,100%", 1, [1]),
        ("1,10%,50%,100%", 3, [1, 2, 3]),
        ("5,100%", 3, [3]),
        ("33%,66%,100%", 3, [1, 2, 3]),
        ("100%", 7, [7]),
        ("2,4,8", 8, [2, 4, 8]),
    ],
)
def test_stages_resolve_cumulatively_against_the_selection(
    stages: str, selected: int, counts: list[int]
) -> None:
    assert spec.resolve_stages(spec.parse_stages(stages), selected) == counts


def test_selectors() -> None:
    sel = spec.parse_selector(["tag=site:berlin", "cam-1", "cam-1", "all"])
    assert sel.all and sel.tags == ("site:berlin",) and sel.devices == ("cam-1",)
    with pytest.raises(RolloutError, match="is not 'all', 'tag=KEY:VALUE' or a device id"):
        spec.parse_selector(["Bad Id"])
    with pytest.raises(RolloutError, match="a tag is 1-64 characters"):
        spec.parse_selector(["tag="])
    assert spec.parse_model_ref("face-det@1.2.0+b3") == ("face-det", "1.2.0+b3")
    assert spec.parse_stream("*") == "*"
    with pytest.raises(RolloutError, match="or \\* for every stream"):
        spec.parse_stream("Cam 0")


def _e(**kw: Any) -> Execution:
    values: dict[str, Any] = {
        "device_id": "d",
        "stream": "cam0",
        "stage": 0,
        "status": "queued",
        "phase": None,
        "reason": None,
        "rev": 5,
        "assigned_at": 100.0,
        "finished_at": None,
        "reported_rev": 5,
        "report_phase": "idle",
        "report_active": "m@1",
        "report_target": None,
        "report_reason": None,
        "has_report": True,
    }
    values.update(kw)
    return Execution(**values)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"reported_rev": None}, ("queued", None, None)),
        (
            {"reported_rev": 4, "report_phase": "failed", "report_target": "m@2"},
            ("queued", None, None),
        ),
        (
            {"report_phase": "downloading", "report_target": "m@2"},
            ("in_progress", "downloading", None),
        ),
        (
            {"report_phase": "probation", "report_active": "m@2", "report_target": "m@2"},
            ("in_progress", "probation", None),
        ),
        (
            {"report_phase": "committed", "report_active": "m@2", "report_target": "m@2"},
            ("succeeded", "committed", None),
        ),
        (
            {"report_phase": "committed", "report_active": "m@1", "report_target": "m@1"},
            ("in_progress", "committed", None),
        ),
        (
            {"report_phase": "failed", "report_target": "m@2", "report_reason": "bad_signature"},
            ("failed", "failed", "bad_signature"),
        ),
        (
            {
                "report_phase": "rolled_back",
                "report_target": "m@2",
                "report_reason": "probation_fps",
            },
            ("failed", "rolled_back", "probation_fps"),
        ),
        (
            {"report_phase": "failed", "report_target": "m@0", "report_reason": "x"},
            ("in_progress", "failed", None),
        ),
        ({"report_phase": "idle", "report_active": "m@2"}, ("succeeded", "idle", None)),
        (
            {
                "report_phase": "failed",
                "report_target": "m@2",
                "report_reason": "download_failed",
                "stale_outcome": {"phase": "failed", "target": "m@2", "reason": "download_failed"},
            },
            ("in_progress", "failed", None),
        ),
        (
            {"has_report": False, "report_phase": None, "report_active": None},
            ("in_progress", None, None),
        ),
        (
            {"reported_rev": 9, "report_phase": "committed", "report_active": "m@2"},
            ("succeeded", "committed", None),
        ),
    ],
)
def test_status_derivation_follows_docs_ota(
    kw: dict[str, Any], expected: tuple[str, str | None, str | None]
) -> None:
    assert derive_status(_e(**kw), "m@2") == expected


def test_success_is_kept_unless_the_device_reports_the_model_failed() -> None:
    ok = {"status": "succeeded", "phase": "committed"}
    assert (
        next_status(
            _e(**ok, report_phase="downloading", report_target="m@3"), "m@2", now=10**6, timeout_s=1
        )[0]
        == "succeeded"
    )
    later = next_status(
        _e(
            **ok,
            report_phase="rolled_back",
            report_target="m@2",
            report_reason="crashed_in_probation",
        ),
        "m@2",
        now=0,
        timeout_s=1,
    )
    assert later == ("failed", "rolled_back", "crashed_in_probation")
    assert next_status(_e(reported_rev=1), "m@2", now=200.0, timeout_s=100)[0] == "timed_out"
    assert next_status(_e(reported_rev=1), "m@2", now=199.9, timeout_s=100)[0] == "queued"


def test_the_engine_builds_the_same_download_url_as_the_api() -> None:
    m = ModelInfo(
        id=1, name="face", version="2.0.0", sha256="a" * 64, size=1, runtime="litert",
        manifest={}, signature=None, key_id=None, download_key="k-1", created_at=0,
    )  # fmt: skip
    assert bundle_url("https://fleet.example/", m) == "https://fleet.example" + bundle_path(m)
