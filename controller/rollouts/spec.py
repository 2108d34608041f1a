"""Parsing of what an operator writes for a rollout: durations, percentages, stages, selectors.

Pure functions shared by the CLI (early, local validation) and the API (authoritative).
Every error is a RolloutError (kind ``invalid``) that says what is accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from controller.errors import RolloutError
from protocol import ProtocolError, validate_device_id, validate_stream_name
from protocol.limits import MODEL_NAME_BODY

ALL_STREAMS = "*"
DEFAULT_STAGES = "1,10%,50%,100%"
DEFAULT_BAKE = "10m"
DEFAULT_MAX_FAILURES = "5%"
DEFAULT_MIN_EXECUTED = 5
DEFAULT_TIMEOUT = "15m"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
TAG_BODY = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
"""A device tag, unanchored (the HTTP API's patterns build on it)."""
VERSION_BODY = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}"
"""A model version as rollouts and the API accept it, unanchored."""
_TAG = re.compile(TAG_BODY)
_REF = re.compile(f"({MODEL_NAME_BODY})@({VERSION_BODY})")


def invalid(message: str) -> RolloutError:
    return RolloutError(message, kind="invalid")


def parse_duration(text: str, *, what: str = "duration") -> float:
    """``30s``, ``10m``, ``1h``, ``1h30m``, ``500ms``, ``2d`` or plain seconds (``90``, ``0.5``)."""
    value = text.strip().lower()
    if _NUMBER.fullmatch(value):
        return float(value)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise invalid(f"{what} {text!r} is not a duration: use e.g. 30s, 10m, 1h, 1h30m or seconds")
    return total


def format_duration(seconds: float) -> str:
    """The inverse of ``parse_duration`` for display: ``90`` → ``1m30s``."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:.0f}ms"
    if seconds != int(seconds):
        return f"{seconds:.1f}s"
    rest, out = int(seconds), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out + (f"{rest}s" if rest or not out else "")


def parse_share(text: str, *, what: str = "share") -> float:
    """``5%`` → 0.05; a plain number is a fraction in 0..1 (``0.05``)."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise invalid(f"{what} {text!r} is not a percentage: use e.g. 5% (or 0.05)") from None
    if not 0 <= share <= 1 or math.isnan(share):
        raise invalid(f"{what} {text!r} must be between 0% and 100%")
    return share


@dataclass(frozen=True, slots=True)
class Stage:
    """One ``--stages`` item: a device count (``10``) or a share of the selection (``10%``)."""

    count: int | None = None
    share: float | None = None

    def devices(self, selected: int) -> int:
        if self.count is not None:
            return min(self.count, selected)
        assert self.share is not None
        return min(selected, math.ceil(self.share * selected - 1e-9))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{(self.share or 0) * 100:g}%"


def parse_stages(text: str | Sequence[str]) -> list[Stage]:
    """``1,10%,50%,100%`` (cumulative): a bare number is a device count, ``N%`` a share."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise invalid("--stages is empty: give cumulative stages such as 1,10%,50%,100%")
    stages: list[Stage] = []
    for item in items:
        if item.endswith("%"):
            try:
                share = float(item[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 < share <= 1:
                raise invalid(f"stage {item!r}: a percentage must be above 0% and at most 100%")
            stages.append(Stage(share=share))
        elif item.isdigit() and int(item) > 0:
            stages.append(Stage(count=int(item)))
        else:
            raise invalid(
                f"stage {item!r} is neither a device count (e.g. 1) nor a percentage (e.g. 10%)"
            )
    return stages


def resolve_stages(stages: Sequence[Stage], selected: int) -> list[int]:
    """Cumulative device counts per stage for a selection of ``selected`` devices.

    Stages that would add no device are dropped; the last one must cover the whole selection.
    """
    counts: list[int] = []
    previous = 0
    for stage in stages:
        n = stage.devices(selected)
        if n < previous:
            spec = ",".join(str(s) for s in stages)
            raise invalid(
                f"stages {spec} are cumulative and must not shrink: stage {stage} is "
                f"{n} of {selected} devices, the one before it {previous}"
            )
        if n > previous:
            counts.append(n)
            previous = n
    if previous < selected:
        spec = ",".join(str(s) for s in stages)
        raise invalid(
            f"stages {spec} end at {previous} of the {selected} selected devices; the last "
            "stage must cover the whole selection (end with 100%)"
        )
    return counts


@dataclass(frozen=True, slots=True)
class Selector:
    """``--select`` values: ``all``, ``tag=TAG`` (e.g. ``tag=site:berlin``) or device ids; a
    device matching any of them is selected."""

    all: bool = False
    tags: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()


def parse_selector(values: Sequence[str]) -> Selector:
    if not values:
        raise invalid("select devices with --select all, --select tag=KEY:VALUE or --select ID")
    everything = False
    tags: list[str] = []
    ids: list[str] = []
    for raw in values:
        value = raw.strip()
        if value == "all":
            everything = True
        elif value.startswith("tag="):
            tag = value[4:]
            if not _TAG.fullmatch(tag):
                raise invalid(
                    f"--select {raw!r}: a tag is 1-64 characters of letters, digits, "
                    "'_', '.', ':' or '-' (e.g. tag=site:berlin)"
                )
            tags.append(tag)
        else:
            try:
                ids.append(validate_device_id(value))
            except ProtocolError as err:
                raise invalid(
                    f"--select {raw!r} is not 'all', 'tag=KEY:VALUE' or a device id ({err})"
                ) from None
    return Selector(
        all=everything, tags=tuple(dict.fromkeys(tags)), devices=tuple(dict.fromkeys(ids))
    )


def parse_stream(value: str) -> str:
    if value == ALL_STREAMS:
        return value
    try:
        return validate_stream_name(value)
    except ProtocolError as err:
        raise invalid(f"--stream: {err}, or * for every stream") from None


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``name@version`` → (name, version)."""
    match = _REF.fullmatch(ref.strip())
    if match is None:
        raise invalid(
            f"model {ref!r} is not MODEL@VERSION (e.g. blazeface@1.2.0); `edgefleet model list` "
            "shows the uploaded models"
        )
    return match.group(1), match.group(2)
