"""Per-rollout overrides of the devices' health gate (``protocol.Gate``), checked and described.

Pure functions shared by the CLI (early, local checks with its option names), the API
(authoritative, with ``gate.FIELD`` names) and the engine, which writes a rollout's
overrides into every ``ModelRef`` it desires (docs/ota.md, "Rollouts"). Overrides are
stored and sent in their compact form: only what differs from the device's defaults
(``compare`` only when false), None when nothing does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from controller.errors import RolloutError
from protocol import Gate

FIELDS: tuple[str, ...] = tuple(Gate.__struct_fields__)
"""``compare``, ``min_agreement``, ``max_latency_ratio``, ``max_errors``, ``undecided``."""
MAX_LATENCY_RATIO = 1000.0
MAX_ERRORS = 1_000_000
UNDECIDED: tuple[str, ...] = ("rollback", "commit")
COMPARING: tuple[str, ...] = ("min_agreement", "max_latency_ratio", "undecided")
"""Overrides that only mean something while the candidate is compared with the current model."""

ALLOWED: dict[str, str] = {
    "compare": "true or false (false: replace, do not compare)",
    "min_agreement": "a share of boxes between 0 and 1 (0.9 = 90%)",
    "max_latency_ratio": f"a ratio above 0 and at most {MAX_LATENCY_RATIO:g} (1.5 = 50% slower)",
    "max_errors": f"a whole number between 0 and {MAX_ERRORS}",
    "undecided": " or ".join(UNDECIDED),
}
"""What each field accepts, in words (error messages, docs)."""

Label = Callable[[str], str]
"""How a field is named in messages."""


def api_label(field: str) -> str:
    return f"gate.{field}"


def cli_label(field: str) -> str:
    return "--replace" if field == "compare" else "--" + field.replace("_", "-")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(field: str, value: Any) -> bool:
    if field == "compare":
        return isinstance(value, bool)
    if field == "min_agreement":
        return _is_number(value) and 0.0 <= value <= 1.0
    if field == "max_latency_ratio":
        return _is_number(value) and 0.0 < value <= MAX_LATENCY_RATIO
    if field == "max_errors":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ERRORS
    return value in UNDECIDED


def check_value(field: str, value: Any, label: Label = api_label) -> Any:
    """``value`` if the field accepts it (None: the device's default), else RolloutError."""
    if field not in ALLOWED:
        raise RolloutError(
            f"{label(field)} is not a gate setting; use {', '.join(FIELDS)}", kind="invalid"
        )
    if value is None or _in_range(field, value):
        return value
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    raise RolloutError(
        f"{label(field)} {shown} is out of range: use {ALLOWED[field]}", kind="invalid"
    )


def normalize(values: Mapping[str, Any] | None, label: Label = api_label) -> dict[str, Any] | None:
    """The compact overrides of ``values`` (the ``protocol.Gate`` fields), or None when they
    change nothing; RolloutError (invalid) naming the field and what it accepts."""
    if not values:
        return None
    unknown = [k for k in values if k not in ALLOWED]
    if unknown:
        check_value(unknown[0], None, label)
    out = {
        k: check_value(k, values[k], label)
        for k in FIELDS
        if k in values and values[k] is not None and not (k == "compare" and values[k] is True)
    }
    if out.get("compare") is False:
        moot = [k for k in COMPARING if k in out]
        if moot:
            switch = label("compare")
            when = f"with {switch}" if switch.startswith("--") else f"when {switch} is false"
            raise RolloutError(
                f"{label(moot[0])} does not apply {when}: a replacement is not compared with "
                "the current model, so there is no agreement, latency ratio or undecided "
                "outcome (errors, golden samples and the frame rate are still checked)",
                kind="invalid",
            )
    if not out:
        return None
    msgspec.convert(out, Gate)  # what the device decodes; the checks above are at least as strict
    return out


def expand(gate: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Every field of stored overrides (None = the device's default), for the API."""
    if not gate:
        return None
    return msgspec.to_builtins(msgspec.convert(dict(gate), Gate))  # type: ignore[no-any-return]


def describe(gate: Mapping[str, Any] | None) -> str | None:
    """The overrides in words, e.g. ``min agreement 90%, max latency ratio 1.5x``."""
    if not gate:
        return None
    parts = []
    if gate.get("compare") is False:
        parts.append("replace, do not compare")
    if gate.get("min_agreement") is not None:
        parts.append(f"min agreement {gate['min_agreement'] * 100:g}%")
    if gate.get("max_latency_ratio") is not None:
        parts.append(f"max latency ratio {gate['max_latency_ratio']:g}x")
    if gate.get("max_errors") is not None:
        parts.append(f"max errors {gate['max_errors']}")
    if gate.get("undecided") is not None:
        parts.append(f"undecided → {gate['undecided']}")
    return ", ".join(parts) or None


def parse_ratio(text: str, *, what: str) -> float:
    """``1.5`` or ``1.5x`` → 1.5 (range checked by ``check_value``)."""
    value = text.strip().lower().removesuffix("x")
    try:
        ratio = float(value)
    except ValueError:
        raise RolloutError(
            f"{what} {text!r} is not a ratio: use e.g. 1.5 (the candidate's median inference "
            "time at most 1.5x the current model's)",
            kind="invalid",
        ) from None
    return ratio
