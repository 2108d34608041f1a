"""End to end: real Mosquitto, the controller as a process, a simulated device as a process
(SIGKILLed to trigger its last will), and the CLI over real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.broker import Mosquitto
from tests.controller.conftest import Cli
from tests.controller.controller_proc import ControllerProcess
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def controller_proc(
    db_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> Iterator[tuple[str, Path, Path]]:
    """The controller as a real process: its URL, config and log."""
    ctl = ControllerProcess(tmp_path, db_url, mosquitto)
    ctl.start()
    try:
        yield ctl.url, ctl.config, ctl.logs[0]
    finally:
        ctl.stop()  # a clean shutdown: stop() ran (uvicorn re-raises SIGTERM after it stops)
    assert "Traceback" not in ctl.tail()


def test_device_appears_reports_telemetry_and_goes_offline_when_killed(
    controller_proc: tuple[str, Path, Path], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    url, config, log = controller_proc
    cli = Cli(tmp_path)
    viewer = cli.json("tokens", "create", "--role", "viewer", "--config", str(config))["token"]
    operator = cli.json("tokens", "create", "--role", "operator", "--config", str(config))["token"]

    sim_log = tmp_path / "sim.log"
    with sim_log.open("wb") as out:
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.simulator",
                "--broker",
                mosquitto.url,
                "--devices",
                "1",
                "--prefix",
                "e2e",
                "--telemetry-interval",
                "0.2",
                "--event",
                "source.unreachable",
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def device(state: str) -> Any:
            found = cli.json("--url", url, "--token", viewer, "devices", "list")
            return next((d for d in found if d["id"] == "e2e-0001" and d["state"] == state), None)

        online = wait_for(lambda: device("online"), timeout=20, what="the device to be online")
        assert online["agent_version"] == "sim-0.1.0"
        assert online["streams"][0]["active_model"] == "blazeface-short-int8@1"

        def stored_samples() -> int:
            resp = httpx.get(
                f"{url}/api/v1/devices/e2e-0001/telemetry",
                headers={"Authorization": f"Bearer {viewer}"},
            )
            return len(resp.json()["samples"])

        wait_for(lambda: stored_samples() >= 3, timeout=20, what="telemetry to be stored")
        shown = cli.json("--url", url, "--token", viewer, "devices", "show", "e2e-0001")
        assert shown["telemetry"][0]["streams"][0]["name"] == "cam0"
        assert [e["code"] for e in shown["events"]] == ["source.unreachable"]

        # Roles: a viewer may not tag (403), an operator may.
        refused = cli("--url", url, "--token", viewer, "devices", "tag", "e2e-0001", "lab")
        assert refused.exit_code == 1
        assert "403" in refused.stderr and "needs operator" in refused.stderr
        assert "Traceback" not in refused.output
        tagged = cli("--url", url, "--token", operator, "devices", "tag", "e2e-0001", "lab")
        assert tagged.exit_code == 0 and "lab" in tagged.stdout

        # No token: 401; a wrong token: 401 with how to create one.
        assert httpx.get(f"{url}/api/v1/devices").status_code == 401
        missing = cli("--url", url, "devices", "list")
        assert missing.exit_code == 1 and "missing bearer token" in missing.stderr
        wrong = cli("--url", url, "--token", "efc_wrong", "devices", "list")
        assert wrong.exit_code == 1
        assert "401" in wrong.stderr and "edgefleet tokens create" in wrong.stderr

        # Power loss: SIGKILL, the broker publishes the retained last will.
        sim.send_signal(signal.SIGKILL)
        sim.wait(timeout=10)
        offline = wait_for(lambda: device("offline"), timeout=20, what="the last will")
        assert offline["online"] is False
        table = cli("--url", url, "--token", viewer, "devices", "list")
        assert "e2e-0001" in table.stdout and "offline" in table.stdout
    except BaseException:
        print("controller log:\n" + _tail(log) + "\nsimulator log:\n" + _tail(sim_log))
        raise
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
