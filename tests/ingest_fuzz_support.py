"""The oracle and the messages of the ingestion fuzz tests (tests/test_ingest_fuzz.py).

The oracle is independent of the code under test: the exported JSON Schemas (docs/protocol,
checked with ``jsonschema``), the size limits, UTF-8 without NUL or lone surrogates, the
topic's device (and stream), and a snapshot's ``jpeg`` being base64 of a JPEG (FF D8 FF).
The messages: good ones of every kind generated within the bounds from the message types
(hypothesis strategies), and hostile ones made from them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.validators import extend
from msgspec import inspect

from controller.ingest.decode import INGESTED_KINDS
from protocol import MESSAGE_TYPES, encode
from protocol import limits as L
from protocol.jsonschema import schemas

DEVICE = "cam-1"
KINDS = [k.value for k in INGESTED_KINDS]
STREAM_KINDS = ("snapshot",)
"""Kinds whose topic ends with a stream name (``.../{kind}/{stream}``)."""
RETAINED = ("status", "reported", "snapshot")
"""An empty payload on these clears a retained topic."""
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
"""Derandomized by tests/conftest.py's profile (EDGEFLEET_FUZZ_RANDOM=1 explores). The
examples of a test share its (function-scoped) database on purpose: each one checks what
it added."""

# --- the oracle --------------------------------------------------------------------------

_Strict = extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _c, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)
"""JSON Schema 2020-12 where 1.0 is not an integer (msgspec, like most typed readers)."""
VALIDATORS = {kind: _Strict(schemas()[f"{kind}.schema.json"]) for kind in KINDS}


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _bad_text(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_bad_text(v) for v in value)
    if isinstance(value, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in value.items())
    return False


def kind_of(topic: str) -> str:
    parts = topic.split("/")
    return parts[3] if len(parts) > 3 else ""


def _jpeg_ok(value: Any) -> bool:
    try:
        return base64.b64decode(value, validate=True).startswith(b"\xff\xd8\xff")
    except (binascii.Error, ValueError, TypeError):
        return False


def topic_ok(topic: str) -> bool:
    """The topic's shape: its kind, its number of levels and (per stream) the stream name."""
    parts = topic.split("/")
    kind = kind_of(topic)
    levels = 5 if kind in STREAM_KINDS else 4
    stream_ok = levels == 4 or re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", parts[-1])
    return len(parts) == levels and kind in KINDS and bool(stream_ok)


_VERDICTS: dict[bytes, bool] = {}
"""The oracle's verdicts by message digest: the fuzz runs the same (derandomized) examples
on each database, and judging them is most of its time."""


def acceptable(topic: str, payload: bytes) -> bool:
    """What the protocol says of a message on ``topic``, without the code under test."""
    key = hashlib.blake2b(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).digest()
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _VERDICTS[key] = _acceptable(topic, payload)
    return verdict


def _acceptable(topic: str, payload: bytes) -> bool:
    parts = topic.split("/")
    kind = kind_of(topic)
    if not topic_ok(topic) or not payload:
        return False
    device = parts[2]
    if len(payload) > L.MAX_MESSAGE_BYTES[kind]:
        return False
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if _bad_text(doc) or not VALIDATORS[kind].is_valid(doc):
        return False
    return (
        doc.get("device_id") == device
        and (kind not in STREAM_KINDS or doc.get("stream") == parts[4])
        and (kind != "snapshot" or _jpeg_ok(doc.get("jpeg")))
    )


def expected(topic: str, payload: bytes) -> str:
    """What ``Ingestor.handle`` must answer for a message on ``topic``."""
    if not payload and kind_of(topic) in RETAINED and topic_ok(topic):
        return "ignored"  # clears a retained topic (a topic of a bad shape is refused first)
    return "queued" if acceptable(topic, payload) else "malformed"


# --- messages within the bounds, derived from the message types ---------------------------

_CHARS = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])


_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def _word(first: str, rest: str, longest: int) -> st.SearchStrategy[str]:
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=longest - 1))


