"""Crash-safe writes for the agent's persisted state.

Every state file is replaced as a whole: write a temporary file in the same folder, fsync it,
``os.replace`` it over the old one, then fsync the folder so the rename itself survives a power
loss. A reader therefore sees either the old or the new content, never a mix.

JSON state files carry a ``schema`` version; :func:`read_json_state` refuses unknown versions
and corrupt files with a :class:`StateFileError` that says which file and what to do.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import AgentError


class StateFileError(AgentError):
    """A persisted agent state file is corrupt or was written by an incompatible version."""


def fsync_dir(directory: Path) -> None:
    """fsync a folder so that file creations, renames and deletions in it are durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
