"""End to end: real Mosquitto, the controller as a process, protocol-level simulated devices
that act on their desired state (and really download the bundle), the CLI over real HTTP.

- the happy path through stages (retained desired states, one rev per device);
- a failing canary aborts the rollout and is rolled back, nobody else is touched;
- ``kill -9`` of the controller mid-rollout: the restarted controller continues and no
  device is updated twice;
- a fleet-wide latency spike right after the canary's swap does not abort a good canary,
  a canary that alone gets worse is caught (``health_regression``);
- the real agent (``edgefleet-agent run``) takes a signed bundle through a rollout and back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import Desired, decode
from tests.broker import Mosquitto
from tests.bundle_factory import blazeface_files, blazeface_manifest, build_bundle
from tests.controller.conftest import Cli
from tests.controller.controller_proc import ControllerProcess
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for
from tools.simulator.device import SimulatedDevice
from tools.simulator.ota import OtaBehaviour

TARGET = "face@2.0.0"
BASELINE = "blazeface-short-int8@1"
pytestmark = pytest.mark.slow


@pytest.fixture
def controller(db_url: str, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[ControllerProcess]:
    ctl = ControllerProcess(
        tmp_path, db_url, mosquitto, extra="[rollouts]\ntick_interval_s = 0.2\n"
    )
    ctl.start()
    try:
        yield ctl
    except BaseException:
        print(ctl.tail())
        raise
    finally:
        ctl.stop()
    for log in ctl.logs:
        assert "Traceback" not in log.read_text(errors="replace"), ctl.tail()


def _operator_cli(
    controller: ControllerProcess, tmp_path: Path, key: Ed25519PrivateKey | None
) -> Cli:
    """The CLI with an operator token, pointed at the controller, after uploading face@2.0.0
    (signed with ``key``, if any)."""
    c = Cli(tmp_path, url=controller.url)
    token = c.json("tokens", "create", "--role", "operator", "--config", str(controller.config))
    c.env["EDGEFLEET_TOKEN"] = token["token"]
    efb = build_bundle(
        tmp_path / "face-2.0.0.efb",
        blazeface_manifest(name="face", version="2.0.0"),
        blazeface_files(),
        key=key,
    )
    pushed = c("model", "push", str(efb))
    assert pushed.exit_code == 0, pushed.output
    return c


@pytest.fixture
def cli(controller: ControllerProcess, tmp_path: Path) -> Cli:
    """The CLI with an operator token, pointed at the controller; the model is uploaded."""
    return _operator_cli(controller, tmp_path, key=None)


def _devices(mosquitto: Mosquitto, n: int, behaviour: OtaBehaviour) -> list[SimulatedDevice]:
    devices = []
    for i in range(n):
        dev = SimulatedDevice(
            device_id=f"e2e-{i:02d}",
            broker_url=mosquitto.url,
            telemetry_interval_s=0.5,
            seed=i,
            ota=behaviour,
        )
        dev.connect()
        dev.announce()
        devices.append(dev)
    return devices


@contextmanager
def _fleet(
    mosquitto: Mosquitto, cli: Cli, n: int, behaviour: OtaBehaviour
) -> Iterator[list[SimulatedDevice]]:
    """``n`` simulated devices the controller knows with their streams; stopped at the end."""
    devices = _devices(mosquitto, n, behaviour)
    try:
        _wait_known(cli, n)
        yield devices
    finally:
        for dev in devices:
            dev.stop()


def _wait_known(cli: Cli, n: int) -> None:
    def known() -> bool:
        found = cli.json("devices", "list")
        return len([d for d in found if d["streams"]]) == n

    wait_for(known, timeout=20, what=f"{n} devices with streams in the controller")


def _rollout(cli: Cli, rollout_id: int) -> Any:
    return cli.json("rollout", "status", str(rollout_id))


def _retained_desired(mosquitto: Mosquitto, expect: int) -> dict[str, Desired]:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/+/desired"], persistent=False)
    try:
        if expect:
            sub.wait_for(lambda ms: len(ms) >= expect, timeout=10)
        else:
            time.sleep(0.5)
        assert all(m.retain for m in sub.messages)
        return {m.topic.split("/")[2]: decode(m.payload, Desired) for m in sub.messages}
    finally:
        sub.close()


def test_happy_path_through_stages_with_the_cli(
    controller: ControllerProcess, cli: Cli, mosquitto: Mosquitto
) -> None:
    with _fleet(mosquitto, cli, 5, OtaBehaviour(download=True, phase_delay_s=0.02)) as devices:
        created = cli(
            "rollout", "create", TARGET, "--select", "all", "--stages", "1,50%,100%",
            "--bake", "1s", "--timeout", "30s", "--max-failures", "0%", "--min-executed", "1",
        )  # fmt: skip
        assert created.exit_code == 0, created.output
        assert (
            "created rollout 1: face@2.0.0 on 5 devices (stream *), stages 1,3,5" in created.stdout
        )
        watched = cli("rollout", "watch", "1", "--interval", "0.2")
        assert watched.exit_code == 0, watched.output
        lines = watched.stdout.splitlines()
        assert lines[-1] == "rollout 1 completed: face@2.0.0 on 5 executions, 0 failed"
        assert any("stage 2/3" in line for line in lines)
        status = _rollout(cli, 1)
        assert status["state"] == "completed" and status["created_by"] == "operator"
        assert [(s["devices"], s["state"]) for s in status["stage_progress"]] == [
            (1, "done"),
            (3, "done"),
            (5, "done"),
        ]
        assert {d["status"] for d in status["devices"]} == {"succeeded"}
        # The devices' health gate (shadow, then probation) passed, and its evidence arrived.
        assert {(d["evidence"]["stage"], d["evidence"]["verdict"]) for d in status["devices"]} == {
            ("probation", "pass")
        }
        stages = {d["device_id"]: d["stage"] for d in status["devices"]}
        assert stages == {"e2e-00": 0, "e2e-01": 1, "e2e-02": 1, "e2e-03": 2, "e2e-04": 2}
        for dev in devices:
            assert dev.ota is not None
            assert dev.ota.streams["cam0"]["active"] == TARGET
            assert dev.ota.revs_with(TARGET) == {1}
            assert [m for _, _, m in dev.ota.deployments] == [TARGET]
        retained = _retained_desired(mosquitto, 5)
        assert sorted(retained) == [d.device_id for d in devices]
        ref = retained["e2e-00"].models["cam0"]
        assert retained["e2e-00"].rev == 1 and retained["e2e-00"].rollout_id == "1"
        assert ref.url.startswith(f"{controller.url}/api/v1/models/face/2.0.0/bundle?key=")
        table = cli("rollout", "list")
        assert table.exit_code == 0 and "face@2.0.0" in table.stdout and "completed" in table.stdout
        shown = cli("rollout", "status", "1")
        assert shown.exit_code == 0 and "5/5 succeeded" in shown.stdout


def test_a_failing_canary_aborts_and_is_rolled_back(
    controller: ControllerProcess, cli: Cli, mosquitto: Mosquitto
) -> None:
    behaviour = OtaBehaviour(fail={TARGET: "golden_mismatch"}, phase_delay_s=0.02)
    with _fleet(mosquitto, cli, 4, behaviour) as devices:
        created = cli.json(
            "rollout", "create", TARGET, "--select", "all", "--stages", "1,100%", "--bake", "1s",
            "--min-executed", "5",
        )  # fmt: skip
        watched = cli("rollout", "watch", str(created["id"]), "--interval", "0.2")
        assert watched.exit_code == 1
        assert watched.stderr.startswith("error: rollout 1 aborted (stage_failed): stage 1: 1 of 1")
        assert "e2e-00/cam0: golden_mismatch" in watched.stderr
        status = _rollout(cli, 1)
        canary = next(d for d in status["devices"] if d["device_id"] == "e2e-00")
        assert canary["status"] == "rolled_back" and canary["reason"] == "golden_mismatch"
        assert canary["rev"] == 1 and canary["rollback_rev"] == 2
        assert {d["status"] for d in status["devices"] if d["device_id"] != "e2e-00"} == {"pending"}
        ota = devices[0].ota
        assert ota is not None
        # The rollback rev is published right after the tick that wrote it.
        wait_for(
            lambda: ota.handled_rev == 2, timeout=10, what="the canary to take up the rollback"
        )
        assert ota.streams["cam0"]["active"] == BASELINE
        retained = _retained_desired(mosquitto, 1)
        assert list(retained) == ["e2e-00"]  # no other device ever got a desired state
        assert retained["e2e-00"].rev == 2 and retained["e2e-00"].models == {}  # baseline
        assert all(d.ota is not None and d.ota.received == [] for d in devices[1:])
        again = cli("rollout", "rollback", "1")
        assert again.exit_code == 1 and "already got their previous models back" in again.stderr


def test_kill_9_mid_rollout_the_restarted_controller_continues_without_updating_twice(
    controller: ControllerProcess, cli: Cli, mosquitto: Mosquitto
) -> None:
    with _fleet(mosquitto, cli, 6, OtaBehaviour(download=True, phase_delay_s=0.15)) as devices:
        created = cli.json(
            "rollout", "create", TARGET, "--select", "all", "--stages", "1,3,100%",
            "--bake", "0.5s", "--timeout", "60s",
        )  # fmt: skip
        rid = str(created["id"])

        def in_stage_2() -> bool:
            r = cli.json("rollout", "status", rid)
            working = r["counts"].get("queued", 0) + r["counts"].get("in_progress", 0)
            return bool(r["current_stage"] == 1 and working > 0)

        wait_for(in_stage_2, timeout=30, what="stage 2 to be under way")
        controller.kill()
        time.sleep(0.5)  # the devices keep working while the controller is down
        controller.start()
        watched = cli("rollout", "watch", rid, "--interval", "0.2")
        assert watched.exit_code == 0, watched.output
        status = _rollout(cli, int(rid))
        assert status["state"] == "completed", status
        assert {d["status"] for d in status["devices"]} == {"succeeded"}
        revs = {d["device_id"]: d["rev"] for d in status["devices"]}
        for dev in devices:
            assert dev.ota is not None
            # Exactly one desired rev carried the target to each device (re-publications
            # after the restart repeat that rev), and each deployed it exactly once.
            assert dev.ota.revs_with(TARGET) == {revs[dev.device_id]}
            assert [m for _, _, m in dev.ota.deployments] == [TARGET]
            assert dev.ota.streams["cam0"]["active"] == TARGET


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_fleet_wide_spike_does_not_abort_a_good_canary_and_a_canary_alone_worse_is_caught(
    controller: ControllerProcess, cli: Cli, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    slow = "face@3.0.0"
    spike: list[float] = []  # when every device's inference p95 rose 4x (a machine-wide load)
    behaviour = OtaBehaviour(
        slow=frozenset({slow}),
        phase_delay_s=0.02,
        load=lambda ts: 4.0 if spike and ts >= spike[0] else 1.0,
    )
    devices = _devices(mosquitto, 5, behaviour)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.1):
            for dev in devices:
                dev.publish_telemetry(wait=False)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        _wait_known(cli, 5)
        time.sleep(3)  # ~30 samples per device before the rollout
        first = cli.json(
            "rollout", "create", TARGET, "--select", "all", "--stages", "1,100%",
            "--bake", "1.5s", "--timeout", "30s",
        )  # fmt: skip
        canary = devices[0].ota
        assert canary is not None
        wait_for(
            lambda: canary.streams["cam0"]["active"] == TARGET, timeout=10, what="the canary swap"
        )
        spike.append(time.time())
        watched = cli("rollout", "watch", str(first["id"]), "--interval", "0.2")
        assert watched.exit_code == 0, watched.output
        assert _rollout(cli, first["id"])["state"] == "completed"
        # The spike goes on; now a model that only makes the canary slower (3x, half the fps).
        efb = build_bundle(
            tmp_path / "face-3.0.0.efb",
            blazeface_manifest(name="face", version="3.0.0"),
            blazeface_files(),
            key=None,
        )
        assert cli("model", "push", str(efb)).exit_code == 0
        second = cli.json(
            "rollout", "create", slow, "--select", "all", "--stages", "1,100%",
            "--bake", "1.5s", "--timeout", "30s",
        )  # fmt: skip
        watched = cli("rollout", "watch", str(second["id"]), "--interval", "0.2")
        assert watched.exit_code == 1, watched.output
        assert "aborted (health_regression): canary inference p95 rose" in watched.stderr
        assert "while the 4 devices not updated changed 1.0x over the same window" in (
            watched.stderr
        )
        wait_for(
            lambda: canary.streams["cam0"]["active"] == TARGET,
            timeout=10,
            what="the canary to get its previous model back",
        )
        assert all(d.ota is not None and d.ota.revs_with(slow) == set() for d in devices[1:])
    finally:
        stop.set()
        thread.join(5)
        for dev in devices:
            dev.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_real_agent_takes_a_signed_model_through_a_rollout_and_back(
    controller: ControllerProcess, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The contract with the real agent (docs/ota.md): download via the desired URL and its
    key, verify the signature, stage, swap, probation, commit; the rollback's desired state
    (stream absent) brings it back to its baseline."""
    from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
    from tests.bundle_factory import write_public_key

    key = Ed25519PrivateKey.generate()
    pub = write_public_key(key, tmp_path / "signing.pub")
    c = _operator_cli(controller, tmp_path, key=key)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    config = write_config(
        agent_dir,
        port=mosquitto.port,
        streams=stream_block("front", source=str(VIDEO)),
        extra=f'[ota]\ntrusted_keys = ["{pub}"]\nprobation_s = 1\n',
    )
    proc = start_agent(config, agent_dir / "agent.log")
    try:

        def running() -> bool:
            found = c.json("devices", "list")
            return bool(found and found[0]["streams"] and found[0]["streams"][0]["active_model"])

        wait_for(running, timeout=30, what="the agent's stream to run")
        baseline = c.json("devices", "show", "cam-01")["device"]["streams"][0]["active_model"]
        c.json(
            "rollout", "create", TARGET, "--select", "cam-01", "--stream", "front",
            "--stages", "100%", "--bake", "0.5s", "--timeout", "60s",
        )  # fmt: skip
        watched = c("rollout", "watch", "1", "--interval", "0.2")
        assert watched.exit_code == 0, watched.output + (agent_dir / "agent.log").read_text()
        stream = c.json("devices", "show", "cam-01")["device"]["streams"][0]
        assert (stream["active_model"], stream["phase"], stream["target"]) == (
            TARGET,
            "committed",
            TARGET,
        )
        assert c("rollout", "rollback", "1").exit_code == 0

        def back() -> bool:
            device = c.json("devices", "show", "cam-01")["device"]
            s = device["streams"][0]
            return bool(
                device["desired_rev"] == 2
                and s["phase"] == "committed"
                and s["active_model"] == baseline
            )

        wait_for(back, timeout=30, what="the agent to switch back to its baseline")
        codes = [e["code"] for e in reversed(c.json("devices", "show", "cam-01")["events"])]
        assert codes[-2:] == ["ota.switching", "ota.committed"]
    finally:
        stop_agent(proc)
