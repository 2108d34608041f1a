"""Messages checked against the protocol's bounds, on both sides of the broker.

- :func:`check_payload`: what a consumer (the controller) runs on a received payload: its
  size first (before decoding a byte), then strict decoding with the bounds, then the topic
  against the payload, then NUL characters. Raises :class:`InvalidMessage` saying why
  (``reason``) and where (``field``).
- :func:`encode_checked`: what a producer (the agent) runs: encode, then the same check, so
  nothing outside the bounds is ever published. With ``fit=True`` a message that fails is
  first brought within the bounds by :func:`fit` (over-long text truncated, lists cut,
  numbers clamped) and checked again.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from msgspec import inspect

from protocol.errors import ProtocolError
from protocol.limits import MAX_MESSAGE_BYTES, describe
from protocol.messages import MESSAGE_TYPES, M, decoder, encode

Reason = Literal["too_large", "not_json", "invalid", "out_of_bounds", "topic_mismatch", "nul"]
"""Why a message was refused: larger than its kind's limit, not JSON (or not UTF-8), not the
message type (a missing, unknown or mistyped field), a value outside its bounds, a topic
naming another device or stream than the payload, a string holding a NUL character."""
REASONS: tuple[Reason, ...] = (
    "too_large",
    "not_json",
    "invalid",
    "out_of_bounds",
    "topic_mismatch",
    "nul",
)

KIND_OF: dict[type[Any], str] = {t: k for k, t in MESSAGE_TYPES.items()}
"""Message type to topic kind."""

_BOUND = re.compile(r"^(Number out of range|Expected `\w+` (of length|[<>]=?|matching regex))")
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
ELLIPSIS = "…"


class InvalidMessage(ProtocolError):
    """A payload outside the protocol: ``kind`` (topic kind), ``reason`` (:data:`Reason`) and
    ``field`` (JSON path without ``$.``, e.g. ``streams[3].name``; ``payload`` for the whole
    message) say what is wrong."""

    def __init__(self, kind: str, reason: Reason, field: str, detail: str) -> None:
        super().__init__(f"invalid {MESSAGE_TYPES[kind].__name__} message: {detail}")
        self.kind = kind
        self.reason = reason
        self.field = field


def check_size(kind: str, size: int) -> None:
    """Raise InvalidMessage if ``size`` bytes is over the limit of ``kind``."""
    limit = MAX_MESSAGE_BYTES[kind]
    if size > limit:
        raise InvalidMessage(
            kind,
            "too_large",
            "payload",
            f"the payload of {size} bytes is over the {limit}-byte limit of {kind} messages",
        )


def check_payload(
    kind: str,
    payload: bytes,
    *,
    device_id: str | None = None,
    stream: str | None = None,
) -> Any:
    """Decode ``payload`` of topic ``kind`` within the protocol's bounds, or raise
    InvalidMessage. ``device_id``/``stream``: the topic's, which the payload must repeat."""
    message_type = MESSAGE_TYPES[kind]
    check_size(kind, len(payload))
    try:
        message = decoder(message_type).decode(payload)
    except msgspec.ValidationError as err:
        text = str(err)
        at = _AT.search(text)
        field = (at.group(1) or "payload") if at else "payload"
        reason: Reason = "out_of_bounds" if _BOUND.match(text) else "invalid"
        raise InvalidMessage(kind, reason, field, describe(text)) from err
    except msgspec.DecodeError as err:
        raise InvalidMessage(kind, "not_json", "payload", f"not valid JSON (UTF-8): {err}") from err
    if device_id is not None and getattr(message, "device_id", device_id) != device_id:
        raise InvalidMessage(
            kind,
            "topic_mismatch",
            "device_id",
            f"payload device_id {message.device_id!r} does not match the topic's device id "
            f"{device_id!r}",
        )
    if stream is not None and getattr(message, "stream", None) != stream:
        raise InvalidMessage(
            kind,
            "topic_mismatch",
            "stream",
            f"payload stream {getattr(message, 'stream', None)!r} does not match the topic's "
            f"stream {stream!r}",
        )
    if b"\\u0000" in payload:
        where = nul_path(message)
        if where is not None:
            raise InvalidMessage(kind, "nul", where, f"`{where}` contains a NUL character")
    return message


def encode_checked(message: msgspec.Struct, *, fit: bool = False) -> bytes:
    """Encode ``message`` and check the bytes as a consumer will (:func:`check_payload`);
    raise InvalidMessage if they fall outside the protocol. ``fit``: on failure, bring the
    message within the bounds (:func:`fit`) and try once more."""
    kind = KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a message type of the protocol")
    payload = encode(message)
    try:
        check_payload(kind, payload)
    except InvalidMessage:
        if not fit:
            raise
        payload = encode(_fit(message, _type_info(type(message))))
        check_payload(kind, payload)
    return payload