_NAME = _word(_ALNUM, _ALNUM + "._-", 64)
_VERSION = st.text(
    st.characters(exclude_categories=["Zs", "Zl", "Zp", "Cc", "Cs"], exclude_characters="@/\\"),
    min_size=1,
    max_size=64,
)
PATTERNS: dict[str, st.SearchStrategy[str]] = {
    L.ID_PATTERN: _word(_ALNUM, _ALNUM + "_-", 64),
    L.MODEL_NAME_PATTERN: _NAME,
    L.MODEL_VERSION_PATTERN: _VERSION,
    L.MODEL_REF_PATTERN: st.builds("{}@{}".format, _NAME, _VERSION),
    L.CODE_PATTERN: _word(_ALNUM, _ALNUM + "_.-", 100),
    L.SHA256_PATTERN: st.text("0123456789abcdef", min_size=64, max_size=64),
    L.BASE64_PATTERN: st.binary(min_size=1, max_size=40).map(
        lambda b: base64.b64encode(b"\xff\xd8\xff" + b).decode()  # a JPEG's first bytes
    ),
}
"""Text matching each pattern of protocol.limits (from_regex is ten times slower)."""


@functools.cache
def _struct(cls: type[Any]) -> st.SearchStrategy[Any]:
    info = inspect.type_info(cls)
    assert isinstance(info, inspect.StructType)
    fields = {
        f.name: st.just(DEVICE) if f.name == "device_id" else strategy(f.type) for f in info.fields
    }
    return st.builds(cls, **fields)


def strategy(t: Any) -> st.SearchStrategy[Any]:  # noqa: PLR0911 - one case per msgspec type
    """Values within the bounds of msgspec type ``t``. Text, lists and maps: short, or at
    their bound (a repeated character or item: drawing thousands is what makes it slow)."""
    if isinstance(t, inspect.Metadata):
        return strategy(t.type)
    if isinstance(t, inspect.StructType):
        return _struct(t.cls)
    if isinstance(t, inspect.UnionType):
        return st.one_of([strategy(m) for m in t.types])
    if isinstance(t, inspect.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, inspect.StrType):
        if t.pattern is not None:
            return PATTERNS[t.pattern]
        low: int = t.min_length or 0
        high: Any = t.max_length
        short = st.text(_CHARS, min_size=low, max_size=min(high, 20))
        return st.one_of(*[short] * 5, st.builds(lambda c: c * high, _CHARS))  # or at the bound
    if isinstance(t, (inspect.IntType, inspect.FloatType)):
        least: Any = t.ge if t.ge is not None else t.gt
        most: Any = t.le if t.le is not None else t.lt
        if isinstance(t, inspect.IntType):
            return st.integers(least, most)
        return st.floats(
            least, most, exclude_min=t.gt is not None, exclude_max=t.lt is not None, allow_nan=False
        )
    if isinstance(t, inspect.BoolType):
        return st.booleans()
    if isinstance(t, inspect.NoneType):
        return st.none()
    if isinstance(t, inspect.TupleType):
        return st.tuples(*(strategy(i) for i in t.item_types))
    if isinstance(t, inspect.ListType):
        n: int = t.max_length or 0
        item = strategy(t.item_type)
        full: st.SearchStrategy[Any] = st.builds(lambda v: [v] * n, item)
        return st.one_of(*[st.lists(item, max_size=3)] * 7, full)
    if isinstance(t, inspect.DictType):
        size: int = t.max_length or 0
        keys, values = strategy(t.key_type), strategy(t.value_type)
        whole: st.SearchStrategy[Any] = st.builds(
            lambda k, v: {f"{k[:50]}{i}": v for i in range(size)}, keys, values
        )
        return st.one_of(*[st.dictionaries(keys, values, max_size=3)] * 7, whole)
    raise AssertionError(f"no strategy for {t}")


good_messages = st.sampled_from(KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind), _struct(MESSAGE_TYPES[kind]))
)

# --- hostile messages ----------------------------------------------------------------------

BOUNDARY: st.SearchStrategy[Any] = st.sampled_from(
    [
        L.MAX_SAFE_INT,
        L.MAX_SAFE_INT + 1,
        -L.MAX_SAFE_INT,
        -L.MAX_SAFE_INT - 1,
        2**63 - 1,
        2**63,
        -(2**63),
        -(2**63) - 1,
        2**64,
        1e300,
        -1e300,
        -0.0,
        0.0,
        1.0,
        L.MAX_TS,
        L.MAX_TS + 1,
        "nan",
        "NaN",
        "Infinity",
        "",
        None,
        True,
        [],
        {},
        "x" * 3000,
        "Cam 1",
        "a\x00b",
        "\ud800",
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
DEEP = b"[" * 50_000 + b"]" * 50_000


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a decoded JSON document (the document itself excluded)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*prefix, i))
    return out


