#!/usr/bin/env python3
"""Check the lock files in this folder against pyproject.toml and, with --online, against PyPI.

    python requirements/check.py            # offline: hashes, pins, extras covered
    python requirements/check.py --online   # also: pip finds a wheel for every pin, per target

Offline, for every lock and every target (Python version x architecture) it serves: each
requirement is pinned with ``==`` and carries at least one ``--hash``, no package is pinned
twice for one target, and every package the lock's extras name in pyproject.toml (the core
dependencies included, ``edgefleet[...]`` self-references expanded) is pinned to a version
the extra allows. tests/test_locks.py runs the same checks.

Online (``make lock`` runs it): for each target, pip resolves the requirements whose
markers hold there, wheels only, with that target's Python version and manylinux tags,
against PyPI alone. uv's universal resolution ignores the upper bound of a package's
Requires-Python; this is where such a pin shows up, before a device build does.

Needs the ``packaging`` library (pip's own dependency; ``make lock`` installs it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
INDEX = "https://pypi.org/simple"
GLIBC_MINOR = 35  # Jetson JetPack 6 (Ubuntu 22.04) has glibc 2.35, Debian bookworm 2.36


@dataclass(frozen=True)
class Target:
    python: str  # "3.11"
    machine: str  # platform_machine: "x86_64" or "aarch64"

    def __str__(self) -> str:
        return f"Python {self.python} on {self.machine}"

    def environment(self) -> dict[str, str]:
        """PEP 508 marker variables of a CPython of this version on Linux on this machine."""
        return {
            "implementation_name": "cpython",
            "implementation_version": f"{self.python}.0",
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": f"{self.python}.0",
            "python_version": self.python,
            "sys_platform": "linux",
            "extra": "",
        }

    def pip_tags(self) -> list[str]:
        """pip options that select this target's wheels (pip does not expand manylinux_2_X)."""
        plats = [f"manylinux_2_{m}_{self.machine}" for m in range(17, GLIBC_MINOR + 1)]
        plats += [f"manylinux2014_{self.machine}"]
        return ["--python-version", self.python, *(f"--platform={p}" for p in plats)]


@dataclass(frozen=True)
class Lock:
    """A lock file, the extras of pyproject.toml it pins, and the targets it must serve."""

    path: Path
    extras: tuple[str, ...]
    targets: tuple[Target, ...]

    @property
    def name(self) -> str:
        return self.path.name


_BOTH = ("x86_64", "aarch64")
LOCKS = (
    # The .deb's venv: Debian bookworm (3.11) and Jetson JetPack 6 (3.10), both machines.
    Lock(
        HERE / "agent.txt",
        ("agent",),
        tuple(Target(p, m) for p in ("3.10", "3.11") for m in _BOTH),
    ),
    # The controller image (python:3.11-slim-bookworm, amd64 and arm64).
    Lock(
        HERE / "controller.txt",
        ("controller", "postgres", "s3"),
        tuple(Target("3.11", m) for m in _BOTH),
    ),
)


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> NormalizedName:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str | None:
        specs = list(self.requirement.specifier)
        if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
            return specs[0].version
        return None

    def applies(self, target: Target) -> bool:
        marker = self.requirement.marker
        return marker is None or marker.evaluate(target.environment())


def read_lock(path: Path) -> list[Pin]:
    """The requirements of a pip requirements file with ``--hash`` options (uv/pip-tools)."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise ValueError(f"{path.name}: options are not expected in a lock: {line}")
        spec, _, _ = line.partition(" --hash=")
        hashes = tuple(re.findall(r"--hash=(sha256:[0-9a-f]{64})\b", line))
        pins.append(Pin(Requirement(spec.strip()), hashes))
    return pins


def needed(extras: Iterable[str], pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The requirements the project's core and ``extras`` name (self-references expanded)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    own = canonicalize_name(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found = [Requirement(s) for s in project.get("dependencies", [])]
    todo, seen = list(extras), set[str]()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == own:
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def problems(lock: Lock, pyproject: Path = PYPROJECT) -> Iterator[str]:
    """What is wrong with ``lock`` without asking an index: one line per problem."""
    pins = read_lock(lock.path)
    for pin in pins:
        if pin.version is None:
            yield f"{lock.name}: {pin.requirement} is not pinned with =="
        if not pin.hashes:
            yield f"{lock.name}: {pin.requirement} has no --hash"
    for target in lock.targets:
        active: dict[NormalizedName, str | None] = {}
        for pin in pins:
            if pin.applies(target):
                if pin.name in active:
                    yield f"{lock.name}: {pin.name} is pinned twice for {target}"
                active[pin.name] = pin.version
        for req in needed(lock.extras, pyproject):
            if req.marker is not None and not req.marker.evaluate(target.environment()):
                continue
            name = canonicalize_name(req.name)
            if name not in active:
                yield f"{lock.name}: {name} ({req}) is not pinned for {target}"
            elif (version := active[name]) is not None and not req.specifier.contains(
                version, prereleases=True
            ):
                yield f"{lock.name}: {name}=={version} is outside {req.specifier} for {target}"


def resolve_online(lock: Lock) -> bool:
    """pip (PyPI only, no local config) finds a wheel for every pin, per target."""
    pins = read_lock(lock.path)
    ok = True
    for target in lock.targets:
        lines = [f"{p.requirement.name}=={p.version}" for p in pins if p.applies(target)]
        with tempfile.TemporaryDirectory() as tmp:
            reqs = Path(tmp) / "requirements.txt"
            reqs.write_text("\n".join(lines) + "\n")
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "--isolated",  # no pip.conf, no PIP_* variables: PyPI alone
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--no-deps",
                "--only-binary=:all:",
                "--index-url",
                INDEX,
                *target.pip_tags(),
                "--target",
                str(Path(tmp) / "target"),
                "-r",
                str(reqs),
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"{lock.name}: {target}: {len(lines)} wheels {status}", file=sys.stderr)
        if result.returncode != 0:
            ok = False
            print(result.stderr.strip(), file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--online", action="store_true", help="Also resolve against PyPI.")
    args = parser.parse_args(argv)
    found = [p for lock in LOCKS for p in problems(lock)]
    for line in found:
        print(line, file=sys.stderr)
    ok = not found
    if args.online:
        ok = all([resolve_online(lock) for lock in LOCKS]) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
