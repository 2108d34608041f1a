"""docs/first-hour.md, walked as a new user walks it (issue 11).

The commands are the doc's own: every line after a ``$ `` prompt in its ``console`` blocks,
run in order by bash, with HOME in a temporary folder and another broker already listening
on 1883 (this machine's system Mosquitto, or one started here). The install is real: the
doc's ``git clone`` (its URL is a placeholder) is a copy of the files git tracks or would
track, as a clone of this commit has them; ``make install-runtime mosquitto`` builds the
checkout's own ``.venv`` with pip (the host's pip settings and cache pass through, as they
would for a user); ``source .venv/bin/activate`` puts it first on PATH. The two
long-running commands (``controller serve``, ``edgefleet-agent run``) run in the background
as they would in their own terminals; the ``export`` line is the one the controller
printed. For the key lines below the test checks that the doc shows them and that the real
output has them, so the doc and the product cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.broker import Mosquitto, free_port
from tests.waiting import stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "first-hour.md"
EXPORT = re.compile(r"export EDGEFLEET_URL=\S+ EDGEFLEET_TOKEN=\S+")
BACKGROUND = ("edgefleet controller serve ", "edgefleet-agent run ")
POLLED = ("edgefleet devices list", "edgefleet devices show ")
"""Status commands a user runs again until the change shows (they are asynchronous)."""

# (command as in the doc, its occurrence there from 1) -> lines its output must have.
KEY_LINES: dict[tuple[str, int], list[str]] = {
    ("edgefleet keys generate --out keys", 1): ["public key:  keys/signing.pub"],
    (
        "edgefleet controller serve --data-dir fleet --dev-token --trusted-key keys/signing.pub",
        1,
    ): [
        "port 1883 on 127.0.0.1 is taken",
        "embedded MQTT broker (mosquitto): mqtt://127.0.0.1:",
        "model bundles must be signed with: ",
        "export EDGEFLEET_URL=",
        "ready",
    ],
    (
        "edgefleet devices enroll cam-1 --source inference/assets/face-walk-640x480.mp4"
        " --state-dir cam-1-state --out cam-1.toml",
        1,
    ): ["agent config cam-1.toml (broker mqtt://127.0.0.1:", "user 'cam-1')"],
    ("cat cam-1.toml", 1): [
        'device_id = "cam-1"',
        'username = "cam-1"',
        'trusted_keys = ["cam-1-trusted-0.pub"]',
        'source = "inference/assets/face-walk-640x480.mp4"',
        'model = "builtin:blazeface-short-int8"',
    ],
    ("edgefleet-agent check-config cam-1.toml", 1): ["cam-1.toml: OK"],
    ("edgefleet-agent run -c cam-1.toml", 1): ["ready: 1 of 1 streams running"],
    ("edgefleet devices list", 1): [
        "│ cam-1  │ online │ 0.1.0 │ blazeface-short-int8@1.0.0 │",
        "1 device, 1 online",
    ],
    (
        "edgefleet model publish inference/assets/blazeface-short-int8.tflite"
        " --version 1.1.0 --key keys/signing.key",
        1,
    ): ["uploaded blazeface-short-int8@1.1.0", "signed, key"],
    (
        "edgefleet rollout create blazeface-short-int8@1.1.0 --select cam-1 --stages 1 --bake 0s",
        1,
    ): ["created rollout 1: blazeface-short-int8@1.1.0 on 1 devices"],
    ("edgefleet rollout watch 1", 1): [
        "rollout 1 completed: blazeface-short-int8@1.1.0 on 1 executions, 0 failed"
    ],
    ("edgefleet devices show cam-1", 1): [
        "│ blazeface-short-int8@1.1.0 │ blazeface-short-int8@1.0.0 │ committed │",
        "ota.committed: blazeface-short-int8@1.1.0 passed probation",
    ],
    ("edgefleet rollout rollback 1", 1): ["rollout 1 rolled back"],
    ("edgefleet devices show cam-1", 2): [
        "│ blazeface-short-int8@1.0.0 │ blazeface-short-int8@1.1.0 │ committed │",
        "ota.committed: back on the baseline model",
    ],
    ("edgefleet controller serve --data-dir fleet --trusted-key keys/signing.pub", 1): [
        "embedded MQTT broker (mosquitto): mqtt://127.0.0.1:",
        "ready",
    ],
    ("edgefleet devices show cam-1", 3): ["cam-1  online  agent 0.1.0"],
    ("edgefleet devices revoke cam-1", 1): ["revoked the broker login of 'cam-1'"],
    ("edgefleet devices list", 2): ["│ cam-1  │ revoked │", "1 device, 0 online"],
}

# (command, occurrence) -> lines the agent's terminal shows after it (the doc shows them too).
AGENT_LINES: dict[tuple[str, int], list[str]] = {
    ("edgefleet rollout watch 1", 1): [
        "verified with key",
        "now running blazeface-short-int8@1.1.0 (was blazeface-short-int8@1.0.0)",
        "committed blazeface-short-int8@1.1.0: blazeface-short-int8@1.1.0 passed probation",
    ],
    ("edgefleet controller serve --data-dir fleet --trusted-key keys/signing.pub", 1): [
        "reconnected to MQTT broker"
    ],
    ("edgefleet devices revoke cam-1", 1): ["refused the connection: Not authorized"],
}


@dataclass
class Step:
    command: str
    occurrence: int
    shown: list[str] = field(default_factory=list)
    """The output the doc shows under the command."""


def doc_steps(text: str) -> list[Step]:
    """The ``$ `` commands of the doc's ``console`` blocks, in order, with their output."""
    steps: list[Step] = []
    seen: dict[str, int] = {}
    fence: str | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "console":
            continue
        if line.startswith("$ "):
            command = line[2:].strip()
            seen[command] = seen.get(command, 0) + 1
            steps.append(Step(command, seen[command]))
        elif steps:
            steps[-1].shown.append(line)
    return steps


