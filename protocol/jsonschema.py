"""JSON Schema export of every message type (pure; ``python -m protocol`` writes files)."""

from __future__ import annotations

import inspect
import json
from typing import Any

import msgspec

from protocol.manifest import Manifest
from protocol.messages import MESSAGE_TYPES
from protocol.topics import TOPIC_ROOT


def clean_descriptions(node: Any) -> Any:
    """Docstring-derived descriptions without their source indentation.

    Whether msgspec dedents docstrings depends on its and Python's version (3.13 dedents at
    compile time); cleaning here keeps the exported files identical everywhere.
    """
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v)
            if k == "description" and isinstance(v, str)
            else clean_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [clean_descriptions(v) for v in node]
    return node


def schemas() -> dict[str, dict[str, Any]]:
    """File name (``status.schema.json`` …) to JSON Schema document."""
    out: dict[str, dict[str, Any]] = {}
    for kind, message_type in [*MESSAGE_TYPES.items(), ("manifest", Manifest)]:
        doc = clean_descriptions(msgspec.json.schema(message_type))
        doc = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://edgefleet.dev/schemas/v1/{kind}.schema.json",
            "title": f"edgefleet {kind} message"
            if kind != "manifest"
            else "edgefleet model manifest",
            "description": f"Payload of {TOPIC_ROOT}/{{device_id}}/{kind}"
            + ("/{stream}" if kind in ("detections", "snapshot") else "")
            if kind != "manifest"
            else "manifest.json of a model bundle",
            **doc,
        }
        out[f"{kind}.schema.json"] = doc
    return out


def render() -> dict[str, str]:
    """File name to file text, stable (sorted keys, trailing newline)."""
    return {
        name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in schemas().items()
    }
