"""Bounds of the edgefleet protocol, declared once.

The message types in :mod:`protocol.messages` carry these as JSON Schema constraints (the
``Annotated`` types at the end of this module), the agent checks what it emits against them
(:func:`protocol.checked.encode_checked`), the controller refuses what falls outside them,
and the shipped broker configurations cap a message at :data:`BROKER_MESSAGE_SIZE_LIMIT`.

Every bound is wide enough for what a healthy device sends (a clock not yet synced says
1970: that is accepted) and narrow enough that one message cannot make a consumer store
megabytes, overflow a 64-bit column or lose precision in a JavaScript reader.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from msgspec import Meta

# --- numbers ----------------------------------------------------------------------------

MAX_SAFE_INT: Final = 2**53 - 1
"""Largest integer every JSON consumer reads exactly (JavaScript's Number.MAX_SAFE_INTEGER):
the bound of sequence numbers, revs and counters."""

MIN_TS: Final = 0.0
"""Earliest timestamp (the epoch): a device whose clock is not synced yet says 1970."""
MAX_TS: Final = 4_102_444_800.0
"""Latest timestamp: 2100-01-01T00:00:00Z."""
MAX_DURATION_S: Final = 31_536_000.0
"""Longest duration in seconds (365 days)."""
MAX_MS: Final = 86_400_000.0
"""Longest inference or end-to-end time in milliseconds (a day)."""
MAX_FPS: Final = 10_000.0
"""Highest frame rate a stream can report."""
MIN_TEMP_C: Final = -100.0
MAX_TEMP_C: Final = 300.0
"""Plausible temperatures; a sensor reading outside is broken (the agent reports none)."""
MAX_PSI: Final = 1000.0
"""Largest drift PSI (the agent's smoothing keeps it below ~20)."""
MAX_RATIO: Final = 1_000_000.0
"""Largest latency ratio of the health gate."""
MAX_FRAME_SIDE: Final = 65_535
"""Largest frame width or height in pixels."""

# --- sizes of lists and maps ------------------------------------------------------------

MAX_STREAMS: Final = 64
"""Camera streams per device (status, telemetry, reported, desired)."""
MAX_DETECTIONS: Final = 1000
"""Detections per frame (the YOLO decoder keeps at most 300)."""
MAX_INSTALLED: Final = 8
"""Installed models listed per stream in the reported state (the agent keeps three)."""
MAX_FACTS: Final = 32
"""Entries of ``status.facts``."""
MAX_DETAILS: Final = 32
"""Entries of ``events.details``."""
MAX_SNAPSHOT_DETECTIONS: Final = 50
"""Detections listed with a snapshot (the best ones; the JPEG shows the same)."""
MAX_SNAPSHOT_JPEG_BYTES: Final = 180_000
"""Largest JPEG of a snapshot (the agent's ``[snapshots] max_bytes`` caps it lower)."""
MAX_SNAPSHOT_JPEG_B64: Final = 4 * ((MAX_SNAPSHOT_JPEG_BYTES + 2) // 3)
"""Its length in base64 characters (240,000)."""

# --- string lengths ---------------------------------------------------------------------

MAX_ID_LEN: Final = 64
"""Device ids, stream names, model names and versions, fact and detail keys."""
MAX_LABEL_LEN: Final = 100
MAX_CODE_LEN: Final = 100
MAX_ERROR_LEN: Final = 500
"""``status.streams[].error``."""
MAX_TEXT_LEN: Final = 2000
"""``events.message``."""
MAX_REASON_LEN: Final = 200
MAX_SUMMARY_LEN: Final = 1000
"""``reported.streams[].gate.summary``."""
MAX_VALUE_LEN: Final = 256
"""String values of ``status.facts`` and ``events.details``."""
MAX_URL_LEN: Final = 2048
MAX_SIGNATURE_LEN: Final = 256

# --- patterns ---------------------------------------------------------------------------
# Anchored with ``^…$(?!\n)``: msgspec and Python's jsonschema match with re.search, where a
# plain ``$`` also matches before a final newline; the lookahead keeps ECMA readers exact too.

NAME_BODY: Final = r"[a-z0-9][a-z0-9_-]{0,63}"
"""A device id or stream name, unanchored (the topic rules and the HTTP API build on it)."""
MODEL_NAME_BODY: Final = r"[a-z0-9][a-z0-9._-]{0,63}"
_MODEL_VERSION = r"[^\s@/\\\x00-\x1f\x7f]{1,64}"


def _whole(body: str) -> str:
    return f"^{body}$(?!\\n)"


ID_PATTERN: Final = _whole(NAME_BODY)
"""Device ids and stream names (the topic levels)."""
MODEL_NAME_PATTERN: Final = _whole(MODEL_NAME_BODY)
MODEL_VERSION_PATTERN: Final = _whole(_MODEL_VERSION)
"""1-64 characters, no whitespace, control character, ``@``, ``/`` or ``\\``."""
MODEL_REF_PATTERN: Final = _whole(f"{MODEL_NAME_BODY}@{_MODEL_VERSION}")
CODE_PATTERN: Final = _whole(r"[a-z0-9][a-z0-9_.-]{0,99}")
SHA256_PATTERN: Final = _whole(r"[0-9a-f]{64}")
BASE64_PATTERN: Final = _whole(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

RULES: Final[dict[str, str]] = {
    ID_PATTERN: "1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit",
    MODEL_NAME_PATTERN: "a model name: 1-64 of a-z, 0-9, '.', '_' or '-'",
    MODEL_VERSION_PATTERN: "a model version: 1-64 characters, no space, '@', '/' or '\\'",
    MODEL_REF_PATTERN: "name@version (a model name, '@', a model version)",
    CODE_PATTERN: "a code of 1-100 of a-z, 0-9, '.', '_' or '-', e.g. source.failed",
    SHA256_PATTERN: "64 lowercase hex digits",
    BASE64_PATTERN: "standard base64 (A-Z, a-z, 0-9, '+', '/', '=' padding; no line breaks)",
}
"""Each pattern in words, for error messages."""
_REGEX_IN_ERROR = re.compile(r"matching regex '((?:[^'\\]|\\.)*)'")


def describe(error: str) -> str:
    """A msgspec validation error with each pattern replaced by its rule in words."""

    def rule(match: re.Match[str]) -> str:
        regex = match.group(1).replace("\\\\", "\\")
        return f"that is {RULES[regex]}" if regex in RULES else match.group(0)

    return _REGEX_IN_ERROR.sub(rule, error)


# --- sizes of whole messages ------------------------------------------------------------

MAX_MESSAGE_BYTES: Final[dict[str, int]] = {
    "status": 128 * 1024,
    "telemetry": 64 * 1024,
    "detections": 256 * 1024,
    "desired": 256 * 1024,
    "reported": 256 * 1024,
    "events": 32 * 1024,
    "snapshot": 256 * 1024,
}
"""Largest payload per topic kind (``detections`` without its stream). Each holds a message
whose every field is at its bound with ASCII text (tests/test_protocol_bounds.py: status
59 KB, telemetry 32 KB, detections 249 KB, desired 179 KB, reported 228 KB, events 13 KB,
snapshot 253 KB);
status and events have room for error text that is not ASCII (up to 4 bytes a character)."""

BROKER_MESSAGE_SIZE_LIMIT: Final = max(MAX_MESSAGE_BYTES.values())
"""The largest payload of any edgefleet message (bytes). The shipped broker configurations
set ``max_packet_size`` to this plus room for the MQTT header and topic
(``controller.broker.MAX_PACKET_SIZE``), so the broker drops anything larger before any
client sees it."""

# --- the types the messages use ---------------------------------------------------------

Id = Annotated[
    str, Meta(pattern=ID_PATTERN, description="1-64 of a-z, 0-9, '_', '-'; starts a-z/0-9")
]
ModelName = Annotated[str, Meta(pattern=MODEL_NAME_PATTERN, description="model name")]
ModelVersion = Annotated[str, Meta(pattern=MODEL_VERSION_PATTERN, description="model version")]
ModelRefText = Annotated[str, Meta(pattern=MODEL_REF_PATTERN, description="name@version")]
Code = Annotated[str, Meta(pattern=CODE_PATTERN, description="machine-readable, e.g. a.b_c")]
Sha256 = Annotated[str, Meta(pattern=SHA256_PATTERN, description="sha256, lowercase hex")]
Key = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
AgentVersion = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
RolloutId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
Label = Annotated[str, Meta(max_length=MAX_LABEL_LEN)]
ErrorText = Annotated[str, Meta(max_length=MAX_ERROR_LEN)]
MessageText = Annotated[str, Meta(max_length=MAX_TEXT_LEN)]
ReasonText = Annotated[str, Meta(max_length=MAX_REASON_LEN)]
SummaryText = Annotated[str, Meta(max_length=MAX_SUMMARY_LEN)]
Url = Annotated[str, Meta(min_length=1, max_length=MAX_URL_LEN)]
Signature = Annotated[str, Meta(max_length=MAX_SIGNATURE_LEN)]
JpegBase64 = Annotated[
    str,
    Meta(
        min_length=4,
        max_length=MAX_SNAPSHOT_JPEG_B64,
        pattern=BASE64_PATTERN,
        description="a JPEG image, standard base64",
    ),
]

Timestamp = Annotated[
    float, Meta(ge=MIN_TS, le=MAX_TS, description="UNIX epoch seconds, 1970 to 2100")
]
Duration = Annotated[float, Meta(ge=0.0, le=MAX_DURATION_S, description="seconds")]
Millis = Annotated[float, Meta(ge=0.0, le=MAX_MS, description="milliseconds")]
Percent = Annotated[float, Meta(ge=0.0, le=100.0, description="percent")]
Unit = Annotated[float, Meta(ge=0.0, le=1.0, description="0 to 1")]
Fps = Annotated[float, Meta(ge=0.0, le=MAX_FPS, description="frames per second")]
TempC = Annotated[float, Meta(ge=MIN_TEMP_C, le=MAX_TEMP_C, description="degrees Celsius")]
Psi = Annotated[float, Meta(ge=0.0, le=MAX_PSI, description="population stability index")]
Ratio = Annotated[float, Meta(ge=0.0, le=MAX_RATIO, description="ratio")]
Shift = Annotated[float, Meta(ge=-1.0, le=1.0)]
Count = Annotated[int, Meta(ge=0, le=MAX_SAFE_INT, description="0 to 2^53-1")]
Side = Annotated[int, Meta(ge=1, le=MAX_FRAME_SIDE, description="pixels")]
SafeInt = Annotated[int, Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
SafeFloat = Annotated[float, Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
Value = Annotated[str, Meta(max_length=MAX_VALUE_LEN)] | SafeInt | SafeFloat | bool | None
"""A fact or detail value: short text, a number within +-2^53, a flag or null."""