def console_text(text: str) -> str:
    """Everything inside the doc's ``console`` blocks."""
    return "\n".join(re.findall(r"^```console\n(.*?)^```", text, flags=re.S | re.M))


def test_the_doc_shows_the_key_lines() -> None:
    text = DOC.read_text(encoding="utf-8")
    steps = {(s.command, s.occurrence): s for s in doc_steps(text)}
    for key, lines in KEY_LINES.items():
        assert key in steps, f"docs/first-hour.md has no `$ {key[0]}` (occurrence {key[1]})"
        shown = "\n".join(steps[key].shown)
        for line in lines:
            assert line in shown, f"the doc shows no {line!r} under `$ {key[0]}`"
    agent_output = console_text(text)
    for key, lines in AGENT_LINES.items():
        assert key in steps, key
        for line in lines:
            assert line in agent_output, f"the doc shows no agent line {line!r}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/first-hour.md" in readme, "README.md links the tutorial"


# --- the walk ----------------------------------------------------------------------------


def clean_checkout(dest: Path) -> None:
    """The files git tracks (or would: untracked, not ignored), as a fresh clone has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def pip_environment() -> dict[str, str]:
    """The host's pip settings (index, certificates, constraints) and cache, as a user's pip
    would find them in their own HOME: the walk's HOME is a temporary folder."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    if "PIP_CACHE_DIR" not in env:
        cache = subprocess.run(
            [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True
        ).stdout.strip()
        if cache:
            env["PIP_CACHE_DIR"] = cache
    for name in ("XDG_CONFIG_HOME", "PIP_CONFIG_FILE"):
        if name in os.environ:
            env[name] = os.environ[name]
    if "PIP_CONFIG_FILE" not in env:
        user_conf = Path.home() / ".config" / "pip" / "pip.conf"
        if user_conf.is_file():
            env["PIP_CONFIG_FILE"] = str(user_conf)
    return env


@pytest.fixture
def broker_on_1883(tmp_path: Path) -> Iterator[None]:
    """Another broker listening on 127.0.0.1:1883, as on a machine with the Debian service."""
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            taken = True
    except OSError:
        taken = False
    if taken:
        yield
        return
    with Mosquitto(tmp_path / "system-broker", port=1883):
        yield


CLONE = "git clone <the edgefleet repository URL> edgefleet && cd edgefleet"
INSTALL = "make install-runtime mosquitto"
ACTIVATE = "source .venv/bin/activate"


class Walk:
    def __init__(self, tmp: Path) -> None:
        self.cwd = tmp
        self.tmp = tmp
        # FIRST_HOUR_API_PORT=8080 reproduces the doc's outputs exactly (when 8080 is free).
        self.api_port = int(os.environ.get("FIRST_HOUR_API_PORT") or free_port())
        home = tmp / "home"
        home.mkdir()
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "COLUMNS": "120",  # a terminal wide enough for the tables
        }
        self.background: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.transcript: list[str] = []
        self.restarted_at = 0.0

    def log(self, name: str) -> str:
        return self.background[name][1].read_text(encoding="utf-8", errors="replace")

    def start(self, name: str, command: str, ready: str) -> str:
        if name in self.background:  # Ctrl-C in that terminal first
            proc, _ = self.background.pop(name)
            assert stop_process(proc, timeout=15), f"{name} did not stop on SIGTERM"
        log = self.tmp / f"{name}-{len(self.transcript)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                shlex.split(command), cwd=self.cwd, env=self.env, stdout=out, stderr=out
            )
        self.background[name] = (proc, log)

        def up() -> bool:
            assert proc.poll() is None, f"`{command}` exited:\n{self.log(name)}"
            lines = self.log(name).splitlines()
            return any(line == ready or line.endswith(f" {ready}") for line in lines)

        wait_for(up, timeout=60, what=lambda: f"`{command}` to be ready:\n{self.log(name)}")
        return self.log(name)

    def run(
        self, command: str, timeout: float = 120, extra_env: dict[str, str] | None = None
    ) -> str:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{output}"
        return output

    def step(self, step: Step) -> None:
        command, key = step.command, (step.command, step.occurrence)
        expected = KEY_LINES.get(key, [])
        if command.split("#")[0].strip() == CLONE:
            self.cwd = self.tmp / "edgefleet"
            clean_checkout(self.cwd)
            output = ""
        elif command.split("#")[0].strip() == INSTALL:
            output = self.run(command, timeout=900, extra_env=pip_environment())
        elif command.split("#")[0].strip() == ACTIVATE:
            output = ""
            for line in self.run(f"{ACTIVATE} && env").splitlines():
                name, _, value = line.partition("=")
                if name in ("PATH", "VIRTUAL_ENV"):
                    self.env[name] = value
        elif command.startswith("export EDGEFLEET_URL="):
            printed = EXPORT.findall(self.log("controller"))
            assert printed, f"the controller printed no export line:\n{self.log('controller')}"
            assert EXPORT.fullmatch(command), command
            for assignment in printed[-1].split()[1:]:
                name, value = assignment.split("=", 1)
                self.env[name] = value
            output = printed[-1]
        elif command.startswith(BACKGROUND[0]):
            if "controller" in self.background:
                self.restarted_at = time.time()
            output = self.start("controller", f"{command} --port {self.api_port}", "ready")
        elif command.startswith(BACKGROUND[1]):
            output = self.start("agent", command, expected[0])
        elif command.startswith(POLLED):
            last = [""]

            def shows() -> bool:
                last[0] = self.run(command)
                return all(line in last[0] for line in expected)

            wait_for(shows, timeout=30, what=lambda: f"`{command}` to show {expected}:\n{last[0]}")
            output = last[0]
        else:
            output = self.run(command)
        self.transcript.append(f"$ {command}\n{output}")
        for line in expected:
            assert line in output, f"`{command}` printed no {line!r}:\n{output}"
        for line in AGENT_LINES.get(key, []):
            self.agent_logs(line)

    def agent_logs(self, line: str) -> None:
        wait_for(
            lambda: line in self.log("agent"),
            timeout=30,
            what=lambda: f"the agent to log {line!r}:\n{self.log('agent')}",
        )

    def heard_again(self) -> None:
        """After the restart the device is authorised still: its agent reconnected with its
        own login (AGENT_LINES) and the controller hears its telemetry again."""
        seen: list[dict[str, object]] = [{}]

        def telemetry_since_restart() -> bool:
            seen[0] = json.loads(self.run("edgefleet devices show cam-1 --json"))["device"]
            telemetry_at = seen[0].get("last_telemetry_at")
            return isinstance(telemetry_at, float) and telemetry_at > self.restarted_at

        wait_for(
            telemetry_since_restart,
            timeout=30,
            interval=1,
            what=lambda: f"telemetry from cam-1 after the restart: {seen[0]}",
        )

    def stop(self) -> None:
        for proc, _ in self.background.values():
            stop_process(proc, timeout=15)
        if path := os.environ.get("FIRST_HOUR_TRANSCRIPT"):
            logs = [f"--- {n} ---\n{self.log(n)}" for n in self.background]
            Path(path).write_text("\n".join(self.transcript + logs), encoding="utf-8")


def test_first_hour(tmp_path: Path, broker_on_1883: None) -> None:
    steps = doc_steps(DOC.read_text(encoding="utf-8"))
    assert [s.command.split("#")[0].strip() for s in steps[:3]] == [CLONE, INSTALL, ACTIVATE]
    walk = Walk(tmp_path)
    try:
        for step in steps:
            walk.step(step)
            if step.command.startswith(ACTIVATE):
                # The fresh .venv runs the checkout's code, not this test's environment.
                where = walk.run(
                    "python -c 'import agent, controller as c; print(agent.__file__, c.__file__)'"
                ).split()
                assert all(Path(p).is_relative_to(walk.cwd) for p in where), where
                assert Path(walk.env["VIRTUAL_ENV"]) == walk.cwd / ".venv", walk.env
            if step.command.startswith(BACKGROUND[0]) and walk.restarted_at:
                walk.heard_again()
        assert walk.background["agent"][0].poll() is None, "the agent keeps running"
    finally:
        walk.stop()
