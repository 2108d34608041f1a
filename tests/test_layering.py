"""Architecture rules (docs/architecture.md).

protocol ← inference ← agent daemon; protocol ← inference ← controller model tooling;
common (file writes, backoff) is standard library only and may be used by the inference
core, the agent and the controller. The protocol imports nothing of ours and no I/O
library; the inference core has no MQTT,
daemon or OTA code; agent and controller never import each other; nothing installed
imports the tools/ or tests/ packages. No module imports itself back through others
(a cycle), counting imports inside functions too but not ``if TYPE_CHECKING:`` blocks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "protocol", "inference", "agent", "controller", "tools")
MAX_LINES = 500
SIZED = (*PACKAGES, "tests", "bench")
"""Folders whose modules the size limit covers: the packages, the tests and the benches."""

FORBIDDEN = {
    "common": {
        "protocol",
        "inference",
        "agent",
        "controller",
        "tools",
        "tests",
        "msgspec",
        "numpy",
        "cv2",
        "paho",
    },
    "protocol": {
        "common",
        "agent",
        "controller",
        "inference",
        "tools",
        "tests",
        "paho",
        "socket",
        "sqlalchemy",
        "cv2",
        "numpy",
        "requests",
        "httpx",
    },
    "inference": {"agent", "controller", "tools", "tests", "paho", "sqlalchemy", "fastapi"},
    "agent": {"controller", "tools", "tests", "sqlalchemy", "fastapi"},
    "controller": {"agent", "tools", "tests"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(path: Path, modules: set[str]) -> set[str]:
    """First-party modules ``path`` imports, resolved to the module files they name."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != here:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        if (REPO / pkg).is_dir()
        for p in sorted((REPO / pkg).rglob("*.py"))
    }


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package: str) -> None:
    files = list((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {
        str(f.relative_to(REPO)): sorted(_top_level_imports(f) & FORBIDDEN[package]) for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"forbidden imports: {offenders}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    sources = _sources()
    modules = set(sources)
    graph = {name: _imported(path, modules) for name, path in sources.items()}
    assert graph["agent.app"], "the import graph is empty: the resolver is broken"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_the_size_limit() -> None:
    paths = [
        p
        for folder in SIZED
        if (REPO / folder).is_dir()
        for p in sorted((REPO / folder).rglob("*.py"))
    ]
    assert Path(__file__).resolve() in paths and REPO / "bench" / "__init__.py" in paths
    too_long = {
        str(path.relative_to(REPO)): lines
        for path in paths
        if "migrations" not in path.parts
        and (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_the_architecture_doc_names_files_that_exist() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(
        re.findall(r"`((?:protocol|common|inference|agent|controller|tools)/[\w/.]+)`", doc)
    )
    assert len(named) > 20, "the walks name too few files: the pattern is broken"
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