def nul_path(value: Any, path: str = "") -> str | None:
    """JSON path (without ``$.``) of the first string in ``value`` holding a NUL, or None."""
    if isinstance(value, str):
        return (path or "payload") if "\x00" in value else None
    if isinstance(value, dict):
        if any("\x00" in str(key) for key in value):
            return f"{path}[key]" if path else "payload"
        children: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        names = getattr(value, "__struct_fields__", ())
        children = ((f"{path}.{n}" if path else n, getattr(value, n)) for n in names)
    for child_path, child in children:
        found = nul_path(child, child_path)
        if found is not None:
            return found
    return None


# --- fit: bring a message within the bounds ----------------------------------------------


def fit(message: M) -> M:
    """A copy of ``message`` within the bounds where a bound can be met by shortening or
    clamping: free text truncated (ending in "…") and rid of NUL characters, lists and maps
    cut to their length (a list keeps its first items: detections are best first), numbers
    clamped to their range (a non-finite optional number becomes None). Patterns (ids, model
    refs, codes) cannot be fitted; :func:`encode_checked` still refuses those."""
    fitted: M = _fit(message, _type_info(type(message)))
    return fitted


def _fit(value: Any, t: Any) -> Any:
    if isinstance(t, inspect.Metadata):
        return _fit(value, t.type)
    fitter = _FITTERS.get(type(t))
    return fitter(value, t) if fitter is not None else value


def _fit_union(value: Any, t: inspect.UnionType) -> Any:
    if value is None:
        return None
    optional = any(isinstance(m, inspect.NoneType) for m in t.types)
    if optional and isinstance(value, float) and not math.isfinite(value):
        return None
    for member in t.types:
        if _fits_type(value, member):
            return _fit(value, member)
    return value


def _fit_list(value: Any, t: inspect.ListType) -> Any:
    items = value[: t.max_length] if t.max_length is not None else value
    return [_fit(v, t.item_type) for v in items]


def _fit_tuple(value: Any, t: inspect.TupleType) -> Any:
    return tuple(_fit(v, it) for v, it in zip(value, t.item_types, strict=False))


def _fit_dict(value: Any, t: inspect.DictType) -> Any:
    items = list(value.items())[: t.max_length] if t.max_length is not None else value.items()
    return {_fit(k, t.key_type): _fit(v, t.value_type) for k, v in items}


def _fit_struct(value: Any, t: inspect.StructType) -> Any:
    changes = {}
    for f in t.fields:
        old = getattr(value, f.name)
        new = _fit(old, f.type)
        if new is not old:
            changes[f.name] = new
    return msgspec.structs.replace(value, **changes) if changes else value


def _fit_str(value: Any, t: inspect.StrType) -> Any:
    if not isinstance(value, str) or t.pattern is not None:
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if t.max_length is not None and len(value) > t.max_length:
        value = value[: max(t.max_length - 1, 0)] + ELLIPSIS
    return value


def _clamp(value: Any, t: inspect.FloatType | inspect.IntType) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    low = t.ge if t.ge is not None else t.gt
    high = t.le if t.le is not None else t.lt
    if isinstance(value, float) and math.isnan(value):
        return type(value)(low if low is not None else 0.0)
    if low is not None and value < low:
        return type(value)(low)
    if high is not None and value > high:
        return type(value)(high)
    return value


_FITTERS: dict[type[Any], Callable[[Any, Any], Any]] = {
    inspect.UnionType: _fit_union,
    inspect.StructType: _fit_struct,
    inspect.StrType: _fit_str,
    inspect.FloatType: _clamp,
    inspect.IntType: _clamp,
    inspect.ListType: _fit_list,
    inspect.TupleType: _fit_tuple,
    inspect.DictType: _fit_dict,
}

_PY_TYPES: dict[type[Any], Callable[[Any], bool]] = {
    inspect.StrType: lambda v: isinstance(v, str),
    inspect.BoolType: lambda v: isinstance(v, bool),
    inspect.IntType: lambda v: isinstance(v, int) and not isinstance(v, bool),
    inspect.FloatType: lambda v: isinstance(v, float),
    inspect.NoneType: lambda v: v is None,
}


def _fits_type(value: Any, t: Any) -> bool:
    base = t.type if isinstance(t, inspect.Metadata) else t
    if isinstance(base, inspect.StructType):
        return isinstance(value, base.cls)
    check = _PY_TYPES.get(type(base))
    return check(value) if check is not None else isinstance(value, (list, tuple, dict))


@functools.cache
def _type_info(cls: type[Any]) -> Any:
    return inspect.type_info(cls)
