"""The edgefleet-agent .deb: built for real, inspected, installed into a throwaway root.

Building installs the agent's locked dependencies (requirements/agent.txt, hash-checked)
from PyPI or pip's cache and takes a minute or two here; the package is built once per module.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.scripts import load

REPO = Path(__file__).resolve().parent.parent
VENV = "opt/edgefleet"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3"),
]


def _env() -> dict[str, str]:
    # dpkg insists on finding ldconfig and start-stop-daemon in PATH.
    return {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def _run(
    *cmd: str | Path, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=cwd,
    )
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    # Through `make deb`, the documented command (it runs packaging/deb/build.py).
    result = _run(
        "make",
        "--no-print-directory",
        "-C",
        REPO,
        "deb",
        f"PYTHON={sys.executable}",
        f"DEB_ARGS=--out {out} --version 0.1.0~test1",
        timeout=240,
    )
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.exists()
    return path


@pytest.fixture(scope="module")
def arch() -> str:
    return _run("dpkg", "--print-architecture").stdout.strip()


def test_deb_is_named_and_labelled_for_this_architecture(deb: Path, arch: str) -> None:
    assert deb.name == f"edgefleet-agent_0.1.0~test1_{arch}.deb"
    fields = _run("dpkg-deb", "-f", deb).stdout
    control = dict(
        line.split(": ", 1) for line in fields.splitlines() if ": " in line and line[0] != " "
    )
    assert control["Package"] == "edgefleet-agent"
    assert control["Version"] == "0.1.0~test1"
    assert control["Architecture"] == arch
    assert control["Maintainer"].endswith(">")
    assert control["Description"].startswith("edgefleet agent")
    depends = [d.strip() for d in control["Depends"].split(",")]
    assert any(d.startswith("python3 (>=") for d in depends)
    assert "adduser" in depends
    assert int(control["Installed-Size"]) > 10_000  # KiB: numpy, OpenCV and LiteRT are in


def test_deb_contains_the_unit_the_conffile_and_the_venv_entry_point(deb: Path) -> None:
    listing = _run("dpkg-deb", "--contents", deb).stdout
    paths = {line.split()[5].split(" -> ")[0] for line in listing.splitlines()}
    for expected in (
        "./lib/systemd/system/edgefleet-agent.service",
        "./etc/edgefleet/agent.toml",
        f"./{VENV}/bin/edgefleet-agent",
        f"./{VENV}/pyvenv.cfg",
        "./usr/bin/edgefleet-agent",
    ):
        assert expected in paths, expected
    assert any("/site-packages/ai_edge_litert/" in p for p in paths)
    assert any("/site-packages/agent/__pycache__/" in p for p in paths)
    # The controller's dependencies are not shipped, so neither is its command.
    assert f"./{VENV}/bin/edgefleet" not in paths
    conffiles = _run("dpkg-deb", "--info", deb, "conffiles").stdout.split()
    assert conffiles == ["/etc/edgefleet/agent.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert _run("dpkg-deb", "--info", deb, script).stdout.startswith("#!/bin/sh")


def test_deb_venv_holds_exactly_the_locked_versions(deb: Path) -> None:
    """Nothing outside requirements/agent.txt got in, and every pin for this target did."""
    check = load("requirements/check.py")
    listing = _run("dpkg-deb", "--contents", deb).stdout
    found = set(
        re.findall(r"/lib/python(3\.\d+)/site-packages/([^/\s]+)-([^-/\s]+)\.dist-info/", listing)
    )
    (pyver,) = {python for python, _, _ in found}
    installed = {(canonicalize_name(name), version) for _, name, version in found}
    target = check.Target(pyver, platform.machine())
    pins = check.read_lock(REPO / "requirements" / "agent.txt")
    locked = {(pin.name, pin.version) for pin in pins if pin.applies(target)}
    assert installed == locked | {("edgefleet", "0.1.0")}


def test_deb_installs_runs_removes_and_purges_in_a_throwaway_root(
    deb: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "updates").mkdir()
    (admin / "status").touch()
    (admin / "available").touch()
    dpkg = (
        "dpkg",
        f"--root={root}",
        "--log=/dev/null",
        "--force-not-root",
        "--force-script-chrootless",  # scripts see DPKG_ROOT and leave this machine alone
        "--force-depends",  # the empty root has no python3/adduser packages
    )
    installed = _run(*dpkg, "-i", deb)
    assert "skipping user creation" in installed.stderr

    venv = root / VENV
    assert (
        (venv / "bin" / "edgefleet-agent").read_text().startswith("#!/opt/edgefleet/bin/python\n")
    )
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "command = /usr/bin/python3 -m venv --without-pip /opt/edgefleet" in cfg
    assert os.readlink(venv / "bin" / "python").startswith("/usr/bin/python3.")
    assert (root / "var" / "lib" / "edgefleet").is_dir()
    # The venv's own interpreter finds the installed packages from their new home.
    version = _run(
        venv / "bin" / "python", venv / "bin" / "edgefleet-agent", "--version", cwd=tmp_path
    )
    assert "version 0.1.0" in version.stdout
    # (cwd away from the repo, whose own agent/ would shadow the installed one)
    code = "import agent, ai_edge_litert, cv2, numpy; print(agent.__file__)"
    check = _run(venv / "bin" / "python", "-c", code, cwd=tmp_path)
    assert check.stdout.startswith(f"{venv}/lib/python3.")

    (root / "var" / "lib" / "edgefleet" / "seq.json").write_text("{}")
    _run(*dpkg, "-r", "edgefleet-agent")
    assert not venv.joinpath("bin", "edgefleet-agent").exists()
    assert (root / "etc" / "edgefleet" / "agent.toml").exists()  # conffile kept on remove
    assert (root / "var" / "lib" / "edgefleet" / "seq.json").exists()

    _run(*dpkg, "-P", "edgefleet-agent")
    assert not (root / "etc" / "edgefleet").exists()
    assert not (root / "var" / "lib" / "edgefleet").exists()
    status = (admin / "status").read_text()
    assert "Package: edgefleet-agent" not in status


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True
    )
    return probe.returncode == 0


def test_packaged_agent_runs_detection_from_opt_edgefleet(deb: Path, tmp_path: Path) -> None:
    """Extract, bind-mount at the real /opt/edgefleet (private mount namespace), infer."""
    if not _can_unshare_mounts():
        pytest.skip("no permission for a private mount namespace (unshare -m)")
    tree = tmp_path / "tree"
    _run("dpkg-deb", "-x", deb, tree)
    out = tmp_path / "detections.jsonl"
    video = "/opt/edgefleet/lib/python3.*/site-packages/inference/assets/face-walk-640x480.mp4"
    script = (
        "set -e; mount -t tmpfs none /opt; mkdir /opt/edgefleet; "
        f"mount --bind {tree}/{VENV} /opt/edgefleet; "
        "/opt/edgefleet/bin/edgefleet-agent --version; "
        "/opt/edgefleet/bin/edgefleet-agent infer -m builtin:blazeface-short-int8 "
        f"--no-progress --jsonl {out} {video}"
    )
    result = _run("unshare", "-m", "sh", "-c", script)
    assert "edgefleet-agent, version 0.1.0" in result.stdout
    lines = out.read_text().splitlines()
    assert len(lines) > 100
    assert '"label":"face"' in out.read_text()
