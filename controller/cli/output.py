"""How the operator CLI prints: JSON for scripts, rich tables and markup for people."""

from __future__ import annotations

import json
import time
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
