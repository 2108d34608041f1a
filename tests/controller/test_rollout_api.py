"""The rollouts HTTP API and ``edgefleet rollout`` over real HTTP (uvicorn on loopback), on
SQLite and PostgreSQL: roles, create/list/show, pause/resume/abort/rollback, the errors'
wording, OpenAPI; the engine is ticked by the test (fake clock)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.api import create_app
from controller.db.session import Database
from tests.controller.conftest import Cli, Clock, rollout_create_refused, serving
from tests.controller.rollout_fleet import Fleet


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    f = Fleet(database, clock)
    f.model("face", "2.0.0")
    f.add("cam-01", "cam-02", "cam-03", tags=("site:berlin",))
    f.add("cam-04", streams=("cam0", "door"))
    return f


@pytest.fixture
def woken() -> list[int]:
    return []


@pytest.fixture
def api(database: Database, clock: Clock, fleet: Fleet, woken: list[int]) -> Iterator[str]:
    app = create_app(db=database, clock=clock)
    app.state.rollouts_wake = lambda: woken.append(1)
    with serving(app) as url:
        yield url


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


BODY = {"model": "face@2.0.0", "select": ["tag=site:berlin"], "stages": "1,100%", "bake_s": 30}


def test_operator_creates_viewer_reads_and_progress_is_per_stage_and_device(
    api: str, tokens: dict[str, str], fleet: Fleet
) -> None:
    with httpx.Client(base_url=api) as c:
        refused = c.post("/api/v1/rollouts", json=BODY, headers=auth(tokens["viewer"]))
        assert refused.status_code == 403 and "needs operator" in refused.json()["detail"]
        assert c.post("/api/v1/rollouts", json=BODY).status_code == 401
        created = c.post("/api/v1/rollouts", json=BODY, headers=auth(tokens["operator"]))
        assert created.status_code == 201, created.text
        r = created.json()
        assert r["id"] == 1 and r["state"] == "active" and r["model"] == "face@2.0.0"
        assert r["device_count"] == 3 and r["stages"] == [1, 3] and r["created_by"] == "t-operator"
        assert r["counts"] == {"pending": 3} and r["executions"] == 3
        assert [s["state"] for s in r["stage_progress"]] == ["pending", "pending"]
        assert [d["device_id"] for d in r["devices"]] == ["cam-01", "cam-02", "cam-03"]
        fleet.tick()
        fleet.act()
        fleet.tick(1)
        shown = c.get("/api/v1/rollouts/1", headers=auth(tokens["viewer"])).json()
        first = shown["stage_progress"][0]
        assert first["state"] == "baking" and first["counts"] == {"succeeded": 1}
        assert first["bake_left_s"] == 30.0
        device = shown["devices"][0]
        assert device["status"] == "succeeded" and device["rev"] == 1
        assert device["phase"] == "committed" and device["previous_model"] is None
        brief = c.get("/api/v1/rollouts/1?devices=false", headers=auth(tokens["viewer"])).json()
        assert brief["devices"] == [] and brief["counts"] == {"succeeded": 1, "pending": 2}
        listed = c.get("/api/v1/rollouts?state=active", headers=auth(tokens["viewer"])).json()
        assert [x["id"] for x in listed["rollouts"]] == [1]
        assert listed["rollouts"][0]["finished"] == 1
        none = c.get("/api/v1/rollouts?state=completed", headers=auth(tokens["viewer"])).json()
        assert none["rollouts"] == []


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ({**BODY, "model": "face@9"}, 404, "no model face@9 in the registry; upload it first"),
        ({**BODY, "select": ["nobody"]}, 404, "unknown device 'nobody'"),
        ({**BODY, "stages": "1,50%"}, 422, "the last stage must cover the whole selection"),
        ({**BODY, "stream": "door", "select": ["cam-01"]}, 422, "reports no stream 'door'"),
        ({**BODY, "max_failures": 2}, 422, "max_failures"),
        ({**BODY, "surprise": 1}, 422, "surprise"),
    ],
)
def test_create_errors_say_what_to_do(
    api: str, tokens: dict[str, str], body: dict[str, object], code: int, detail: str
) -> None:
    resp = httpx.post(f"{api}/api/v1/rollouts", json=body, headers=auth(tokens["operator"]))
    assert resp.status_code == code, resp.text
    assert detail in str(resp.json()["detail"])


def test_overlap_is_409_naming_the_live_rollout_and_actions_follow_the_states(
    api: str, tokens: dict[str, str], fleet: Fleet
) -> None:
    op = auth(tokens["operator"])
    with httpx.Client(base_url=api, headers=op) as c:
        assert c.post("/api/v1/rollouts", json=BODY).status_code == 201
        clash = c.post("/api/v1/rollouts", json={**BODY, "select": ["all"], "stages": "100%"})
        assert clash.status_code == 409
        assert "are in rollout 1 (face@2.0.0, active)" in clash.json()["detail"]
        door = c.post(
            "/api/v1/rollouts",
            json={**BODY, "select": ["cam-04"], "stream": "door", "stages": "100%"},
        )
        assert door.status_code == 201  # another stream of a device is free
        assert c.post("/api/v1/rollouts/1/pause").json()["state"] == "paused"
        again = c.post("/api/v1/rollouts/1/pause")
        assert again.status_code == 409 and "it is paused" in again.json()["detail"]
        assert c.post("/api/v1/rollouts/1/resume").json()["state"] == "active"
        aborted = c.post("/api/v1/rollouts/1/abort", json={"reason": "wrong build"}).json()
        assert aborted["state"] == "aborted" and aborted["reason"] == "operator"
        assert aborted["detail"] == "aborted by token 't-operator': wrong build"
        late = c.post("/api/v1/rollouts/1/rollback")
        assert late.status_code == 409 and "already got their previous models" in late.text
        assert c.post("/api/v1/rollouts/77/abort").status_code == 404
        assert c.get("/api/v1/rollouts/77").status_code == 404
        fleet.tick()
        assert c.get("/api/v1/rollouts/1").json()["rolled_back_at"] is not None
        viewer = c.post("/api/v1/rollouts/2/abort", headers=auth(tokens["viewer"]))
        assert viewer.status_code == 403


def test_changes_wake_the_engine_and_openapi_documents_the_routes(
    api: str, tokens: dict[str, str], woken: list[int]
) -> None:
    httpx.post(f"{api}/api/v1/rollouts", json=BODY, headers=auth(tokens["operator"]))
    httpx.post(f"{api}/api/v1/rollouts/1/pause", headers=auth(tokens["operator"]))
    httpx.get(f"{api}/api/v1/rollouts/1", headers=auth(tokens["viewer"]))
    assert len(woken) == 2  # changes wake the engine, reads do not
    schema = httpx.get(f"{api}/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/v1/rollouts",
        "/api/v1/rollouts/{rollout_id}",
        "/api/v1/rollouts/{rollout_id}/pause",
        "/api/v1/rollouts/{rollout_id}/resume",
        "/api/v1/rollouts/{rollout_id}/abort",
        "/api/v1/rollouts/{rollout_id}/rollback",
    ):
        assert path in paths, path
    assert "409" in paths["/api/v1/rollouts"]["post"]["responses"]
    assert {"RolloutIn", "RolloutDetailOut", "StageOut", "RolloutDeviceOut"} <= set(
        schema["components"]["schemas"]
    )


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli(api: str, tokens: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(tmp_path, url=api, token=tokens["operator"])


def test_cli_create_status_list_pause_resume_abort(cli: Cli, fleet: Fleet) -> None:
    created = cli(
        "rollout", "create", "face@2.0.0", "--select", "tag=site:berlin", "--select", "cam-04",
        "--stream", "cam0", "--stages", "1,50%,100%", "--bake", "1m30s", "--max-failures", "10%",
        "--min-executed", "2", "--timeout", "2m",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert created.stdout.splitlines() == [
        "created rollout 1: face@2.0.0 on 4 devices (stream cam0), stages 1,2,4, bake 1m30s",
        "follow it: edgefleet rollout watch 1",
    ]
    shown = cli.json("rollout", "status", "1")
    assert (shown["bake_s"], shown["timeout_s"], shown["max_failures"]) == (90.0, 120.0, 0.1)
    fleet.tick()
    fleet.act(fail={"face@2.0.0": "golden_mismatch"})
    fleet.tick(1)
    table = cli("rollout", "status", "1")
    assert table.exit_code == 0, table.output
    assert "golden_mismatch" in table.stdout and "stage_failed" in table.stdout
    listed = cli("rollout", "list")
    assert "face@2.0.0" in listed.stdout and "aborted" in listed.stdout
    assert [r["id"] for r in cli.json("rollout", "list", "--state", "aborted")] == [1]
    watched = cli("rollout", "watch", "1")
    assert watched.exit_code == 1
    assert watched.stderr.startswith("error: rollout 1 aborted (stage_failed): stage 1: 1 of 1")
    assert "Traceback" not in watched.output

    second = cli.json(
        "rollout", "create", "face@2.0.0", "--select", "all", "--stages", "100%", "--bake", "0"
    )
    assert cli("rollout", "pause", str(second["id"])).stdout.startswith("rollout 2 paused")
    assert cli("rollout", "resume", "2").stdout == "rollout 2 resumed\n"
    overlap = cli("rollout", "create", "face@2.0.0", "--select", "cam-01")
    assert overlap.exit_code == 1
    assert overlap.stderr.startswith(
        "error: request refused (409): 1 selected (device, stream) pair(s)"
    )
    assert "are in rollout 2 (face@2.0.0, active)" in overlap.stderr
    fleet.tick(1)
    fleet.act()
    fleet.tick(1)
    done = cli("rollout", "watch", "2")
    assert done.exit_code == 0 and "rollout 2 completed" in done.stdout
    refused = cli("rollout", "abort", "2")
    assert refused.exit_code == 1 and "`edgefleet rollout rollback 2`" in refused.stderr
    rolled = cli("rollout", "rollback", "2", "--reason", "customer complaint")
    assert rolled.exit_code == 0 and "rolled back" in rolled.stdout
    assert (
        cli.json("rollout", "status", "2")["detail"]
        == "rolled back by token 't-operator': customer complaint"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bake", "10x"), "error: --bake '10x' is not a duration: use e.g. 30s, 10m, 1h"),
        (("--max-failures", "lots"), "error: --max-failures 'lots' is not a percentage"),
        (("--stages", "1,0"), "error: stage '0' is neither a device count"),
        (("--timeout", "0s"), "error: --timeout '0s' must be above 0"),
    ],
)
def test_cli_checks_its_arguments_before_any_request(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    stderr = rollout_create_refused(tmp_path, *args)
    assert stderr.startswith(message), stderr


def test_cli_unknown_model_says_how_to_push_it(cli: Cli) -> None:
    result = cli("rollout", "create", "face@3.0.0", "--select", "all")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no model face@3.0.0 in the registry; upload it first")
    assert "edgefleet model push" in result.stderr
    missing = cli("rollout", "status", "42")
    assert missing.exit_code == 1 and "no rollout 42; `edgefleet rollout list`" in missing.stderr


def test_cli_watch_on_a_terminal_draws_the_stages_live(
    cli: Cli, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    from controller.cli import rollouts as cli_module

    screen = io.StringIO()
    monkeypatch.setattr(
        cli_module, "make_console", lambda: Console(file=screen, force_terminal=True, width=120)
    )
    cli.json(
        "rollout", "create", "face@2.0.0", "--select", "all", "--stages", "1,100%", "--bake", "0"
    )
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    fleet.tick(1)
    fleet.act()
    fleet.tick(1)
    watched = cli("rollout", "watch", "1", "--interval", "0.05")
    assert watched.exit_code == 0, watched.output
    drawn = screen.getvalue()
    assert "STAGE" in drawn and "rollout 1 completed, stage 2/2, 5/5 succeeded" in drawn
    assert "\x1b[" in drawn  # drawn with terminal control sequences
