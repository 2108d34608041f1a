"""MQTT topics of the edgefleet protocol: builders, parser and subscription filters.

Every topic lives under ``edgefleet/v1/{device_id}/...``. Topic strings are built only
here, so the agent, the controller and any third-party subscriber agree on them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.limits import NAME_BODY

TOPIC_ROOT = "edgefleet/v1"

_DEVICE_ID = re.compile(NAME_BODY)
_STREAM_NAME = _DEVICE_ID


class Kind(str, enum.Enum):
    """The topic kinds below a device: the level after the device id (``detections`` and
    ``snapshot`` add the stream)."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    DETECTIONS = "detections"
    DESIRED = "desired"
    REPORTED = "reported"
    EVENTS = "events"
    SNAPSHOT = "snapshot"


STREAM_KINDS = frozenset({Kind.DETECTIONS, Kind.SNAPSHOT})
"""Kinds whose topic ends with a stream name."""
JPEG_LEVEL = "jpeg"
"""Last level of a snapshot's raw-JPEG topic (for Home Assistant's MQTT camera)."""


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if valid, else raise ProtocolError saying what is allowed."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def validate_stream_name(stream: str) -> str:
    """Return ``stream`` if valid, else raise ProtocolError saying what is allowed."""
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise ProtocolError(
            f"invalid stream name {stream!r}: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return stream


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed edgefleet topic. ``stream`` is set only for detections and snapshots."""

    device_id: str
    kind: Kind
    stream: str | None = None

    def __str__(self) -> str:
        base = f"{TOPIC_ROOT}/{self.device_id}/{self.kind.value}"
        return f"{base}/{self.stream}" if self.stream is not None else base


def topic(device_id: str, kind: Kind, stream: str | None = None) -> str:
    """Build a topic string, validating the device id and stream name."""
    validate_device_id(device_id)
    if kind in STREAM_KINDS:
        if stream is None:
            raise ProtocolError(f"a {kind.value} topic needs a stream name")
        validate_stream_name(stream)
    elif stream is not None:
        raise ProtocolError(
            f"only detections and snapshot topics carry a stream name, not {kind.value}"
        )
    return str(Topic(device_id, kind, stream))


def status_topic(device_id: str) -> str:
    return topic(device_id, Kind.STATUS)


def telemetry_topic(device_id: str) -> str:
    return topic(device_id, Kind.TELEMETRY)


def detections_topic(device_id: str, stream: str) -> str:
    return topic(device_id, Kind.DETECTIONS, stream)


def snapshot_topic(device_id: str, stream: str) -> str:
    """The retained JSON snapshot (:class:`protocol.messages.Snapshot`) of a stream."""
    return topic(device_id, Kind.SNAPSHOT, stream)


def snapshot_jpeg_topic(device_id: str, stream: str) -> str:
    """The retained raw JPEG of a stream's snapshot (Home Assistant's MQTT camera reads
    image bytes); published only with ``[homeassistant] enabled``."""
    return f"{snapshot_topic(device_id, stream)}/{JPEG_LEVEL}"


def desired_topic(device_id: str) -> str:
    return topic(device_id, Kind.DESIRED)


def reported_topic(device_id: str) -> str:
    return topic(device_id, Kind.REPORTED)


def events_topic(device_id: str) -> str:
    return topic(device_id, Kind.EVENTS)


def parse_topic(value: str) -> Topic:
    """Parse a topic string into a Topic, or raise ProtocolError naming the bad part."""
    parts = value.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(f"topic {value!r} is not under {TOPIC_ROOT}/{{device_id}}/...")
    device_id = validate_device_id(parts[2])
    try:
        kind = Kind(parts[3])
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise ProtocolError(
            f"topic {value!r}: unknown kind {parts[3]!r} (known: {known})"
        ) from None
    if kind in STREAM_KINDS:
        if len(parts) != 5:
            jpeg = (
                f" ({kind.value}/{{stream}}/{JPEG_LEVEL} is the raw image for Home Assistant, "
                "not a message)"
                if kind is Kind.SNAPSHOT and len(parts) == 6 and parts[5] == JPEG_LEVEL
                else ""
            )
            raise ProtocolError(
                f"topic {value!r}: {kind.value} topics end with /{kind.value}/{{stream}}{jpeg}"
            )
        return Topic(device_id, kind, validate_stream_name(parts[4]))
    if len(parts) != 4:
        raise ProtocolError(f"topic {value!r}: {kind.value} topics have no further levels")
    return Topic(device_id, kind)


def subscription(kind: Kind, *, device_id: str = "+", shared_group: str | None = None) -> str:
    """A subscription filter for ``kind`` of one device (or all with ``+``).

    ``shared_group`` turns it into an MQTT v5 shared subscription (``$share/group/...``)
    so controller replicas split the load.
    """
    if device_id != "+":
        validate_device_id(device_id)
    filt = f"{TOPIC_ROOT}/{device_id}/{kind.value}"
    if kind in STREAM_KINDS:
        filt += "/+"
    if shared_group is not None:
        filt = f"$share/{shared_group}/{filt}"
    return filt
