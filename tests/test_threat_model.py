"""docs/operations.md's threat model: every **Can** and **Cannot** line of an attacker names
at least one test, and every test it names exists (a renamed or removed test would leave a
line that no longer proves anything)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
NOT_COVERED = "### Not covered"
"""The section listing what the threat model leaves out: its lines claim nothing."""


def _section(text: str | None = None) -> str:
    text = DOC.read_text(encoding="utf-8") if text is None else text
    section = text.split("## Threat model", 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]


def _cited() -> set[tuple[str, str]]:
    return set(CITATION.findall(_section()))


def bullets(text: str | None = None) -> list[tuple[str, str]]:
    """``(attacker heading, bullet)`` for every bullet of the threat model before "Not
    covered", a bullet running until the next bullet, heading or blank line."""
    out: list[tuple[str, str]] = []
    heading = ""
    bullet: list[str] | None = None
    for line in _section(text).split(NOT_COVERED, 1)[0].splitlines():
        starts_bullet = line.startswith("- ")
        if bullet is not None and (starts_bullet or not line.strip() or line.startswith("#")):
            out.append((heading, " ".join(bullet)))
            bullet = None
        if line.startswith("### "):
            heading = line[4:].strip()
        elif starts_bullet:
            bullet = [line[2:].strip()]
        elif bullet is not None:
            bullet.append(line.strip())
    if bullet is not None:
        out.append((heading, " ".join(bullet)))
    return out


def uncited(text: str | None = None) -> list[str]:
    """The **Can** and **Cannot** lines that name no test."""
    return [
        f"{heading}: {bullet[:90]}"
        for heading, bullet in bullets(text)
        if bullet.startswith(("**Can**", "**Cannot**")) and not CITATION.search(bullet)
    ]


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
    attackers = {heading for heading, _ in bullets()}
    assert len(attackers) == 5, attackers  # device, viewer, operator, broker, artifact store


def test_every_can_and_cannot_line_names_a_test() -> None:
    lines = bullets()
    assert sum(b.startswith("**Cannot**") for _, b in lines) >= 12, lines
    assert all(b.startswith(("**Can**", "**Cannot**")) for _, b in lines), [
        b[:60] for _, b in lines if not b.startswith(("**Can**", "**Cannot**"))
    ]
    assert not uncited(), (
        f"docs/operations.md: lines of the threat model without a test: {uncited()}"
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            "## Threat model\n\n### A broker\n\n- **Cannot** stall a rollout (as for a device,\n"
            "  above).\n- **Can** read: `tests/test_x.py::test_y`.\n\n## Next\n- **Cannot** z\n",
            ["A broker: **Cannot** stall a rollout (as for a device, above)."],
        ),
        (
            "## Threat model\n### A device\n- **Cannot** a:\n  `tests/test_x.py::test_y`.\n"
            "- **Can** b\n  (only its own).\n### Not covered\n- **Cannot** anything\n",
            ["A device: **Can** b (only its own)."],
        ),
    ],
)
def test_a_line_without_a_test_is_found(doc: str, expected: list[str]) -> None:
    assert uncited(doc) == expected


def test_every_cited_test_exists() -> None:
    missing = [
        f"{file}::{name}"
        for file, name in sorted(_cited())
        if not (ROOT / file).is_file() or name not in _tests_in(ROOT / file)
    ]
    assert not missing, f"docs/operations.md cites tests that do not exist: {missing}"
