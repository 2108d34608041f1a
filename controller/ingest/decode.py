"""Decoding MQTT messages into storable ones: the protocol's checks plus the database's limits.

``decode_message`` turns a topic and payload into ``(device_id, message)``, returns None
for an empty payload clearing a retained topic, and raises MalformedMessageError naming the
topic and the problem for everything else that does not follow the protocol.
"""

from __future__ import annotations

from controller.db.models import CODE_LEN, MODEL_LEN, VERSION_LEN
from controller.errors import MalformedMessageError
from controller.fleet.writes import Message
from protocol import (
    MESSAGE_TYPES,
    Kind,
    ProtocolError,
    Reported,
    Status,
    Telemetry,
    decode,
    parse_topic,
    validate_stream_name,
)

INGESTED_KINDS: tuple[Kind, ...] = (Kind.STATUS, Kind.TELEMETRY, Kind.REPORTED, Kind.EVENTS)
"""The topic kinds the controller subscribes to and stores."""
RETAINED_KINDS = frozenset({Kind.STATUS, Kind.REPORTED})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _fail(topic: str, why: str) -> MalformedMessageError:
    return MalformedMessageError(f"{topic}: {why}")


def _check_len(topic: str, name: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise _fail(topic, f"{name} is longer than {limit} characters")


def _check_int(topic: str, name: str, value: int | None) -> None:
    if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
        raise _fail(topic, f"{name} {value} does not fit in a signed 64-bit integer")


def _check_stream(topic: str, name: str | None) -> None:
    if name is not None:
        try:
            validate_stream_name(name)
        except ProtocolError as err:
            raise _fail(topic, str(err)) from err


def _contains_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, (list, tuple)):
        return any(_contains_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    fields = getattr(value, "__struct_fields__", None)
    if fields is not None:
        return any(_contains_nul(getattr(value, f)) for f in fields)
    return False


def _check_storable(topic: str, message: Message) -> None:
    """Limits the database enforces (lengths, 64-bit integers) checked before the write."""
    if isinstance(message, Telemetry):
        for name in ("mem_used_bytes", "disk_free_bytes", "spool_depth", "spool_dropped"):
            _check_int(topic, name, getattr(message, name))
        for s in message.streams:
            _check_stream(topic, s.name)
    elif isinstance(message, Status):
        _check_len(topic, "agent_version", message.agent_version, VERSION_LEN)
        for st in message.streams:
            _check_stream(topic, st.name)
            _check_len(topic, f"streams[{st.name}].model", st.model, MODEL_LEN)
    elif isinstance(message, Reported):
        _check_int(topic, "desired_rev", message.desired_rev)
        for name, rep in message.streams.items():
            _check_stream(topic, name)
            for key in ("active", "previous", "target"):
                _check_len(topic, f"streams[{name}].{key}", getattr(rep, key), MODEL_LEN)
    else:
        _check_len(topic, "code", message.code, CODE_LEN)
        _check_stream(topic, message.stream)
        for key, value in message.details.items():
            if isinstance(value, int) and not isinstance(value, bool):
                _check_int(topic, f"details.{key}", value)


def decode_message(topic: str, payload: bytes) -> tuple[str, Message] | None:
    """Decode one MQTT message into (device_id, message).

    Returns None for messages that are fine but carry nothing to store (an empty payload
    clearing a retained status/reported topic); raises MalformedMessageError naming the
    topic and the problem for everything else that does not follow the protocol.
    """
    try:
        parsed = parse_topic(topic)
    except ProtocolError as err:
        raise _fail(topic, str(err)) from err
    if parsed.kind not in INGESTED_KINDS:
        raise _fail(topic, f"the controller does not ingest {parsed.kind.value} messages")
    if not payload:
        if parsed.kind in RETAINED_KINDS:
            return None
        raise _fail(topic, "empty payload")
    try:
        message: Message = decode(payload, MESSAGE_TYPES[parsed.kind.value])  # type: ignore[assignment]
    except ProtocolError as err:
        raise _fail(topic, str(err)) from err
    if message.device_id != parsed.device_id:
        raise _fail(
            topic, f"payload device_id {message.device_id!r} does not match the topic's device id"
        )
    if b"\\u0000" in payload and _contains_nul(message):
        raise _fail(topic, "a string contains a NUL character")
    _check_storable(topic, message)
    return parsed.device_id, message


def topic_kind(topic: str) -> str:
    """The message kind a topic names, or ``"topic"`` when it names none (for counting)."""
    parts = topic.split("/")
    return parts[3] if len(parts) > 3 and parts[3] in MESSAGE_TYPES else "topic"
