"""The shipped systemd units: key settings present, and `systemd-analyze verify` clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
AGENT = UNITS / "edgefleet-agent.service"
CONTROLLER = UNITS / "edgefleet-controller.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value (keys may repeat, e.g. DeviceAllow)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def setting(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


@pytest.fixture(scope="module")
def agent_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(AGENT.read_text())


@pytest.fixture(scope="module")
def controller_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(CONTROLLER.read_text())


def test_agent_unit_is_notify_with_a_watchdog_and_restarts_on_failure(
    agent_unit: dict[str, dict[str, list[str]]],
) -> None:
    svc = "Service"
    assert setting(agent_unit, svc, "Type") == "notify"
    assert setting(agent_unit, svc, "NotifyAccess") == "main"
    assert setting(agent_unit, svc, "ExecStart") == (
        "/opt/edgefleet/bin/edgefleet-agent run --config /etc/edgefleet/agent.toml"
    )
    assert setting(agent_unit, svc, "WatchdogSec") == "30"
    assert setting(agent_unit, svc, "Restart") == "on-failure"
    assert setting(agent_unit, svc, "RestartSec") == "5"
    assert setting(agent_unit, svc, "TimeoutStopSec") == "10"
    assert setting(agent_unit, "Install", "WantedBy") == "multi-user.target"


def test_agent_unit_runs_unprivileged_with_camera_access_only(
    agent_unit: dict[str, dict[str, list[str]]],
) -> None:
    svc = "Service"
    assert setting(agent_unit, svc, "User") == "edgefleet"
    assert setting(agent_unit, svc, "Group") == "edgefleet"
    assert setting(agent_unit, svc, "SupplementaryGroups") == "video"
    assert setting(agent_unit, svc, "DevicePolicy") == "closed"
    assert "char-video4linux rw" in agent_unit[svc]["DeviceAllow"]
    assert setting(agent_unit, svc, "StateDirectory") == "edgefleet"
    assert setting(agent_unit, svc, "ConfigurationDirectory") == "edgefleet"
    assert setting(agent_unit, svc, "EnvironmentFile") == "-/etc/edgefleet/agent.env"
    assert setting(agent_unit, svc, "CapabilityBoundingSet") == ""
    assert setting(agent_unit, svc, "UMask") == "0077"


@pytest.mark.parametrize("name", ["agent", "controller"])
def test_units_carry_the_hardening_settings(name: str) -> None:
    unit = parse_unit((UNITS / f"edgefleet-{name}.service").read_text())
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert setting(unit, "Service", key) == value, key
    families = set(setting(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_controller_unit_serves_from_its_own_state_directory(
    controller_unit: dict[str, dict[str, list[str]]],
) -> None:
    svc = "Service"
    assert setting(controller_unit, svc, "ExecStart") == (
        "/opt/edgefleet/bin/edgefleet controller serve --config /etc/edgefleet/controller.toml"
    )
    assert setting(controller_unit, svc, "Type") == "exec"
    assert setting(controller_unit, svc, "StateDirectory") == "edgefleet-controller"
    assert setting(controller_unit, svc, "Restart") == "on-failure"


def test_unit_parser_keeps_repeated_keys() -> None:
    unit = parse_unit("[Service]\nDeviceAllow=a rw\nDeviceAllow=b r\nCapabilityBoundingSet=\n")
    assert unit["Service"]["DeviceAllow"] == ["a rw", "b r"]
    assert unit["Service"]["CapabilityBoundingSet"] == [""]


def _verifiable_copy(unit: Path, dest: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointed at /bin/true (the real binary is not installed here)."""
    text = re.sub(
        r"^ExecStart=/opt/edgefleet/bin/\S+", "ExecStart=/bin/true", unit.read_text(), flags=re.M
    )
    out = dest / unit.name
    out.write_text(text.replace("[Service]\n", f"[Service]\n{extra}", 1))
    return out


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
@pytest.mark.parametrize("unit", [AGENT, CONTROLLER], ids=lambda p: p.stem)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    copy = _verifiable_copy(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # verify reports unknown keys and bad values on stderr but may still exit 0.
    assert copy.name not in result.stderr, result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_flags_an_unknown_setting(tmp_path: Path) -> None:
    """Guards the test above: a typo in the unit must show up in verify's output."""
    copy = _verifiable_copy(AGENT, tmp_path, extra="ProtectSystm=strict\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSystm" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", [AGENT, CONTROLLER], ids=lambda p: p.stem)
def test_systemd_analyze_security_rates_the_unit_ok(unit: Path, tmp_path: Path) -> None:
    copy = _verifiable_copy(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security scan: {result.stderr[-300:]}")
    # systemd's scale: < 2 is "OK", 10 is "UNSAFE" (no hardening at all).
    assert float(match.group(1)) < 2.5
