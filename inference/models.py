"""Where a model's manifest is: ``builtin:NAME`` (a shipped model) or a path."""

from __future__ import annotations

from pathlib import Path

from inference import ASSETS_DIR
from inference.errors import ModelError

BUILTIN_PREFIX = "builtin:"


def builtin_models() -> list[str]:
    """Names of the shipped models, for ``builtin:NAME``."""
    return sorted(p.stem for p in ASSETS_DIR.glob("*.json"))


def resolve_model(value: str, base: Path) -> Path:
    """``builtin:NAME`` → the shipped manifest; otherwise a path relative to ``base``.

    Raises :class:`ModelError` for an unknown built-in name.
    """
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        path = ASSETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ModelError(
                f"no built-in model {name!r}; shipped models: {', '.join(builtin_models())}"
            )
        return path
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
