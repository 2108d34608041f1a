"""How the operator CLI prints: JSON for scripts, rich tables and markup for people."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import click


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def ago(ts: float | None, now: float | None = None) -> str:
    """``5m ago`` for a Unix time (``-`` for None)."""
    if ts is None:
        return "-"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def make_console() -> Any:
    """A rich console on stdout (rich loads only when a command prints a table)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def escape(value: object) -> str:
    """Escape text from the network/database for rich markup."""
    from rich.markup import escape as escape_markup

    return escape_markup(str(value))


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 device``, ``2 devices`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


CODE_WIDTH_MAX = 40
"""Reason codes up to this long are never cut; longer text folds onto more lines."""


def uncut_column(header: str, values: Iterable[str]) -> Any:
    """A rich table column that never truncates a reason code: it is at least as wide as
    the longest word of ``values`` (up to ``CODE_WIDTH_MAX``) and folds longer text."""
    from rich.table import Column

    longest = max((len(w) for v in values for w in v.split()), default=0)
    return Column(header, min_width=min(max(longest, len(header)), CODE_WIDTH_MAX), overflow="fold")


def lineage_lines(model: dict[str, Any]) -> list[str]:
    """Human lines of an API model's ``lineage`` (for ``model show``)."""
    lineage = model.get("lineage") or {}
    lines = []
    for field, title in (("source_commit", "source commit"), ("training_data", "training data")):
        if lineage.get(field):
            lines.append(f"{title:<14} {lineage[field]}")
    if lineage.get("metrics"):
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(lineage["metrics"].items()))
        lines.append(f"{'metrics':<14} {shown}")
    if lineage.get("labels"):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(lineage["labels"].items()))
        lines.append(f"{'labels':<14} {shown}")
    return lines
