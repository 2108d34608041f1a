"""examples/ci/: the GitHub Actions workflow parses, every ``edgefleet`` command line in it and
in the Jenkinsfile is a real command with real options, and the workflow's own shell steps
(run by bash, CI variables set as on a tag build) publish a real model with its lineage
and start a canary rollout on a real controller process with simulated devices."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.cli import main
from tests.broker import Mosquitto
from tests.controller.controller_proc import ControllerProcess
from tests.waiting import wait_for
from tools.simulator.device import SimulatedDevice

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "examples" / "ci"
WORKFLOW = CI / "github-actions.yml"
JENKINSFILE = CI / "Jenkinsfile"
ASSETS = REPO / "inference" / "assets"


def _workflow() -> dict[Any, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(doc, dict)
    return doc


def _workflow_scripts() -> list[str]:
    """The ``run:`` scripts of the publish job that call edgefleet, in order."""
    steps = _workflow()["jobs"]["publish"]["steps"]
    return [
        s["run"]
        for s in steps
        if "edgefleet " in s.get("run", "") and "pip install" not in s["run"]
    ]


def _jenkins_scripts() -> list[str]:
    """The ``sh '''...'''`` blocks of the Jenkinsfile that call edgefleet, in order."""
    return [s for s in re.findall(r"sh '''(.*?)'''", JENKINSFILE.read_text(), re.S)]


def _jenkins_environment() -> dict[str, str]:
    """The ``environment { KEY = 'value' }`` block of the Jenkinsfile."""
    block = re.search(r"environment \{(.*?)\}", JENKINSFILE.read_text(), re.S)
    assert block is not None
    return dict(re.findall(r"(\w+) = '([^']*)'", block.group(1)))


def _command_lines(script: str) -> list[list[str]]:
    """Each ``edgefleet ...`` command of a shell script, continuations joined, split."""
    joined = script.replace("\\\n", " ")
    return [
        shlex.split(line.strip())
        for line in joined.splitlines()
        if line.strip().startswith("edgefleet ")
    ]


def resolve(argv: list[str]) -> click.Command:
    """Check ``argv`` (``edgefleet ...``) against the CLI: real (sub)commands, options and
    argument counts; raise click.UsageError otherwise. Nothing runs."""
    assert argv[0] == "edgefleet"
    ctx = main.make_context("edgefleet", [], resilient_parsing=True)
    cmd: click.Command = main
    args = argv[1:]
    while isinstance(cmd, click.Group):
        if not args or args[0].startswith("-"):
            raise click.UsageError(f"{' '.join(argv)}: no subcommand")
        sub = cmd.get_command(ctx, args[0])
        if sub is None:
            raise click.UsageError(f"{' '.join(argv)}: no command {args[0]!r}")
        ctx = click.Context(sub, info_name=args[0], parent=ctx)
        cmd, args = sub, args[1:]
    cmd.make_context(cmd.name, list(args), parent=ctx.parent)
    return cmd


def test_the_workflow_parses_and_runs_on_tags_with_secrets() -> None:
    doc = _workflow()
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    env = doc["jobs"]["publish"]["env"]
    assert env["EDGEFLEET_TOKEN"] == "${{ secrets.EDGEFLEET_TOKEN }}"
    assert env["EDGEFLEET_SIGNING_KEY"] == "${{ secrets.EDGEFLEET_SIGNING_KEY }}"
    assert "buildingTag()" in JENKINSFILE.read_text()
    assert "credentialsId: 'edgefleet-signing-key'" in JENKINSFILE.read_text()


@pytest.mark.parametrize("scripts", [_workflow_scripts, _jenkins_scripts], ids=["gha", "jenkins"])
def test_every_edgefleet_command_line_is_a_real_command(scripts: Any) -> None:
    lines = [argv for s in scripts() for argv in _command_lines(s)]
    names = [resolve(argv).name for argv in lines]
    assert names == ["publish", "create"], lines
    assert "--stages" in lines[1] and lines[1][lines[1].index("--stages") + 1] == "1,100%"


@pytest.mark.parametrize(
    "line",
    [
        "edgefleet model publsh m.json",
        "edgefleet model publish m.json --metrics a=1",
        "edgefleet rollout create m@1 --select all --stage 1,100%",
        "edgefleet rollout create --select all",
        "edgefleet rollout",
    ],
)
def test_the_check_refuses_a_wrong_command_line(line: str) -> None:
    with pytest.raises(click.UsageError):
        resolve(shlex.split(line))


def _pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture
def controller(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[ControllerProcess, Any]]:
    """A controller process that trusts a fresh signing key; yields it and the key."""
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "signing.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "ctl").mkdir()
    ctl = ControllerProcess(
        tmp_path / "ctl",
        f"sqlite:///{tmp_path / 'ctl.db'}",
        mosquitto,
        extra=f'[models]\ntrusted_keys = ["{pub}"]\n',
    )
    ctl.start()
    try:
        yield ctl, key
    finally:
        ctl.stop()


def _edgefleet(env: dict[str, str], *args: str) -> Any:
    """``edgefleet ARGS --json`` in this process (the test's own checks, not the workflow's)."""
    done = CliRunner().invoke(main, [*args, "--json"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def _checkout(tmp_path: Path) -> Path:
    """A training repository: models/face/manifest.json with metrics from the training job."""
    root = tmp_path / "checkout"
    model_dir = root / "models" / "face"
    model_dir.mkdir(parents=True)
    raw = json.loads((ASSETS / "blazeface-short-int8.json").read_text())
    raw["lineage"] = {"metrics": {"map50": 0.71}}
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    shutil.copyfile(ASSETS / raw["model"], model_dir / raw["model"])
    return root


def _run(script: str, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", "-eu", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"


def test_the_workflow_publishes_with_lineage_and_starts_a_canary(
    controller: tuple[ControllerProcess, Any], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    ctl, key = controller
    base = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
        "EDGEFLEET_URL": ctl.url,
    }
    token = _edgefleet(base, "tokens", "create", "--role", "operator", "--config", str(ctl.config))
    devices = [
        SimulatedDevice(device_id=f"ci-{i}", broker_url=mosquitto.url, seed=i) for i in range(2)
    ]
    for dev in devices:
        dev.connect()
        dev.announce()
    try:
        api = {**base, "EDGEFLEET_TOKEN": token["token"]}
        wait_for(
            lambda: len([d for d in _edgefleet(api, "devices", "list") if d["streams"]]) == 2,
            timeout=20,
            what="2 devices with streams",
        )
        job_env = {k: str(v) for k, v in _workflow()["jobs"]["publish"]["env"].items()}
        env = {
            **job_env,
            **api,
            "EDGEFLEET_SIGNING_KEY": _pem(key),  # the secret, as GitHub hands it over
            "GITHUB_REF_NAME": "v1.2.0",
            "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_REPOSITORY": "acme/faces",
            "GITHUB_RUN_ID": "42",
        }
        checkout = _checkout(tmp_path)
        for script in _workflow_scripts():
            _run(script, checkout, env)
        shown = _edgefleet(api, "model", "show", "face@1.2.0")
        assert shown["key_id"] is not None  # verified with the trusted key
        assert shown["lineage"] == {
            "source_commit": "0123456789abcdef0123456789abcdef01234567",
            "training_data": "s3://datasets/faces/v7",
            "metrics": {"map50": 0.71},
            "labels": {
                "pipeline": "https://github.com/acme/faces/actions/runs/42",
                "tag": "v1.2.0",
            },
        }
        (rollout,) = _edgefleet(api, "rollout", "list")
        assert rollout["model"] == "face@1.2.0"
        assert rollout["device_count"] == 2
        assert rollout["stages"] == [1, 2]  # the canary, then everyone
        assert rollout["stage_spec"] == "1,100%"
        _run(_workflow_scripts()[0], checkout, env)  # a re-run of the tag job: skipped, exit 0
        # The Jenkinsfile's steps, the key as a secret file, on the next tag.
        _edgefleet(api, "rollout", "abort", str(rollout["id"]))
        key_file = tmp_path / "secret-signing.key"
        key_file.write_text(_pem(key))
        jenkins = {
            **_jenkins_environment(),
            **api,
            "EDGEFLEET_SIGNING_KEY_FILE": str(key_file),
            "TAG_NAME": "v1.3.0",
            "GIT_COMMIT": "89abcdef",
            "BUILD_URL": "https://jenkins.example/job/faces/7/",
        }
        for script in _jenkins_scripts():
            _run(script, checkout, jenkins)
        assert _edgefleet(api, "model", "show", "face@1.3.0")["lineage"]["labels"] == {
            "pipeline": "https://jenkins.example/job/faces/7/",
            "tag": "v1.3.0",
        }
        newest = _edgefleet(api, "rollout", "list")[0]
        assert (newest["model"], newest["stages"]) == ("face@1.3.0", [1, 2])
    finally:
        for dev in devices:
            dev.stop()