def set_path(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Replace the value at ``path`` (from :func:`json_paths`) inside ``doc``."""
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    kind, message = draw(good_messages)
    doc = msgspec.to_builtins(message)
    if kind == "snapshot" and draw(st.booleans()):  # valid base64, but of what?
        doc["jpeg"] = base64.b64encode(draw(st.binary(min_size=3, max_size=40))).decode()
    for _ in range(draw(st.integers(0, 3))):
        paths = json_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["boundary", "boundary", "json", "delete", "add"]))
        if action == "boundary":
            set_path(doc, path, draw(BOUNDARY))
        elif action == "json":
            set_path(doc, path, draw(json_values))
        elif action == "delete" and len(path) == 1:
            doc.pop(path[0], None)
        else:
            doc[draw(st.text(max_size=8))] = draw(json_values)
    ascii_only = draw(st.booleans())
    payload = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    corrupt = draw(
        st.sampled_from(["none", "none", "none", "utf8", "deep", "oversize", "nan", "truncate"])
    )
    if corrupt == "utf8":
        payload = payload.replace(b'"', b'"\xff\xfe', 1)
    elif corrupt == "deep":
        payload = payload[:-1] + b',"deep":' + DEEP + b"}"
    elif corrupt == "oversize":
        payload = payload[:-1] + b',"pad":"' + b"p" * L.MAX_MESSAGE_BYTES[kind] + b'"}'
    elif corrupt == "nan":
        payload = payload.replace(b"1.0", b"NaN", 1).replace(b"0.0", b"-Infinity", 1)
    elif corrupt == "truncate":
        payload = payload[: draw(st.integers(0, len(payload)))]
    topic_kind = draw(st.sampled_from([kind, kind, kind, *KINDS]))
    device = draw(st.sampled_from([DEVICE, DEVICE, DEVICE, "cam-2"]))
    stream = getattr(message, "stream", None) or "front"
    if topic_kind in STREAM_KINDS:
        topic_kind += "/" + draw(st.sampled_from([stream, stream, stream, "front", "Bad"]))
    return f"edgefleet/v1/{device}/{topic_kind}", payload


def good(kind_message: tuple[str, Any]) -> tuple[str, bytes]:
    kind, message = kind_message
    level = f"{kind}/{message.stream}" if kind in STREAM_KINDS else kind
    return f"edgefleet/v1/{DEVICE}/{level}", encode(message)


@functools.cache
def burst() -> list[tuple[str, bytes]]:
    """Hostile messages of the sizes outside testers sent: a 10 MB event, telemetry naming
    20,000 streams, JSON nested 50,000 deep, 100 kB that is not UTF-8."""
    big_event = msgspec.json.encode(
        {
            "schema": 1,
            "device_id": DEVICE,
            "ts": 1,
            "code": "x",
            "level": "info",
            "message": "x" * 10_000_000,
        }
    )
    stream = {
        "name": "s",
        "source_state": "running",
        "fps": 1,
        "frames_captured": 1,
        "frames_processed": 1,
        "frames_dropped": 0,
        "infer_ms_p50": None,
        "infer_ms_p95": None,
        "latency_ms_p50": None,
        "latency_ms_p95": None,
    }
    many_streams = msgspec.json.encode(
        {
            "schema": 1,
            "device_id": DEVICE,
            "ts": 1,
            "interval_s": 1,
            "cpu_percent": 1,
            "mem_percent": 1,
            "mem_used_bytes": 1,
            "temp_c": None,
            "disk_percent": 1,
            "disk_free_bytes": 1,
            "spool_depth": 0,
            "spool_dropped": 0,
            "streams": [dict(stream, name=f"s{i}") for i in range(20_000)],
        }
    )
    return [
        ("edgefleet/v1/cam-1/events", big_event),
        ("edgefleet/v1/cam-1/telemetry", many_streams),
        ("edgefleet/v1/cam-1/telemetry", b'{"schema":1,"x":' + DEEP + b"}"),
        ("edgefleet/v1/cam-1/status", b"\xff" * 100_000),
    ]
