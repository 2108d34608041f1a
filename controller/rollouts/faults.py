"""Per-device faults: what the engine does with one device's data it cannot use.

A rollout spans many devices, and one device's data (a ``desired_rev`` its retained
``reported`` message claims, a stored desired state, a write the database refuses for it)
must never stop the others. The engine turns such a problem into that device's failed
execution, whose ``reason`` is ``"{code}: {message}"`` (the machine-readable code first, like
``timeout: ...``), and the rollout goes on by its failure budget and abort criteria.

Codes:

- ``rev_out_of_range``: the device's next desired ``rev`` would be above
  :data:`protocol.limits.MAX_SAFE_INT` (the largest integer a JSON number carries exactly),
  because of the ``desired_rev`` it reported or its stored desired state;
- ``malformed_state``: its stored desired state or reported state is not what the
  controller writes (e.g. models that are not ``ModelRef`` objects, a rev that is no
  integer);
- ``desired_write_failed``: the database refused to write its desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import msgspec

from protocol import ModelRef
from protocol.limits import MAX_SAFE_INT

REV_OUT_OF_RANGE = "rev_out_of_range"
MALFORMED_STATE = "malformed_state"
DESIRED_WRITE_FAILED = "desired_write_failed"
CODES = (REV_OUT_OF_RANGE, MALFORMED_STATE, DESIRED_WRITE_FAILED)

REPAIR = (
    "the controller never writes that (was the database edited?): repair or delete the "
    "device's row in device_desired"
)


class DeviceFault(Exception):
    """One device's data cannot be used; ``reason`` goes into its executions."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


def fault_code(reason: str | None) -> str | None:
    """The fault code an execution's ``reason`` starts with, if it is one of :data:`CODES`."""
    code = (reason or "").split(":", 1)[0]
    return code if code in CODES else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def next_rev(device_id: str, last: object, reported: object) -> int:
    """The rev of the device's next desired state: one above both its last desired rev
    (``last``, None: none yet) and the ``desired_rev`` it last reported (None: none).

    Raises DeviceFault when either is no integer or the result would not be JSON-safe."""
    for name, value, fix in (
        ("stored desired rev", last, REPAIR),
        ("reported desired_rev", reported, "it takes part again once it reports a valid one"),
    ):
        if value is not None and not _is_int(value):
            raise DeviceFault(
                MALFORMED_STATE,
                f"device {device_id}'s {name} is {_short(value)}, not an integer; {fix}",
            )
    last_rev = last if _is_int(last) else 0
    reported_rev = reported if _is_int(reported) else 0
    rev = max(last_rev, reported_rev, 0) + 1
    if rev <= MAX_SAFE_INT:
        return rev
    if reported_rev >= last_rev:
        cause = (
            f"it reported desired_rev {reported_rev}, far above any rev a controller writes "
            "(its agent state may be corrupt or forged): check the device; it can take part "
            "again once it reports a lower desired_rev"
        )
    else:
        cause = f"its stored desired rev is already {last_rev}; {REPAIR}"
    raise DeviceFault(
        REV_OUT_OF_RANGE,
        f"device {device_id}'s next desired rev would be {rev}, above {MAX_SAFE_INT} (2^53-1, "
        f"the largest integer a JSON number carries exactly): {cause}",
    )


def check_models(device_id: str, models: object) -> dict[str, Any]:
    """A stored desired state's ``models``: stream name → ``ModelRef`` object (as a dict);
    DeviceFault when it is not."""
    if models is None:
        return {}
    if not isinstance(models, Mapping):
        raise DeviceFault(
            MALFORMED_STATE,
            f"device {device_id}'s stored desired models are {_short(models)}, not an object of "
            f"stream name to model; {REPAIR}",
        )
    out: dict[str, Any] = {}
    for stream, ref in models.items():
        try:
            msgspec.convert(ref, ModelRef)
        except msgspec.ValidationError as err:
            raise DeviceFault(
                MALFORMED_STATE,
                f"device {device_id}'s stored desired model for stream {stream!r} is not a "
                f"model reference ({err}): {_short(ref)}; {REPAIR}",
            ) from None
        out[str(stream)] = dict(ref)
    return out


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
