"""The agent's persisted JSON state files (written with :mod:`common.atomic`).

Every state file is replaced as a whole: write a temporary file in the same folder, fsync it,
``os.replace`` it over the old one, then fsync the folder so the rename itself survives a power
loss. A reader therefore sees either the old or the new content, never a mix.

JSON state files carry a ``schema`` version; :func:`read_json_state` refuses unknown versions
and corrupt files with a :class:`StateFileError` that says which file and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from common.atomic import atomic_write_bytes


class StateFileError(AgentError):
    """A persisted agent state file is corrupt or was written by an incompatible version."""


def atomic_write_json(path: Path, *, schema: int, data: Mapping[str, Any]) -> None:
    """Write ``{"schema": schema, **data}`` as JSON with :func:`atomic_write_bytes`."""
    body = {"schema": schema, **data}
    atomic_write_bytes(path, json.dumps(body, sort_keys=True).encode("utf-8") + b"\n")


def read_json_state(path: Path, *, schema: int, what: str, fix: str) -> dict[str, Any] | None:
    """Read a JSON state file written by :func:`atomic_write_json`; None if it does not exist.

    ``what`` names the file's purpose and ``fix`` tells the operator what to do when the file
    is corrupt or has another schema version; both go into the :class:`StateFileError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateFileError(f"cannot read {what} {path}: {err.strerror}; {fix}") from err
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise StateFileError(f"{what} {path} is corrupt (not JSON: {err}); {fix}") from err
    if not isinstance(value, dict):
        raise StateFileError(f"{what} {path} is corrupt (not a JSON object); {fix}")
    found = value.get("schema")
    if found != schema:
        raise StateFileError(
            f"{what} {path} has schema {found!r}, this agent understands schema {schema} "
            f"(written by another agent version?); {fix}"
        )
    return value
