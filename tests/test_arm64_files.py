"""The arm64 package's files (packaging/arm64/, `make deb ARCH=arm64`, `make test-arm64`).

Offline and fast: the emulated build and test themselves are `make test-arm64` (root,
binfmt_misc, minutes), not part of `make test`. These check that the arm64 target builds
with the native builder and the same lock, unit, user and conffiles; that the lock serves
CPython 3.11 on aarch64 with the same pins as on x86_64; and that the comparison of the
x86 and arm64 inference outputs and the emulated-CPU check catch what they are meant to.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import REPO, load

ARM64 = REPO / "packaging" / "arm64"
VIDEO = REPO / "inference" / "assets" / "face-walk-640x480.mp4"
AGENT_INFER = (sys.executable, "-m", "agent.cli", "infer", "-m", "builtin:blazeface-short-int8")
SCRIPTS = ("binfmt.sh", "build-root.sh", "build-deb.sh", "run-in-root.sh", "test-arm64.sh")

check = load("requirements/check.py")
deb_build = load("packaging/deb/build.py")
compare = load("packaging/arm64/compare_infer.py")
hwcaps = load("packaging/arm64/hwcaps.py")


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_arm64_scripts_are_executable_bash_that_parses(name: str) -> None:
    path = ARM64 / name
    assert path.stat().st_mode & 0o111, f"{name} is not executable"
    assert path.read_text().startswith("#!/bin/bash\n")
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in path.read_text()


def test_arm64_build_runs_the_native_builder_with_every_file_it_reads() -> None:
    """Same build.py, so the same unit, user (maintainer scripts), conffiles and venv."""
    script = (ARM64 / "build-deb.sh").read_text()
    assert "python3 packaging/deb/build.py --out /out" in script
    match = re.search(r"^for p in (.*?); do$", script, re.MULTILINE | re.DOTALL)
    assert match is not None
    copied = set(match.group(1).replace("\\\n", " ").split())
    needed = {
        *deb_build.SOURCES,
        "requirements",
        "systemd",
        "docs",
        "packaging/deb",
        "packaging/agent.example.toml",
    }
    assert needed <= copied, needed - copied
    for path in copied:
        assert (REPO / path).exists(), path
    # Everything build.py copies into the package comes from those paths.
    source = (REPO / "packaging" / "deb" / "build.py").read_text()
    assert 'REPO / "packaging" / "agent.example.toml"' in source
    assert 'REPO / "systemd" / UNIT' in source
    assert (REPO / "packaging" / "deb" / "conffiles").read_text() == "/etc/edgefleet/agent.toml\n"


def test_make_deb_arm64_uses_the_same_lock_and_options_as_the_native_build() -> None:
    native = _make("-n", "deb", "DEB_ARGS=--version 9.9.9")
    arm64 = _make("-n", "deb", "ARCH=arm64", "DEB_ARGS=--version 9.9.9")
    assert native.returncode == arm64.returncode == 0, native.stderr + arm64.stderr
    assert "packaging/deb/build.py --out dist --lock requirements/agent.txt --version 9.9.9" in (
        native.stdout
    )
    assert (
        "arm64 | aarch64) packaging/arm64/build-deb.sh --out dist --lock requirements/agent.txt "
        "--version 9.9.9" in arm64.stdout
    )


@pytest.mark.parametrize("arch", ["armhf", "armv7l"])
def test_make_deb_refuses_32_bit_arm_saying_what_to_do(arch: str) -> None:
    result = _make("deb", f"ARCH={arch}")
    assert result.returncode != 0
    assert "32-bit ARM is not supported" in result.stderr
    assert "ARCH=arm64" in result.stderr
    assert "64-bit" in result.stderr


def test_test_arm64_is_separate_from_make_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    (test_line,) = re.findall(r"^test:.*$", makefile, re.MULTILINE)
    assert "arm64" not in test_line
    (pytest_line,) = re.findall(r"^pytest:.*$", makefile, re.MULTILINE)
    assert "arm64" not in pytest_line
    assert re.search(r"^test-arm64: .*\n\tpackaging/arm64/test-arm64\.sh ", makefile, re.MULTILINE)
    # It builds the package with the documented command, not a private path.
    assert 'deb ARCH=arm64 "DEB_ARGS=--out $dist"' in (ARM64 / "test-arm64.sh").read_text()


def test_agent_lock_pins_the_same_versions_for_aarch64_as_for_x86_64() -> None:
    """The arm64 venv is the x86 one with aarch64 wheels: one resolution, both hashed."""
    (agent,) = [lock for lock in check.LOCKS if lock.name == "agent.txt"]
    assert check.Target("3.11", "aarch64") in agent.targets
    assert check.Target("3.10", "aarch64") in agent.targets  # Jetson JetPack 6
    pins = check.read_lock(agent.path)
    for python in ("3.10", "3.11"):
        x86 = {(p.name, p.version) for p in pins if p.applies(check.Target(python, "x86_64"))}
        arm = {(p.name, p.version) for p in pins if p.applies(check.Target(python, "aarch64"))}
        assert x86 == arm, python
        assert {"ai-edge-litert", "numpy", "opencv-python-headless"} <= {n for n, _ in arm}
    # Binary packages have a wheel per architecture and Python: several hashes each.
    for pin in pins:
        if pin.name in {"ai-edge-litert", "opencv-python-headless", "psutil", "msgspec"}:
            assert len(pin.hashes) >= 2, pin.name
    assert "--universal" in (REPO / "Makefile").read_text()


@pytest.mark.parametrize(("cpu", "part"), [("cortex-a72", "0xd08"), ("cortex-a76", "0xd0b")])
def test_cpuinfo_files_describe_the_pi_cores(cpu: str, part: str) -> None:
    text = (ARM64 / f"cpuinfo-{cpu}").read_text()
    blocks = [b for b in text.split("\n\n") if b.startswith("processor")]
    assert len(blocks) == 4
    for block in blocks:
        fields = dict(re.split(r"\s*:\s*", line, maxsplit=1) for line in block.splitlines())
        assert fields["CPU implementer"] == "0x41"  # Arm
        assert fields["CPU part"] == part
        features = fields["Features"].split()
        assert {"fp", "asimd"} <= set(features)
        assert "sve" not in features
        assert ("asimddp" in features) == (cpu == "cortex-a76")
    assert "Raspberry Pi" in text


def _auxv(pairs: dict[int, int]) -> bytes:
    data = b"".join(k.to_bytes(8, "little") + v.to_bytes(8, "little") for k, v in pairs.items())
    return data + bytes(16)  # AT_NULL


def test_hwcaps_check_tells_named_cores_from_qemus_default_max() -> None:
    a72 = 0b11  # fp, asimd
    a76 = a72 | hwcaps.HWCAP_ATOMICS | hwcaps.HWCAP_ASIMDDP
    assert hwcaps.hwcaps(_auxv({6: 4096, 16: a76, 26: 0x2})) == (a76, 0x2)
    assert hwcaps.problem("cortex-a72", a72, 0) is None
    assert hwcaps.problem("cortex-a76", a76, 0) is None
    assert "max" in hwcaps.problem("cortex-a76", a76 | hwcaps.HWCAP_SVE, 0)
    assert "max" in hwcaps.problem("cortex-a76", a76, hwcaps.HWCAP2_SME)
    assert "not cortex-a72" in hwcaps.problem("cortex-a72", a76, 0)
    assert "unknown core" in hwcaps.problem("cortex-a53", a72, 0)


def test_run_in_root_names_the_supported_cores_for_an_unknown_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ARM64 / "run-in-root.sh"), str(tmp_path), "armv7", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown CPU armv7: use cortex-a72 (Pi 4) or cortex-a76 (Pi 5)" in result.stderr


@pytest.fixture(scope="module")
def x86_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real inference on the shipped video with this machine's agent."""
    out = tmp_path_factory.mktemp("infer") / "x86.jsonl"
    subprocess.run(
        [*AGENT_INFER, "--no-progress", "--jsonl", str(out), str(VIDEO)],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _compare(ref: Path, other: Path) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, str(ARM64 / "compare_infer.py"), "--label", "t", str(ref), str(other)],
        capture_output=True,
        text=True,
    )
    summary = json.loads(result.stdout) if result.stdout else {}
    return result.returncode, summary, result.stderr


