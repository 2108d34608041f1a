#!/usr/bin/env python3
"""Build the edgefleet-agent Debian package.

    python3 packaging/deb/build.py --out dist/ [--version 0.1.0] [--python /usr/bin/python3]
        [--lock requirements/agent.txt]

Produces ``edgefleet-agent_{version}_{arch}.deb`` holding:

- a self-contained virtual environment at /opt/edgefleet: the ``[agent]`` extra's dependencies
  installed from the hash-pinned lock (``pip install --require-hashes --no-deps -r LOCK``, from
  PyPI, pip's cache or a wheelhouse given with ``--pip-arg``), then the project wheel with
  ``--no-deps``; ``pip check`` confirms the lock is complete (requirements/README.md),
- /etc/edgefleet/agent.toml (conffile, from packaging/agent.example.toml),
- /lib/systemd/system/edgefleet-agent.service, /usr/bin/edgefleet-agent (symlink),
- maintainer scripts from this folder (system user, enable unit, purge state).

Relocation: the venv is created at STAGE/opt/edgefleet with the *target's* interpreter
(``--python``, default /usr/bin/python3, which Debian/Raspberry Pi OS ship), then every
text file that mentions STAGE is rewritten to /opt/edgefleet, the interpreter symlinks
are pointed at /usr/bin/pythonX.Y, and the byte code is compiled with /opt/edgefleet as
its source path. The build fails if any file still mentions the staging folder.

Needs: dpkg-deb, the target Python (3.10+) with the venv module; the Python running this
script needs pip >= 22.3 (``pip --python``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PREFIX = "/opt/edgefleet"
PACKAGE = "edgefleet-agent"
UNIT = "edgefleet-agent.service"
SOURCES = ("pyproject.toml", "README.md", "common", "protocol", "inference", "agent", "controller")
LOCK = REPO / "requirements" / "agent.txt"


class BuildError(Exception):
    """The package cannot be built; the message says what is missing."""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError as err:
        raise BuildError(f"{cmd[0]} is not installed; install it and run again") from err
    except subprocess.CalledProcessError as err:
        raise BuildError(f"`{' '.join(cmd)}` failed with exit code {err.returncode}") from err


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise BuildError("no version in pyproject.toml; pass --version")
    return match.group(1)


def debian_arch() -> str:
    return run(["dpkg", "--print-architecture"], capture_output=True).stdout.strip()


def build_wheel(work: Path) -> Path:
    """Build the project wheel from a clean copy (keeps build/ and egg-info out of the repo)."""
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    wheels = work / "wheel"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(src)])
    found = sorted(wheels.glob("edgefleet-*.whl"))
    if not found:
        raise BuildError("pip wheel produced no edgefleet wheel")
    return found[0]


def target_python_version(python: str) -> str:
    out = run(
        [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
    )
    return out.stdout.strip()


def pip_commands(
    venv_python: Path, lock: Path, wheel: Path, pip_args: list[str]
) -> list[list[str]]:
    """The pip runs that fill the venv: the locked dependencies, the project, a check."""
    pip = [sys.executable, "-m", "pip", "--python", str(venv_python)]
    install = [
        *pip,
        "install",
        "--quiet",
        "--no-compile",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        *pip_args,
    ]
    return [
        # Every file's hash is checked; --no-deps: nothing outside the lock comes in.
        [*install, "--require-hashes", "--no-deps", "-r", str(lock)],
        # The project's own wheel (built here, so it has no hash to check) and nothing else.
        [*install, "--no-deps", str(wheel)],
        # Fails when the lock lacks a dependency of the wheel or of a locked package.
        [*pip, "check"],
    ]


def make_venv(stage: Path, python: str, wheel: Path, lock: Path, pip_args: list[str]) -> Path:
    venv = stage / PREFIX.lstrip("/")
    venv.parent.mkdir(parents=True)
    run([python, "-m", "venv", "--without-pip", str(venv)])
    for cmd in pip_commands(venv / "bin" / "python", lock, wheel, pip_args):
        run(cmd)
    # The controller's console script is in the wheel, its dependencies are not.
    (venv / "bin" / "edgefleet").unlink(missing_ok=True)
    return venv


def relocate(stage: Path, venv: Path, pyver: str) -> None:
    """Rewrite every mention of the staging path to the installed one."""
    old = str(venv).encode()
    new = PREFIX.encode()
    for path in venv.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data:
            continue
        if b"\0" in data[:8192]:
            raise BuildError(f"binary file {path} embeds the staging path; cannot relocate it")
        path.write_bytes(data.replace(old, new))
    # bin/python* -> the exact interpreter the package depends on.
    for name in ("python", "python3", f"python{pyver}"):
        link = venv / "bin" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f"/usr/bin/python{pyver}")
    leftovers = [
        str(p)
        for p in stage.rglob("*")
        if p.is_file() and not p.is_symlink() and str(stage).encode() in p.read_bytes()
    ]
    if leftovers:
        raise BuildError(f"staging path still present in: {', '.join(leftovers[:5])}")


def compile_bytecode(stage: Path, venv: Path, python: str) -> None:
    """Precompile: the service cannot write __pycache__ under ProtectSystem=strict."""
    run(
        [
            python,
            "-m",
            "compileall",
            "-q",
            "-j0",
            "-s",
            str(stage),
            "-p",
            "/",
            str(venv / "lib"),
        ],
        stdout=subprocess.DEVNULL,
    )


def install_files(stage: Path) -> None:
    etc = stage / "etc" / "edgefleet"
    etc.mkdir(parents=True)
    shutil.copy2(REPO / "packaging" / "agent.example.toml", etc / "agent.toml")
    (etc / "agent.toml").chmod(0o640)
    unit_dir = stage / "lib" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy2(REPO / "systemd" / UNIT, unit_dir / UNIT)
    (unit_dir / UNIT).chmod(0o644)
    doc = stage / PREFIX.lstrip("/") / "share" / "doc"
    doc.mkdir(parents=True)
    operations = REPO / "docs" / "operations.md"
    if operations.exists():
        shutil.copy2(operations, doc / "operations.md")
    usr_bin = stage / "usr" / "bin"
    usr_bin.mkdir(parents=True)
    (usr_bin / "edgefleet-agent").symlink_to(f"{PREFIX}/bin/edgefleet-agent")


def installed_size_kib(stage: Path) -> int:
    total = sum(p.lstat().st_size for p in stage.rglob("*") if not p.is_dir())
    return (total + 1023) // 1024


def write_control(stage: Path, *, version: str, arch: str, pyver: str) -> None:
    debian = stage / "DEBIAN"
    debian.mkdir()
    major, minor = (int(x) for x in pyver.split("."))
    python_depends = f"python3 (>= {pyver}~), python3 (<< {major}.{minor + 1}~), python{pyver}"
    control = (
        (HERE / "control.in")
        .read_text()
        .replace("@VERSION@", version)
        .replace("@ARCH@", arch)
        .replace("@PYTHON_DEPENDS@", python_depends)
        .replace("@INSTALLED_SIZE@", str(installed_size_kib(stage)))
    )
    (debian / "control").write_text(control)
    shutil.copy2(HERE / "conffiles", debian / "conffiles")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copy2(HERE / script, debian / script)
        (debian / script).chmod(0o755)
    debian.chmod(0o755)


def build(
    out: Path,
    *,
    version: str | None = None,
    python: str = "/usr/bin/python3",
    compression: str = "gzip",
    lock: Path = LOCK,
    pip_args: list[str] | None = None,
) -> Path:
    if shutil.which("dpkg-deb") is None:
        raise BuildError("dpkg-deb is not installed (Debian: apt-get install dpkg)")
    if not Path(python).exists():
        raise BuildError(f"target interpreter {python} does not exist; pass --python")
    if not lock.is_file():
        raise BuildError(f"lock file {lock} does not exist; run `make lock` or pass --lock")
    version = version or project_version()
    arch = debian_arch()
    pyver = target_python_version(python)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-deb-") as tmp:
        work = Path(tmp)
        stage = work / "root"
        stage.mkdir()
        os.chmod(stage, 0o755)  # noqa: S103 - the package root is the target's /: world-readable
        wheel = build_wheel(work)
        venv = make_venv(stage, python, wheel, lock.resolve(), pip_args or [])
        relocate(stage, venv, pyver)
        compile_bytecode(stage, venv, python)
        install_files(stage)
        write_control(stage, version=version, arch=arch, pyver=pyver)
        deb = out / f"{PACKAGE}_{version}_{arch}.deb"
        run(["dpkg-deb", "--root-owner-group", "-Z", compression, "--build", str(stage), str(deb)])
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the .deb.")
    parser.add_argument("--version", help="Package version [default: pyproject.toml's].")
    parser.add_argument(
        "--python",
        default="/usr/bin/python3",
        help="The target system's interpreter the venv is built on [default: /usr/bin/python3].",
    )
    parser.add_argument(
        "--compression", default="gzip", choices=["gzip", "xz", "zstd", "none"], help="dpkg-deb -Z"
    )
    parser.add_argument(
        "--lock",
        type=Path,
        default=LOCK,
        help="Hash-pinned requirements for the venv [default: requirements/agent.txt].",
    )
    parser.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        help="Extra argument for pip install (repeatable), e.g. --pip-arg=--find-links=DIR.",
    )
    args = parser.parse_args(argv)
    try:
        deb = build(
            args.out,
            version=args.version,
            python=args.python,
            compression=args.compression,
            lock=args.lock,
            pip_args=args.pip_arg,
        )
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
