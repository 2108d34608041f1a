"""Health-gate overrides without a database: the checks shared by the API and the CLI, the
CLI's refusals before any request, and the simulated devices' shadow phase and evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from controller.errors import RolloutError
from controller.rollouts import gate
from protocol import Desired, Gate, ModelRef
from tests.controller.conftest import NOWHERE, Cli, rollout_create_refused
from tools.simulator.ota import DeviceOta, OtaBehaviour

TARGET = "face@2.0.0"


# --- the checks (pure) --------------------------------------------------------------------


def test_overrides_are_stored_compact_and_nothing_to_override_is_none() -> None:
    assert gate.normalize(None) is None
    assert gate.normalize({}) is None
    assert gate.normalize({"compare": True, "min_agreement": None}) is None
    assert gate.normalize(
        {"min_agreement": 0.9, "max_latency_ratio": 1.5, "max_errors": 0, "undecided": "commit"}
    ) == {"min_agreement": 0.9, "max_latency_ratio": 1.5, "max_errors": 0, "undecided": "commit"}
    assert gate.normalize({"compare": False, "max_errors": 3}) == {
        "compare": False,
        "max_errors": 3,
    }
    assert gate.expand({"max_errors": 3}) == {
        "compare": True,
        "min_agreement": None,
        "max_latency_ratio": None,
        "max_errors": 3,
        "undecided": None,
    }
    assert gate.describe({"compare": False, "max_errors": 3}) == (
        "replace, do not compare, max errors 3"
    )
    assert gate.describe(
        {"min_agreement": 0.9, "max_latency_ratio": 1.5, "undecided": "commit"}
    ) == ("min agreement 90%, max latency ratio 1.5x, undecided → commit")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"min_agreement": 1.5},
            "gate.min_agreement 1.5 is out of range: use a share of boxes between 0 and 1",
        ),
        ({"min_agreement": -0.1}, "gate.min_agreement -0.1 is out of range"),
        (
            {"max_latency_ratio": 0},
            "gate.max_latency_ratio 0 is out of range: use a ratio above 0 and at most 1000",
        ),
        ({"max_latency_ratio": float("nan")}, "gate.max_latency_ratio nan is out of range"),
        (
            {"max_errors": -1},
            "gate.max_errors -1 is out of range: use a whole number between 0 and 1000000",
        ),
        ({"max_errors": 2.5}, "gate.max_errors 2.5 is out of range"),
        ({"max_errors": True}, "gate.max_errors True is out of range"),
        ({"undecided": "maybe"}, "gate.undecided 'maybe' is out of range: use rollback or commit"),
        ({"compare": "no"}, "gate.compare 'no' is out of range: use true or false"),
        ({"surprise": 1}, "gate.surprise is not a gate setting; use compare, min_agreement"),
        (
            {"compare": False, "min_agreement": 0.9},
            "gate.min_agreement does not apply when gate.compare is false",
        ),
    ],
)
def test_bad_overrides_are_refused_naming_the_field_and_what_it_accepts(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RolloutError) as err:
        gate.normalize(values)
    assert err.value.kind == "invalid"
    assert str(err.value).startswith(message), str(err.value)


def test_whatever_the_checks_accept_the_device_decodes_as_a_gate() -> None:

    edges = {"min_agreement": 1.0, "max_latency_ratio": 1000.0, "max_errors": 1_000_000}
    compact = gate.normalize(edges)
    assert compact is not None
    assert msgspec.convert(compact, Gate) == Gate(**edges)  # type: ignore[arg-type]
    assert gate.normalize({"min_agreement": 0.0, "max_errors": 0}) == {
        "min_agreement": 0.0,
        "max_errors": 0,
    }


# --- the CLI checks before any request -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--min-agreement", "150%"), "error: --min-agreement '150%' must be between 0% and 100%"),
        (("--min-agreement", "most"), "error: --min-agreement 'most' is not a percentage"),
        (("--max-latency-ratio", "fast"), "error: --max-latency-ratio 'fast' is not a ratio"),
        (
            ("--max-latency-ratio", "0"),
            "error: --max-latency-ratio 0 is out of range: use a ratio above 0 and at most 1000",
        ),
        (("--max-errors", "-1"), "error: --max-errors -1 is out of range: use a whole number"),
        (
            ("--replace", "--min-agreement", "0.9"),
            "error: --min-agreement does not apply with --replace: a replacement is not compared",
        ),
        (
            ("--replace", "--undecided", "commit"),
            "error: --undecided does not apply with --replace",
        ),
    ],
)
def test_cli_checks_the_gate_options_before_any_request(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    stderr = rollout_create_refused(tmp_path, *args)
    assert stderr.startswith(message), stderr


def test_cli_refuses_an_unknown_undecided_action(tmp_path: Path) -> None:
    cli = Cli(tmp_path, url=NOWHERE)
    result = cli("rollout", "create", "m@1", "--select", "all", "--undecided", "later")
    assert result.exit_code == 2 and "'later' is not one of 'rollback', 'commit'" in result.stderr


# --- the simulated devices ----------------------------------------------------------------


def _desired(rev: int, gate_: Gate | None = None) -> Desired:
    ref = ModelRef(name="face", version="2.0.0", url="http://x/b", sha256="0" * 64, size=1,
                   gate=gate_)  # fmt: skip
    return Desired(schema=1, rev=rev, models={"cam0": ref})


def _run(ota: DeviceOta, desired: Desired) -> list[tuple[str, str | None, str | None]]:
    """Apply every step; (phase, verdict, reason) reported after each."""
    seen: list[tuple[str, str | None, str | None]] = []
    for step in ota.on_desired(desired):
        ota.apply(step)
        s = ota.reported(0.0).streams["cam0"]
        seen.append((s.phase, None if s.gate is None else s.gate.verdict, s.reason))
    return seen


def test_simulated_devices_pass_through_shadow_and_report_passing_evidence() -> None:
    ota = DeviceOta("sim-1", streams=("cam0",), baseline="base@1", behaviour=OtaBehaviour())
    seen = _run(ota, _desired(1))
    assert [p for p, _, _ in seen] == ["verifying", "staging", "shadow", "switching",
                                       "probation", "committed"]  # fmt: skip
    assert [v for _, v, _ in seen] == [None, None, "pass", "pass", "pass", "pass"]
    final = ota.reported(0.0).streams["cam0"].gate
    assert final is not None and final.stage == "probation" and final.confidence == 0.95
    assert final.summary.startswith("agrees with the current model on ")


@pytest.mark.parametrize(
    ("fail_phase", "outcome"), [("shadow", "failed"), ("probation", "rolled_back")]
)
def test_simulated_devices_failing_the_gate_report_a_failing_verdict_with_the_reason(
    fail_phase: str, outcome: str
) -> None:
    behaviour = OtaBehaviour(fail={TARGET: f"{fail_phase}_agreement"}, fail_phase=fail_phase)
    ota = DeviceOta("sim-1", streams=("cam0",), baseline="base@1", behaviour=behaviour)
    phase, verdict, reason = _run(ota, _desired(1))[-1]
    assert (phase, verdict, reason) == (outcome, "fail", f"{fail_phase}_agreement")
    failed = ota.reported(0.0).streams["cam0"].gate
    assert failed is not None and failed.stage == fail_phase and failed.reason == reason
    assert failed.agreement is not None and failed.agreement < 0.7


def test_a_simulated_replacement_skips_the_shadow_phase_and_reports_no_evidence() -> None:
    behaviour = OtaBehaviour(fail={TARGET: "shadow_agreement"}, fail_phase="shadow")
    ota = DeviceOta("sim-1", streams=("cam0",), baseline="base@1", behaviour=behaviour)
    seen = _run(ota, _desired(1, Gate(compare=False)))
    assert [p for p, _, _ in seen] == ["verifying", "staging", "switching", "probation",
                                       "committed"]  # fmt: skip
    assert {v for _, v, _ in seen} == {None}
    assert ota.streams["cam0"]["active"] == TARGET
