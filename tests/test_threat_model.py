"""Every test that docs/operations.md's threat model cites exists (a renamed or removed
test would leave a line that no longer proves anything)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"


def _cited() -> set[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Threat model", 1)[1]
    return set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", section))


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_the_threat_model_cites_tests_for_each_attacker() -> None:
    cited = _cited()
    assert len(cited) >= 25, "the threat model names the tests that prove it"


def test_every_cited_test_exists() -> None:
    missing = [
        f"{file}::{name}"
        for file, name in sorted(_cited())
        if not (ROOT / file).is_file() or name not in _tests_in(ROOT / file)
    ]
    assert not missing, f"docs/operations.md cites tests that do not exist: {missing}"
