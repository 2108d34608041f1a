"""Where a model's manifest is: ``builtin:NAME`` (a shipped model), a manifest path, or a
model file (``.tflite``, ``.onnx``, ...) with its manifest beside it."""

from __future__ import annotations

from pathlib import Path

from inference import ASSETS_DIR
from inference.errors import ModelError

BUILTIN_PREFIX = "builtin:"

MODEL_SUFFIXES = frozenset({".tflite", ".onnx", ".ort", ".engine", ".plan", ".trt"})
"""Model file suffixes: such a path stands for the manifest beside it."""

_MAX_SIBLING_MANIFESTS = 64
"""How many other ``*.json`` beside a model file are read to find the one naming it."""


def builtin_models() -> list[str]:
    """Names of the shipped models, for ``builtin:NAME``."""
    return sorted(p.stem for p in ASSETS_DIR.glob("*.json"))


def resolve_model(value: str, base: Path) -> Path:
    """``builtin:NAME`` → the shipped manifest; otherwise a path relative to ``base``; a model
    file stands for its manifest (:func:`manifest_for`).

    Raises :class:`ModelError` for an unknown built-in name or a model file without a manifest.
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
    return manifest_for(p if p.is_absolute() else (base / p).resolve())


def is_model_file(path: Path) -> bool:
    """True when ``path`` names a model file (by its suffix), not a manifest."""
    return path.suffix.lower() in MODEL_SUFFIXES


def manifest_for(path: Path) -> Path:
    """The manifest for ``path``: ``path`` itself unless it is a model file; for a model file,
    ``STEM.json`` beside it, else the one manifest beside it whose ``model`` names the file.

    Raises :class:`ModelError` naming the expected manifest and how to make one.
    """
    path = Path(path)
    if not is_model_file(path):
        return path
    if not path.is_file():
        raise ModelError(
            f"model file {path} not found: check the path (a model file needs its manifest "
            f"{path.with_suffix('.json').name} beside it)"
        )
    same_stem = path.with_suffix(".json")
    if same_stem.is_file():
        return same_stem
    naming = _manifests_naming(path)
    if len(naming) == 1:
        return naming[0]
    if len(naming) > 1:
        found = ", ".join(str(p) for p in naming)
        raise ModelError(
            f"model file {path} is named by several manifests ({found}): pass the manifest "
            "(.json) you mean instead of the model file"
        )
    raise ModelError(
        f"model file {path} has no manifest: expected {same_stem} beside it (it says how to "
        "feed the model and decode its outputs). Make a draft with "
        f"`edgefleet model init {path}`, fill in its TODO lines, then try again"
    )


def _manifests_naming(model_path: Path) -> list[Path]:
    """The ``*.json`` beside ``model_path`` whose top-level ``model`` is its file name."""
    import json

    found = []
    candidates = sorted(model_path.parent.glob("*.json"))[:_MAX_SIBLING_MANIFESTS]
    for candidate in candidates:
        try:
            if candidate.stat().st_size > 1 << 20:
                continue
            data = json.loads(candidate.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("model") == model_path.name:
            found.append(candidate)
    return found
