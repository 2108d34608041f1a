"""Per-rollout health-gate overrides and the gate's evidence, on SQLite and PostgreSQL: the
API over real HTTP, ``edgefleet rollout create``/``status``, the desired states the engine
writes and takes back, and the evidence from reported states (the checks without a
database: ``test_rollout_gate_checks.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from controller.api import create_app
from controller.db.session import Database
from controller.fleet.writes import Received, write_messages
from controller.rollouts import commands
from controller.rollouts.publisher import desired_message
from protocol import Gate, GateEvidence, Reported, StreamReport
from tests.controller.conftest import Cli, Clock, serving
from tests.controller.rollout_fleet import Fleet

TARGET = "face@2.0.0"
FAILED_SUMMARY = (
    "agrees with the current model on 61.0% of boxes (95% CI 55.2–66.4%) over 120 paired "
    "frames; median latency 1.02x"
)
PASSED_SUMMARY = (
    "agrees with the current model on 97.8% of boxes (95% CI 96.1–98.9%) over 412 paired "
    "frames; median latency 1.05x"
)


def evidence(
    *, verdict: str = "pass", reason: str | None = None, stage: str = "probation"
) -> GateEvidence:
    failed = verdict == "fail"
    return GateEvidence(
        stage=stage,  # type: ignore[arg-type]
        pairs=120 if failed else 412,
        informative_pairs=100 if failed else 380,
        agreement=0.61 if failed else 0.978,
        agreement_low=0.552 if failed else 0.961,
        agreement_high=0.664 if failed else 0.989,
        precision=0.6 if failed else 0.98,
        recall=0.62 if failed else 0.976,
        latency_ratio=1.02 if failed else 1.05,
        latency_ratio_low=0.99,
        latency_ratio_high=1.08,
        score_shift=-0.01,
        errors=0,
        confidence=0.95,
        verdict=verdict,  # type: ignore[arg-type]
        reason=reason,
        summary=FAILED_SUMMARY if failed else PASSED_SUMMARY,
    )


def report(
    fleet: Fleet,
    device_id: str,
    phase: str,
    *,
    target: str = TARGET,
    reason: str | None = None,
    gate_evidence: GateEvidence | None = None,
    took_up: bool = True,
) -> None:
    """The device reports every stream in ``phase`` for ``target`` with the gate's evidence;
    ``took_up``: it handled its newest desired rev first (committed: the target is active)."""
    desired = fleet.desired(device_id)
    if took_up and desired is not None:
        fleet.handled[device_id] = desired.rev
    now = fleet.clock()
    streams = {}
    for s in fleet.streams[device_id]:
        if phase == "committed":
            fleet.active[(device_id, s)] = target
        streams[s] = StreamReport(
            active=fleet.active[(device_id, s)],
            phase=phase,  # type: ignore[arg-type]
            target=target,
            reason=reason,
            gate=gate_evidence,
        )
    rep = Reported(
        schema=1, device_id=device_id, ts=now, desired_rev=fleet.handled[device_id], streams=streams
    )
    with fleet.db.begin() as conn:
        write_messages(
            conn, [Received(topic="t", device_id=device_id, message=rep, received_at=now)]
        )


def report_agreement_failure(fleet: Fleet, device_id: str, *, took_up: bool = True) -> None:
    """The device rolled its candidate back in probation: too little agreement (evidence)."""
    report(
        fleet,
        device_id,
        "rolled_back",
        reason="probation_agreement",
        gate_evidence=evidence(verdict="fail", reason="probation_agreement"),
        took_up=took_up,
    )


# --- the API and the CLI over real HTTP ---------------------------------------------------


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    f = Fleet(database, clock)
    f.model("face", "2.0.0")
    f.add("cam-01", "cam-02", "cam-03")
    return f


@pytest.fixture
def api(database: Database, clock: Clock, fleet: Fleet) -> Iterator[str]:
    with serving(create_app(db=database, clock=clock)) as url:
        yield url


@pytest.fixture
def operator(api: str, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {tokens['operator']}"}
    with httpx.Client(base_url=api, headers=headers) as c:
        yield c


BODY: dict[str, Any] = {"model": TARGET, "select": ["all"], "stages": "100%", "bake_s": 0}


def test_api_accepts_a_gate_returns_it_whole_and_null_without_one(
    operator: httpx.Client, fleet: Fleet
) -> None:
    created = operator.post(
        "/api/v1/rollouts", json={**BODY, "gate": {"min_agreement": 0.9, "undecided": "commit"}}
    )
    assert created.status_code == 201, created.text
    expected = {
        "compare": True,
        "min_agreement": 0.9,
        "max_latency_ratio": None,
        "max_errors": None,
        "undecided": "commit",
    }
    assert created.json()["gate"] == expected
    assert operator.get("/api/v1/rollouts/1").json()["gate"] == expected
    assert operator.get("/api/v1/rollouts").json()["rollouts"][0]["gate"] == expected
    assert fleet.rollout(1).gate == {"min_agreement": 0.9, "undecided": "commit"}
    operator.post("/api/v1/rollouts/1/abort")
    plain = operator.post("/api/v1/rollouts", json={**BODY, "gate": None})
    assert plain.status_code == 201 and plain.json()["gate"] is None
    operator.post("/api/v1/rollouts/2/abort")
    empty = operator.post("/api/v1/rollouts", json={**BODY, "gate": {"compare": True}})
    assert empty.status_code == 201 and empty.json()["gate"] is None  # nothing overridden
    operator.post("/api/v1/rollouts/3/abort")
    replace = operator.post("/api/v1/rollouts", json={**BODY, "gate": {"compare": False}})
    assert replace.json()["gate"]["compare"] is False
    assert fleet.rollout(4).gate == {"compare": False}


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ({"min_agreement": 1.2}, "min_agreement", "use a share of boxes between 0 and 1"),
        ({"min_agreement": "0.9"}, "min_agreement", "Input should be a valid number"),
        ({"max_latency_ratio": 0}, "max_latency_ratio", "use a ratio above 0 and at most 1000"),
        ({"max_latency_ratio": 5000}, "max_latency_ratio", "use a ratio above 0 and at most 1000"),
        ({"max_errors": -3}, "max_errors", "use a whole number between 0 and 1000000"),
        ({"max_errors": 1.5}, "max_errors", "Input should be a valid integer"),
        ({"undecided": "later"}, "undecided", "Input should be 'rollback' or 'commit'"),
        ({"compare": "no"}, "compare", "Input should be a valid boolean"),
        ({"threshold": 0.9}, "threshold", "Extra inputs are not permitted"),
        (
            {"compare": False, "max_latency_ratio": 2},
            None,
            "gate.max_latency_ratio does not apply when gate.compare is false",
        ),
    ],
)
def test_api_refuses_bad_gates_with_422_naming_the_field_and_the_range(
    operator: httpx.Client, bad: dict[str, Any], field: str | None, message: str
) -> None:
    resp = operator.post("/api/v1/rollouts", json={**BODY, "gate": bad})
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert len(errors) == 1
    assert errors[0]["loc"] == ["body", "gate", *([field] if field else [])]
    assert message in errors[0]["msg"]
    assert operator.get("/api/v1/rollouts").json()["rollouts"] == []


@pytest.fixture
def cli(api: str, tokens: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(tmp_path, url=api, token=tokens["operator"])


def test_cli_gate_options_become_the_gate_and_status_shows_the_overrides(
    cli: Cli, fleet: Fleet
) -> None:
    created = cli(
        "rollout", "create", TARGET, "--select", "cam-01", "--stages", "100%",
        "--min-agreement", "90%", "--max-latency-ratio", "1.5x", "--max-errors", "2",
        "--undecided", "commit",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert created.stdout.splitlines()[1] == (
        "gate overrides: min agreement 90%, max latency ratio 1.5x, max errors 2, "
        "undecided → commit"
    )
    assert fleet.rollout(1).gate == {
        "min_agreement": 0.9,
        "max_latency_ratio": 1.5,
        "max_errors": 2,
        "undecided": "commit",
    }
    shown = cli("rollout", "status", "1")
    assert "gate overrides: min agreement 90%, max latency ratio 1.5x" in shown.stdout
    replaced = cli.json(
        "rollout", "create", TARGET, "--select", "cam-02", "--replace", "--max-errors", "0"
    )
    assert replaced["gate"]["compare"] is False and replaced["gate"]["max_errors"] == 0
    assert fleet.rollout(2).gate == {"compare": False, "max_errors": 0}
    assert (
        "gate overrides: replace, do not compare, max errors 0"
        in cli("rollout", "status", "2").stdout
    )
    plain = cli.json("rollout", "create", TARGET, "--select", "cam-03", "--stages", "100%")
    assert plain["gate"] is None
    assert "gate overrides" not in cli("rollout", "status", "3").stdout


# --- the engine: desired states out, evidence in ------------------------------------------


def test_every_desired_model_ref_of_the_rollout_carries_the_gate_and_the_device_decodes_it(
    fleet: Fleet,
) -> None:
    r = fleet.create(TARGET, stages="1,100%", gate={"min_agreement": 0.85, "max_errors": 1})
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    fleet.tick(700)  # the bake is over: the second stage is assigned
    assert fleet.rollout(r.id).current_stage == 1
    for d in ("cam-01", "cam-02", "cam-03"):
        row = fleet.desired(d)
        assert row is not None
        assert row.models["cam0"]["gate"] == {"min_agreement": 0.85, "max_errors": 1}
        ref = desired_message(row).models["cam0"]
        assert ref.gate == Gate(min_agreement=0.85, max_errors=1)


def test_a_rollout_without_overrides_sends_no_gate_key(fleet: Fleet) -> None:
    fleet.create(TARGET, stages="100%")
    fleet.tick()
    row = fleet.desired("cam-01")
    assert row is not None and "gate" not in row.models["cam0"]
    assert desired_message(row).models["cam0"].gate is None


def test_abort_writes_back_the_pre_rollout_model_ref_with_its_own_gate_as_it_was(
    fleet: Fleet,
) -> None:
    fleet.model("face", "1.0.0")
    first = fleet.create("face@1.0.0", select=("cam-01",), stages="100%", bake_s=0,
                         gate={"max_errors": 3})  # fmt: skip
    assert fleet.run(first.id).state == "completed"
    before = fleet.desired("cam-01")
    assert before is not None and before.models["cam0"]["gate"] == {"max_errors": 3}
    second = fleet.create(TARGET, select=("cam-01",), stages="100%", gate={"compare": False})
    fleet.tick(1)
    during = fleet.desired("cam-01")
    assert during is not None and during.models["cam0"]["gate"] == {"compare": False}
    with fleet.db.begin() as conn:
        commands.abort(conn, second.id, now=fleet.clock())
    fleet.tick(1)
    after = fleet.desired("cam-01")
    assert after is not None and after.rev == during.rev + 1
    assert after.models == before.models  # the whole earlier ModelRef, its gate included


def test_reported_evidence_for_the_rollouts_model_is_kept_with_each_execution(
    fleet: Fleet,
) -> None:
    r = fleet.create(TARGET, stages="100%", min_executed=5)
    fleet.tick()
    report(fleet, "cam-01", "committed", gate_evidence=evidence())
    report(fleet, "cam-02", "shadow", gate_evidence=evidence(verdict="undecided", stage="shadow"))
    report_agreement_failure(fleet, "cam-03")
    fleet.tick(1)
    rows = fleet.rows(r.id)
    assert [rows[(d, "cam0")].status for d in ("cam-01", "cam-02", "cam-03")] == [
        "succeeded",
        "in_progress",
        "failed",
    ]
    assert rows[("cam-01", "cam0")].evidence == _builtins(evidence())
    assert rows[("cam-02", "cam0")].evidence is not None
    assert rows[("cam-02", "cam0")].evidence["verdict"] == "undecided"
    failed = rows[("cam-03", "cam0")].evidence
    assert failed is not None and failed["reason"] == "probation_agreement"
    assert failed["summary"] == FAILED_SUMMARY
    # More evidence while in progress replaces it; the final failure's stays.
    report(fleet, "cam-02", "probation", gate_evidence=evidence())
    report(fleet, "cam-03", "idle", target="other@1", gate_evidence=evidence())
    fleet.tick(1)
    rows = fleet.rows(r.id)
    assert rows[("cam-02", "cam0")].evidence["verdict"] == "pass"  # type: ignore[index]
    assert rows[("cam-03", "cam0")].evidence == failed


def test_evidence_of_another_model_or_of_the_failure_seen_before_the_assignment_is_not_kept(
    fleet: Fleet,
) -> None:
    report_agreement_failure(fleet, "cam-01", took_up=False)
    report(fleet, "cam-02", "committed", target="other@1", gate_evidence=evidence())
    r = fleet.create(TARGET, select=("cam-01", "cam-02"), stages="100%")
    fleet.tick()
    # It took up the new rev and still shows the earlier failure.
    report_agreement_failure(fleet, "cam-01")
    report(fleet, "cam-02", "downloading", target="other@1", gate_evidence=evidence())
    fleet.tick(1)
    rows = fleet.rows(r.id)
    assert rows[("cam-01", "cam0")].status == "in_progress"
    assert rows[("cam-01", "cam0")].evidence is None
    assert rows[("cam-02", "cam0")].evidence is None
    report(fleet, "cam-01", "shadow", gate_evidence=evidence(stage="shadow"))
    fleet.tick(1)
    assert fleet.rows(r.id)[("cam-01", "cam0")].evidence["stage"] == "shadow"  # type: ignore[index]


def _builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def test_evidence_shows_in_the_rollout_and_device_apis_and_in_rollout_status(
    operator: httpx.Client, cli: Cli, fleet: Fleet, tokens: dict[str, str]
) -> None:
    assert operator.post("/api/v1/rollouts", json={**BODY, "min_executed": 5}).status_code == 201
    fleet.tick()
    report(fleet, "cam-01", "committed", gate_evidence=evidence())
    report_agreement_failure(fleet, "cam-03")
    fleet.tick(1)
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    shown = operator.get("/api/v1/rollouts/1", headers=viewer).json()
    by_device = {d["device_id"]: d for d in shown["devices"]}
    assert by_device["cam-01"]["evidence"] == _builtins(evidence())
    assert by_device["cam-02"]["evidence"] is None
    bad = by_device["cam-03"]
    assert (bad["status"], bad["phase"], bad["reason"]) == (
        "failed",
        "rolled_back",
        "probation_agreement",
    )
    assert bad["evidence"]["verdict"] == "fail" and bad["evidence"]["summary"] == FAILED_SUMMARY
    device = operator.get("/api/v1/devices/cam-03", headers=viewer).json()
    assert device["streams"][0]["gate"]["summary"] == FAILED_SUMMARY
    assert (
        operator.get("/api/v1/devices/cam-02", headers=viewer).json()["streams"][0]["gate"] is None
    )

    status = cli("rollout", "status", "1")
    assert status.exit_code == 0, status.output
    assert f"cam-03 rolled_back probation_agreement: {FAILED_SUMMARY}" in status.stdout
    assert "cam-01 committed" not in status.stdout  # only the failed devices without --devices
    every = cli("rollout", "status", "1", "--devices")
    assert f"cam-01 committed: {PASSED_SUMMARY}" in every.stdout
    assert f"cam-03 rolled_back probation_agreement: {FAILED_SUMMARY}" in every.stdout
    assert "cam-02" in every.stdout and "cam-02 " not in every.stdout.split("evidence:")[1]
