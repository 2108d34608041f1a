"""Decoding MQTT messages into storable ones: the protocol's checks and bounds.

``decode_message`` turns a topic and payload into ``(device_id, message)``, returns None
for an empty payload clearing a retained topic, and raises RejectedMessage naming the
topic, the device, the field and why (``reason``, a label of
``edgefleet_ingest_rejected_total``) for everything else that does not follow the protocol.

The order is cheapest first: the topic, then the payload's size (before a byte is decoded),
then strict decoding within the bounds of ``protocol.limits``, then the payload against the
topic (``protocol.check_payload``). The bounds also keep every value within what the
database stores (lengths, 64-bit integers; ``test_protocol_bounds_fit_the_database``).
"""

from __future__ import annotations

from controller.errors import MalformedMessageError
from controller.fleet.snapshots import jpeg_bytes
from controller.fleet.writes import Message
from protocol import (
    MESSAGE_TYPES,
    InvalidMessage,
    Kind,
    ProtocolError,
    Snapshot,
    check_payload,
    parse_topic,
)

INGESTED_KINDS: tuple[Kind, ...] = (
    Kind.STATUS,
    Kind.TELEMETRY,
    Kind.REPORTED,
    Kind.EVENTS,
    Kind.SNAPSHOT,
)
"""The topic kinds the controller subscribes to and stores."""
RETAINED_KINDS = frozenset({Kind.STATUS, Kind.REPORTED, Kind.SNAPSHOT})
UNKNOWN_DEVICE = "?"
"""The device of a message whose topic names none."""


class RejectedMessage(MalformedMessageError):
    """A message the controller refuses: ``kind`` (topic kind, or ``topic``), ``reason``
    (``protocol.checked.Reason``, ``topic`` or ``empty``), ``field`` (JSON path, ``payload``
    or ``topic``) and ``device_id`` (the topic's, or ``?``)."""

    def __init__(self, topic: str, *, kind: str, reason: str, field: str, why: str) -> None:
        super().__init__(f"{_short(topic)}: {why}")
        self.topic = topic
        self.kind = kind
        self.reason = reason
        self.field = field
        self.device_id = topic_device(topic)


def decode_message(topic: str, payload: bytes) -> tuple[str, Message] | None:
    """Decode one MQTT message into (device_id, message).

    Returns None for messages that are fine but carry nothing to store (an empty payload
    clearing a retained status/reported topic); raises RejectedMessage naming the topic,
    the field and the problem for everything else that does not follow the protocol.
    """
    kind = topic_kind(topic)
    try:
        parsed = parse_topic(topic)
    except ProtocolError as err:
        raise RejectedMessage(
            topic, kind=kind, reason="topic", field="topic", why=str(err)
        ) from err
    if parsed.kind not in INGESTED_KINDS:
        raise RejectedMessage(
            topic,
            kind=kind,
            reason="topic",
            field="topic",
            why=f"the controller does not ingest {parsed.kind.value} messages",
        )
    if not payload:
        if parsed.kind in RETAINED_KINDS:
            return None
        raise RejectedMessage(
            topic, kind=kind, reason="empty", field="payload", why="empty payload"
        )
    try:
        message: Message = check_payload(
            kind, payload, device_id=parsed.device_id, stream=parsed.stream
        )
    except InvalidMessage as err:
        raise RejectedMessage(
            topic, kind=kind, reason=err.reason, field=err.field, why=str(err)
        ) from err
    if isinstance(message, Snapshot) and jpeg_bytes(message) is None:
        raise RejectedMessage(
            topic,
            kind=kind,
            reason="not_jpeg",
            field="jpeg",
            why="invalid Snapshot message: `jpeg` is not base64 of a JPEG file (it must start "
            "with the JPEG start-of-image marker FF D8 FF)",
        )
    return parsed.device_id, message


def topic_kind(topic: str) -> str:
    """The message kind a topic names, or ``"topic"`` when it names none (for counting)."""
    parts = topic.split("/", 4)
    return parts[3] if len(parts) > 3 and parts[3] in MESSAGE_TYPES else "topic"


def topic_device(topic: str) -> str:
    """The device id a topic names (``?`` when it is not an edgefleet topic), for logging."""
    parts = topic.split("/", 3)
    if len(parts) > 2 and parts[2]:
        return _short(parts[2], 64)
    return UNKNOWN_DEVICE


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
