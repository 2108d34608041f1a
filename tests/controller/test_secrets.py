"""Secrets never reach a log: the real controller process at debug level with its embedded
broker, the CLI as real processes (``-vv``) with a valid and a wrong token, a token made
through the API, a simulated device using the broker password, ``devices enroll``; then
every byte of output is searched for every secret."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.broker import free_port
from tests.controller.controller_proc import wait_healthy
from tests.waiting import stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

WRONG_TOKEN = "efc_deliberately-wrong-token-0123456789abcdefghijklmn"


class Outputs:
    """Runs processes with their stdout/stderr in files under ``folder``; lists the files."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.n = 0

    def files(self, name: str) -> tuple[Path, Path]:
        self.n += 1
        return self.folder / f"{self.n:02d}-{name}.out", self.folder / f"{self.n:02d}-{name}.err"

    def cli(self, *args: str, name: str, private: bool = False) -> subprocess.CompletedProcess[str]:
        """``edgefleet -vv ARGS`` as a process. ``private``: its stdout is meant to show a
        secret (``tokens create``), so it is kept out of the searched folder."""
        out, err = self.files(name)
        if private:
            out = self.folder.parent / f"{out.name}.private"
        with out.open("w") as o, err.open("w") as e:
            done = subprocess.run(
                [sys.executable, "-m", "controller", "-vv", *args],
                cwd=REPO,
                env=self.env,
                stdout=o,
                stderr=e,
                text=True,
                timeout=60,
                check=False,
            )
        done.stdout, done.stderr = out.read_text(), err.read_text()
        return done


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    base["XDG_CONFIG_HOME"] = str(tmp_path / "home")
    base["PATH"] = base.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
    return base


@pytest.fixture
def secret_db(db_url: str, env: dict[str, str]) -> Iterator[tuple[str | None, str]]:
    """(DB password or None, URL); PostgreSQL gets a password (the server trusts loopback,
    so it is not checked, but it is in the URL the controller handles), via the env."""
    if db_url.startswith("postgresql"):
        password = "db-pass-" + os.urandom(8).hex()
        url = db_url.replace("postgres@", f"postgres:{password}@", 1)
        env["EDGEFLEET_DB_URL"] = url
        yield password, url
    else:
        yield None, db_url


def test_no_token_or_password_appears_in_any_output(
    tmp_path: Path, env: dict[str, str], secret_db: tuple[str | None, str]
) -> None:
    db_password, db_url = secret_db
    logs = tmp_path / "logs"
    run = Outputs(logs, env)
    data = tmp_path / "data"
    port, mqtt_port = free_port(), free_port()
    config = tmp_path / "controller.toml"
    config.write_text(
        f'data_dir = "{data}"\nlog_level = "debug"\n'
        + ("" if db_password else f'[database]\nurl = "{db_url}"\n')
        + f"[embedded_broker]\nport = {mqtt_port}\n"
        + "[ingest]\nflush_interval_s = 0.05\n"
        + f"[api]\nport = {port}\n"
    )
    if db_password:  # the other case: a broker password set in the environment
        env["EDGEFLEET_EMBEDDED_BROKER_PASSWORD"] = "broker-pass-" + os.urandom(8).hex()

    created = run.cli(
        "tokens", "create", "--role", "admin", "--config", str(config), name="token", private=True
    )
    assert created.returncode == 0, created.stderr
    admin = created.stdout.strip().splitlines()[0]
    assert admin.startswith("efc_")

    url = f"http://127.0.0.1:{port}"
    out, err = run.files("controller")
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "controller", "serve", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=o,
            stderr=e,
        )
    sim: subprocess.Popen[bytes] | None = None
    secrets: dict[str, str] = {"admin token": admin, "wrong token": WRONG_TOKEN}
    if db_password:
        secrets["database password"] = db_password
    try:
        wait_healthy(proc, url, lambda: err.read_text()[-3000:])
        broker_password = (
            env.get("EDGEFLEET_EMBEDDED_BROKER_PASSWORD")
            or (data / "broker" / "password").read_text().strip()
        )
        secrets["broker password"] = broker_password
        assert f'password = "{broker_password}"' in (data / "broker" / "agent.toml").read_text()

        # A device on the embedded broker with its password (proves it is the real one).
        sim_out, sim_err = run.files("simulator")
        with sim_out.open("wb") as o, sim_err.open("wb") as e:
            sim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tools.simulator",
                    "--broker",
                    f"mqtt://127.0.0.1:{mqtt_port}",
                    "--username",
                    "edgefleet",
                    "--password",
                    broker_password,
                    "--prefix",
                    "sec",
                    "--telemetry-interval",
                    "0.2",
                ],
                cwd=REPO,
                env=env,
                stdout=o,
                stderr=e,
            )

        def listed() -> bool:
            done = run.cli("--url", url, "--token", admin, "devices", "list", "--json", name="ls")
            assert done.returncode == 0, done.stderr
            return '"sec-0001"' in done.stdout

        wait_for(listed, timeout=30, what="the simulated device to be listed")

        # A token made through the API (the answer carries it once), used by the CLI.
        made = httpx.post(
            f"{url}/api/v1/tokens",
            json={"name": "api-made", "role": "viewer"},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert made.status_code == 201, made.text
        viewer = made.json()["token"]
        secrets["API-made token"] = viewer
        shown = run.cli("--url", url, "--token", viewer, "devices", "show", "sec-0001", name="show")
        assert shown.returncode == 0, shown.stderr
        listed_tokens = run.cli("--url", url, "--token", admin, "tokens", "list", name="tokens")
        assert listed_tokens.returncode == 0 and "api-made" in listed_tokens.stdout

        # A wrong token: refused, and said so.
        wrong = run.cli("--url", url, "--token", WRONG_TOKEN, "devices", "list", name="wrong")
        assert wrong.returncode == 1 and "401" in wrong.stderr
        env["EDGEFLEET_TOKEN"] = WRONG_TOKEN
        wrong_env = run.cli("--url", url, "tokens", "list", name="wrong-env")
        del env["EDGEFLEET_TOKEN"]
        assert wrong_env.returncode == 1 and "401" in wrong_env.stderr

        # Enrolling a device generates its broker password into the agent config only.
        enrolled = tmp_path / "cam-9.toml"
        enroll = run.cli(
            "devices",
            "enroll",
            "cam-9",
            "--broker-url",
            f"mqtt://127.0.0.1:{mqtt_port}",
            "--password-file",
            str(tmp_path / "passwd"),
            "--out",
            str(enrolled),
            name="enroll",
        )
        assert enroll.returncode == 0, enroll.stderr
        device_password = next(
            line.split('"')[1]
            for line in enrolled.read_text().splitlines()
            if line.startswith("password = ")
        )
        secrets["enrolled device password"] = device_password
        assert oct(enrolled.stat().st_mode & 0o777) == "0o600"
    finally:
        if sim is not None:
            stop_process(sim, timeout=10)
        stop_process(proc, timeout=15)
    assert proc.returncode == 0, err.read_text()[-3000:]

    searched = sorted(p for p in logs.iterdir() if p.is_file())
    searched += sorted((data / "broker").glob("*.log"))
    controller_log = err.read_text()
    assert " DEBUG " in controller_log, "the controller did not log at debug level"
    assert "embedded MQTT broker listening" in controller_log
    assert any(p.name.endswith(".log") for p in searched), "no mosquitto log found"
    leaks = [
        f"{what} in {path.name}"
        for path in searched
        for what, value in secrets.items()
        if value in path.read_text(errors="replace")
    ]
    assert not leaks, leaks
