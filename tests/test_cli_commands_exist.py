"""Every ``edgefleet …`` / ``edgefleet-agent …`` command that an error message or README.md
quotes must exist in the click CLI, with the options it names.

Operators copy these lines; a command that was renamed (``edgefleet bundle build``) sends
them nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from agent.cli import main as agent_main
from controller.cli import main as controller_main

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("agent", "controller", "inference", "protocol", "common")
CLIS: dict[str, click.Group] = {"edgefleet": controller_main, "edgefleet-agent": agent_main}

_QUOTED = re.compile(r"`((?:\S*/)?edgefleet(?:-agent)?(?: [^`\n]*)?)`")
_CODE_LINE = re.compile(r"^\s*(?:\S*/)?(edgefleet(?:-agent)?) .*$")
_ALTERNATIVES = re.compile(r"\\?\|")


def quoted_commands() -> list[tuple[str, str]]:
    """(where, command line) for every quoted command in the sources and README.md."""
    found: list[tuple[str, str]] = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for match in _QUOTED.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    in_code = False
    for number, text_line in enumerate(readme.splitlines(), 1):
        if text_line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        where = f"README.md:{number}"
        if in_code:
            if _CODE_LINE.match(text_line):
                found.append((where, text_line.split("#", 1)[0].split("&&", 1)[0].strip()))
            continue
        found.extend((where, m.group(1)) for m in _QUOTED.finditer(text_line))
    return found


def _clean(token: str) -> str:
    return token.strip("[]…\"'(),.;:").removesuffix("…")


def check_command(line: str) -> str | None:
    """None when ``line`` resolves in the click CLI, else what is wrong."""
    program, *tokens = line.split()
    group: click.Command = CLIS[program.rsplit("/", 1)[-1]]
    path = [program.rsplit("/", 1)[-1]]
    tokens = [_clean(t) for t in tokens if _clean(t)]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            options = {o: p for p in group.params for o in (*p.opts, *p.secondary_opts)}
            if name not in options:
                return f"`{' '.join(path)}` has no option {name}"
            param = options[name]
            takes_value = isinstance(param, click.Option) and not (param.is_flag or param.count)
            i += 2 if takes_value and "=" not in token else 1
            continue
        if not isinstance(group, click.Group):
            i += 1  # an argument of the command
            continue
        alternatives = [a for a in _ALTERNATIVES.split(token) if a]
        for alternative in alternatives:
            if alternative not in group.commands:
                known = ", ".join(sorted(group.commands))
                return f"`{' '.join(path)}` has no command {alternative!r} (it has: {known})"
        if len(alternatives) > 1:
            return None  # `model package|sign|verify`: each exists; what follows is ambiguous
        group = group.commands[token]
        path.append(token)
        i += 1
    return None


def test_quoted_commands_are_found() -> None:
    """The scanner sees the commands it is meant to check (else the next test checks nothing)."""
    lines = [line for _, line in quoted_commands()]
    assert any(line.startswith("edgefleet controller serve") for line in lines)
    assert any(line.startswith("edgefleet-agent infer") for line in lines)
    assert any(line.startswith("edgefleet model sign") for line in lines)
    assert len(lines) > 30


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("edgefleet bundle build --key", "has no command 'bundle'"),
        ("edgefleet model package --no-such-flag", "has no option --no-such-flag"),
        ("edgefleet model sign B.efb --key k", None),
        ("edgefleet model package\\|sign\\|verify", None),
        ("edgefleet -v --url http://x devices list", None),
        ("edgefleet-agent infer -m MODEL SOURCE… --jsonl OUT", None),
    ],
)
def test_check_command(line: str, problem: str | None) -> None:
    """The checker refuses a command that does not exist and accepts ones that do."""
    result = check_command(line)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def test_every_quoted_command_exists() -> None:
    problems = [
        f"{where}: `{line}`: {problem}"
        for where, line in quoted_commands()
        if (problem := check_command(line)) is not None
    ]
    assert not problems, "\n".join(problems)
