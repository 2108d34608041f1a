"""The controller imports protocol, never agent (and protocol never imports the controller)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {(str(path), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path), node.module.split(".")[0]))
    return found


def test_controller_never_imports_the_agent() -> None:
    offenders = sorted(path for path, mod in _imports("controller") if mod == "agent")
    assert offenders == []


def test_protocol_never_imports_the_controller() -> None:
    offenders = sorted(path for path, mod in _imports("protocol") if mod == "controller")
    assert offenders == []
