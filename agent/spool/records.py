"""One spooled message: :class:`SpoolRecord` and its on-disk framing.

A record is ``u32 body length | u32 CRC32(length bytes + body) | body`` with
``body = u8 qos, u16 topic length, topic, payload``. Its length is what ``max_bytes`` counts.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

REC = struct.Struct("<II")
"""Record framing: body length, crc32(length bytes + body)."""
BODY = struct.Struct("<BH")
"""Start of a body: qos, topic length."""
MAX_PAYLOAD = 268_435_455
"""The MQTT limit."""
FIX = (
    "move the spool folder away to keep its messages for inspection, or delete it to start "
    "with an empty spool (its unsent messages are then lost)"
)
"""What the operator can do about a spool folder that cannot be opened."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled message. ``index`` increases in FIFO order (valid for this Spool object)."""

    topic: str
    payload: bytes
    qos: int
    index: int


def checked_topic(topic: str, payload: bytes, qos: int) -> bytes:
    """The UTF-8 topic of a record MQTT can carry; ValueError otherwise."""
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    t = topic.encode("utf-8")
    if len(t) > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload larger than the MQTT limit of 256 MiB")
    return t


def encode_record(topic: str, payload: bytes, qos: int) -> bytes:
    """The on-disk bytes of one record (framing included)."""
    t = checked_topic(topic, payload, qos)
    body = BODY.pack(qos, len(t)) + t + payload
    length = struct.pack("<I", len(body))
    return length + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body


def decode_body(body: bytes, index: int) -> SpoolRecord:
    qos, tlen = BODY.unpack_from(body)
    start = BODY.size
    topic = body[start : start + tlen].decode("utf-8")
    return SpoolRecord(topic=topic, payload=body[start + tlen :], qos=qos, index=index)
