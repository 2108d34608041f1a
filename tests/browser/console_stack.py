"""The processes behind the console's browser tests: ``edgefleet controller serve`` with its
embedded Mosquitto, a real agent on the shipped video with snapshots on, and simulated devices
(tools/simulator) that deploy models, fail one on purpose, or have gone offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from controller.cli import main
from controller.keys import generate_keys
from tests.agent_proc import REPO, VIDEO, start_agent, stream_block
from tests.broker import free_port
from tests.waiting import stop_process, wait_for

MODEL = "blazeface-short-int8"
MODEL_FILE = REPO / "inference" / "assets" / "blazeface-short-int8.tflite"
GOLDEN_IMAGE = REPO / "tests" / "data" / "astronaut.png"
SOURCE_COMMIT = "0123abcd"
TRAINING_DATA = "faces-2026-11"
GOOD = "1.1.0"
BAD = "1.2.0"
"""Every simulated device fails to deploy this version (``--fail``, golden_mismatch)."""
AGENT_ID = "cam-01"
AGENT_STREAM = "front"
SIMULATED = 20
SIM_PREFIX = "sim"
SIM_EVENT = "source.unreachable"
"""Each simulated device publishes this event when it starts."""
GONE_PREFIX = "gone"
GONE = 2
"""Simulated devices that sent one telemetry message and said goodbye (offline)."""
LAB_TAG = "site:lab"
LAB_DEVICES = ("sim-0009", "sim-0010")
PHASE_DELAY_S = 0.3
"""Seconds per simulated OTA phase: a three-stage rollout takes several seconds, long enough
to see it change live on its page."""


def sim_id(n: int) -> str:
    return f"{SIM_PREFIX}-{n:04d}"


@dataclass
class ConsoleStack:
    """The running controller and its devices; ``url`` is the controller's base URL."""

    tmp: Path
    api_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    key_id: str = ""
    """The id of the key the models are signed with."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(name)}" for name in self.procs)

    # --- processes ---------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        with self.log(name).open("ab") as out:
            self.procs[name] = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )

    def _alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def start(self) -> None:
        private, public, self.key_id = generate_keys(self.tmp / "keys")
        self._spawn(
            "controller",
            [
                sys.executable,
                "-m",
                "controller",
                "controller",
                "serve",
                "--data-dir",
                str(self.data),
                "--dev-token",
                "--port",
                str(self.api_port),
                "--mqtt-port",
                "0",
                "--trusted-key",
                str(public),
            ],
        )

        def ready() -> bool:
            self._alive("controller")
            return "\nready" in self.tail("controller", 100_000)

        wait_for(ready, timeout=40, what=lambda: f"the controller to be ready:\n{self.logs()}")
        self.tokens["admin"] = (self.data / "dev-token").read_text().strip()
        for role in ("viewer", "operator"):
            out = self.cli(
                "tokens", "create", "--data-dir", str(self.data), "--role", role, "--json"
            )
            self.tokens[role] = json.loads(out)["token"]
        publish = ["model", "publish", str(MODEL_FILE), "--key", str(private)]
        self.cli(*publish, "--version", BAD, api=True)
        self.cli(
            *publish, "--version", GOOD, "--golden", str(GOLDEN_IMAGE),
            "--source-commit", SOURCE_COMMIT, "--training-data", TRAINING_DATA, api=True,
        )  # fmt: skip
        self._start_devices()

    def broker(self) -> tuple[str, str, str]:
        """The embedded broker's URL and the shared login (DATA/broker/agent.toml)."""
        snippet = (self.data / "broker" / "agent.toml").read_text()
        values = dict(
            (k.strip(), v.strip().strip('"'))
            for k, _, v in (ln.partition("=") for ln in snippet.splitlines() if "=" in ln)
        )
        return values["url"], values["username"], values["password"]

    def _start_devices(self) -> None:
        url, username, password = self.broker()
        sim = [sys.executable, "-m", "tools.simulator", "--broker", url]
        sim += ["--username", username, "--password", password]
        self._spawn(
            "simulator",
            [
                *sim,
                "--devices",
                str(SIMULATED),
                "--prefix",
                SIM_PREFIX,
                "--telemetry-interval",
                "1",
                "--fail",
                f"{MODEL}@{BAD}",
                "--phase-delay",
                str(PHASE_DELAY_S),
                "--event",
                SIM_EVENT,
            ],
        )
        # Two devices that report once and leave (a graceful offline status).
        self.simulate("--devices", str(GONE), "--prefix", GONE_PREFIX, "--count", "1")
        config = self.tmp / "agent.toml"
        config.write_text(
            f'device_id = "{AGENT_ID}"\nstate_dir = "{self.tmp / "agent-state"}"\n\n'
            f'[broker]\nurl = "{url}"\nusername = "{username}"\npassword = "{password}"\n\n'
            "[telemetry]\ninterval_s = 1.0\n\n"
            "[snapshots]\nenabled = true\ninterval_s = 2\n\n"
            + stream_block(AGENT_STREAM, source=str(VIDEO), extra="fps = 5.0")
        )
        self.procs["agent"] = start_agent(config, self.log("agent"))

        def everyone_known() -> bool:
            self._alive("simulator")
            self._alive("agent")
            devices = {d["id"]: d for d in self.api("viewer", "/api/v1/devices")["devices"]}
            online = {i for i, d in devices.items() if d["online"]}
            expected = {AGENT_ID, *(sim_id(n) for n in range(1, SIMULATED + 1))}
            gone_ids = {f"{GONE_PREFIX}-{n:04d}" for n in range(1, GONE + 1)}
            return expected <= online and gone_ids <= set(devices) - online

        wait_for(everyone_known, timeout=60, what=lambda: f"every device known:\n{self.logs()}")
        for device in LAB_DEVICES:
            self.cli("devices", "tag", device, LAB_TAG, api=True)

    def simulate(self, *args: str) -> None:
        """Run ``python -m tools.simulator ARGS`` on the broker to its end (e.g. ``--count``)."""
        url, username, password = self.broker()
        command = [sys.executable, "-m", "tools.simulator", "--broker", url]
        command += ["--username", username, "--password", password, *args]
        done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name], timeout=15)

    # --- talking to it -----------------------------------------------------------------

    def cli(self, *args: str, api: bool = False) -> str:
        """``edgefleet ARGS`` (in process); ``api``: against this controller as admin."""
        prefix = ["--url", self.url, "--token", self.tokens["admin"]] if api else []
        result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
        assert result.exit_code == 0, f"edgefleet {' '.join(args)}: {result.output}"
        return result.output

    def api(self, role: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
        """The JSON answer of the HTTP API (a bearer token of ``role``)."""
        resp = httpx.request(
            method,
            f"{self.url}{path}",
            headers={"Authorization": f"Bearer {self.tokens[role]}"},
            json=body,
            timeout=10,
        )
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        found: dict[str, Any] = self.api("viewer", f"/api/v1/rollouts/{rollout_id}")
        return found