def test_compare_accepts_the_same_output_and_small_differences(
    x86_output: Path, tmp_path: Path
) -> None:
    code, summary, _ = _compare(x86_output, x86_output)
    assert code == 0
    assert summary["frames"] == 150
    assert summary["frames_with_detections"] == "0-29,60-89,120-149"
    rows = _rows(x86_output)
    for row in rows:
        for det in row["detections"]:
            det["score"] += 0.02
            det["box"] = [v - 0.015 for v in det["box"]]
    code, summary, _ = _compare(x86_output, _write(tmp_path / "near.jsonl", rows))
    assert code == 0
    assert summary["max_score_diff"] == pytest.approx(0.02, abs=1e-4)
    assert summary["max_box_diff"] == pytest.approx(0.015, abs=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("score", "score differs by 0.0310"),
        ("box", "box differs by 0.0210"),
        ("drop", "frames with a detection differ: reference 0-29,60-89,120-149, other 0-29,60-89"),
        ("frames", "different frames: missing 149"),
    ],
)
def test_compare_rejects_what_the_arm64_acceptance_forbids(
    x86_output: Path, tmp_path: Path, change: str, message: str
) -> None:
    rows = _rows(x86_output)
    det = rows[125]["detections"][0]
    if change == "score":
        det["score"] -= 0.031
    elif change == "box":
        det["box"][2] += 0.021
    elif change == "drop":
        for row in rows[120:]:
            row["detections"] = []
    else:
        rows.pop()
    code, summary, stderr = _compare(x86_output, _write(tmp_path / "other.jsonl", rows))
    assert code == 1
    assert summary["ok"] is False
    assert message in stderr


def test_compare_says_which_file_is_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"frame": 0}\n')
    code, _, stderr = _compare(bad, bad)
    assert code == 2
    assert f"{bad}:1: not an `edgefleet-agent infer --jsonl` line" in stderr
    with pytest.raises(compare.CompareError, match="holds no frames"):
        compare.read_jsonl(_write(tmp_path / "empty.jsonl", []))
