"""One definition of a failed execution (docs/controller.md, "Failed executions").

A real rollout (the controller as a process, real Mosquitto, simulated devices, the CLI
over HTTP) is aborted by its failing canary and rolled back: the abort reason, the API's
counts, the CLI's summary line and stage table, and the metrics all call the canary failed
(rolled back is a detail of that failure, not another outcome).
"""

from __future__ import annotations

import re

import httpx
import pytest

from controller.db.session import Database
from controller.metrics import build_registry
from controller.rollouts import commands
from controller.rollouts.records import counted_status
from tests.broker import Mosquitto
from tests.controller.conftest import Cli, Clock
from tests.controller.controller_proc import ControllerProcess
from tests.controller.rollout_fleet import Fleet
from tests.controller.test_rollout_e2e import (  # noqa: F401 - fixtures
    TARGET,
    _fleet,
    _rollout,
    cli,
    controller,
)
from tools.simulator.ota import OtaBehaviour

pytestmark = pytest.mark.slow


def _stage_row(text: str, stage: int) -> list[str]:
    """The cells of a stage's row in the `rollout status` stage table."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] == str(stage) and len(cells) >= 6:
            return cells
    raise AssertionError(f"no row for stage {stage} in:\n{text}")


def test_a_canary_failure_is_failed_everywhere_after_the_rollback(
    controller: ControllerProcess,  # noqa: F811
    cli: Cli,  # noqa: F811
    mosquitto: Mosquitto,
) -> None:
    behaviour = OtaBehaviour(fail={TARGET: "golden_mismatch"}, phase_delay_s=0.02)
    with _fleet(mosquitto, cli, 2, behaviour):
        created = cli.json(
            "rollout", "create", TARGET, "--select", "all", "--stages", "1,100%",
            "--bake", "1s", "--min-executed", "5",
        )  # fmt: skip
        watched = cli("rollout", "watch", str(created["id"]), "--interval", "0.2")
        assert watched.exit_code == 1, watched.output
        # The abort reason
        assert "stage 1: 1 of 1 executions failed (100%)" in watched.stderr
        # The API
        shown = _rollout(cli, 1)
        assert shown["rolled_back_at"] is not None
        assert shown["counts"] == {"failed": 1, "pending": 1}, shown["counts"]
        assert shown["failures"] == 1 and shown["finished"] == 1
        assert shown["stage_progress"][0]["counts"] == {"failed": 1}
        canary = next(d for d in shown["devices"] if d["device_id"] == "e2e-00")
        assert canary["status"] == "rolled_back" and canary["rollback_rev"] is not None
        assert counted_status(canary["status"], canary["reason"]) == "failed"
        listed = cli.json("rollout", "list")
        assert [(r["id"], r["failures"]) for r in listed] == [(1, 1)]
        # The CLI: summary line, stage table, device table
        status = cli("rollout", "status", "1")
        assert status.exit_code == 0, status.output
        assert "0/2 succeeded, 1 failed (1 rolled back)" in status.stdout, status.stdout
        assert "0 failed" not in status.stdout
        row = _stage_row(status.stdout, 1)
        assert row[4:6] == ["0", "1"], row  # OK, FAILED
        assert "failed, rolled back" in status.stdout  # the canary's STATUS
        assert "golden_mismatch" in status.stdout  # its reason, not cut
        table = cli("rollout", "list")
        assert re.search(r"aborted.*0/2\s*\S?\s*1\b", table.stdout), table.stdout
        # The metrics: the ended rollout counts as aborted; its executions left with it
        scraped = httpx.get(f"{controller.url}/metrics", timeout=10).text
        assert 'edgefleet_rollouts{state="aborted"} 1.0' in scraped
        assert 'edgefleet_rollout_executions{model="face@2.0.0",rollout="1"' not in scraped


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    return Fleet(database, clock)


def test_metrics_api_and_abort_count_a_rolled_back_failure_alike(fleet: Fleet) -> None:
    """A live rollout with a failed execution under its budget, then aborted by the
    operator: the metric counts it failed while live, the API after the rollback too."""
    fleet.add("dev-00", "dev-01", "dev-02")
    fleet.model()
    r = fleet.create(stages="1,100%", max_failures=1.0, min_executed=10, bake_s=3600)
    fleet.tick()
    fleet.act(fail={"m@2": "golden_mismatch"})
    fleet.tick(1)
    registry = build_registry(db=fleet.db)
    failed = registry.get_sample_value(
        "edgefleet_rollout_executions",
        {"rollout": str(r.id), "model": "m@2", "stream": "*", "status": "failed"},
    )
    with fleet.db.connect() as conn:
        live = commands.detail(conn, r.id, now=fleet.clock())
    assert failed == 1 and live.counts.get("failed") == 1, live.counts
    with fleet.db.begin() as conn:
        commands.abort(conn, r.id, now=fleet.clock(), by="ops")
    fleet.tick()
    with fleet.db.connect() as conn:
        ended = commands.detail(conn, r.id, now=fleet.clock())
    assert ended.rollout.rolled_back_at is not None
    assert ended.counts.get("failed") == 1, ended.counts
    assert commands.summary_counts(ended.counts)[2] == 1


def test_a_rolled_back_success_is_not_a_failure() -> None:
    assert counted_status("rolled_back", None) == "rolled_back"
    assert counted_status("rolled_back", "golden_mismatch") == "failed"
    assert counted_status("rolled_back", "timeout: still downloading after 30s") == "timed_out"
    assert counted_status("succeeded", None) == "succeeded"
