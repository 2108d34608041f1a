"""controller.enroll: broker credentials and an agent config the real agent accepts."""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.certs import init_ca
from controller.cli.security import devices_enroll
from controller.enroll import EnrollError, enroll, set_password
from tests.agent_proc import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _verify(line: str, password: str) -> bool:
    """Check a Mosquitto ``$7$`` password-file line against ``password``."""
    _, hashed = line.split(":", 1)
    _, seven, iterations, salt, digest = hashed.split("$")
    assert seven == "7"
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return got == base64.b64decode(digest)


def test_set_password_adds_then_replaces_the_users_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    set_password(passwd, "cam-1", "one")
    set_password(passwd, "cam-2", "two")
    set_password(passwd, "cam-1", "three")
    lines = passwd.read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["cam-2", "cam-1"]
    assert _verify(lines[1], "three") and not _verify(lines[1], "one")
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600


def test_enroll_with_password_writes_a_config_the_agent_accepts(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", days=1)
    result = enroll(
        "cam-9",
        broker_url="mqtts://broker.lan:8883",
        ca_file=tmp_path / "ca" / "ca.pem",
        password_file=tmp_path / "passwd",
        state_dir=str(tmp_path / "state"),
    )
    assert result.password is not None and len(result.password) >= 24
    (line,) = (tmp_path / "passwd").read_text().splitlines()
    assert line.startswith("cam-9:$7$") and _verify(line, result.password)
    doc = tomllib.loads(result.config)
    assert doc["device_id"] == "cam-9"
    assert doc["broker"] == {
        "url": "mqtts://broker.lan:8883",
        "username": "cam-9",
        "password": result.password,
        "ca_file": str((tmp_path / "ca" / "ca.pem").resolve()),
    }
    assert doc["streams"][0]["model"] == "builtin:blazeface-short-int8"
    config = tmp_path / "agent.toml"
    config.write_text(result.config)
    done = _check_config(config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_enroll_with_certificate_writes_a_config_the_agent_accepts(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", days=1)
    result = enroll(
        "cam-10",
        ca_file=tmp_path / "ca" / "ca.pem",
        cert_dir=tmp_path / "device",
        state_dir=str(tmp_path / "state"),
    )
    assert result.password is None and result.cert is not None
    broker = tomllib.loads(result.config)["broker"]
    assert "username" not in broker and "password" not in broker
    assert broker["cert_file"] == str(tmp_path / "device" / "cam-10.pem")
    assert broker["key_file"] == str(tmp_path / "device" / "cam-10.key")
    config = tmp_path / "agent.toml"
    config.write_text(result.config)
    done = _check_config(config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_enroll_rejects_an_invalid_device_id(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match="invalid device id"):
        enroll("Cam 1", password_file=tmp_path / "passwd")
    assert not (tmp_path / "passwd").exists()


def test_enroll_needs_a_password_file_or_a_certificate_folder() -> None:
    with pytest.raises(EnrollError, match="--password-file"):
        enroll("cam-1")


def test_enroll_certificate_needs_the_ca(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match="--ca"):
        enroll("cam-1", cert_dir=tmp_path)


def test_enroll_cli_writes_the_config_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "agent.toml"
    args = ["cam-3", "--password-file", str(tmp_path / "passwd"), "--out", str(out)]
    res = CliRunner().invoke(devices_enroll, args)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert tomllib.loads(out.read_text())["broker"]["username"] == "cam-3"
    again = CliRunner().invoke(devices_enroll, args)
    assert again.exit_code != 0
    assert isinstance(again.exception, EnrollError)
    assert len((tmp_path / "passwd").read_text().splitlines()) == 1


def test_enroll_cli_prints_the_config_without_out(tmp_path: Path) -> None:
    res = CliRunner().invoke(devices_enroll, ["cam-4", "--password-file", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert tomllib.loads(res.output)["device_id"] == "cam-4"
