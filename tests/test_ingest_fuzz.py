"""Fuzzing the controller's MQTT ingestion against the protocol's bounds (hypothesis).

Every kind the controller subscribes to, through the real decode + enqueue
(``Ingestor.handle``) and write path into a real SQLite file, and once through a real
Mosquitto to the real subscriber and writer thread. The oracle is independent of the code
under test: the exported JSON Schemas (docs/protocol, checked with ``jsonschema``), the
size limits, UTF-8 without NUL or lone surrogates, the topic's device (and stream), and a
snapshot's ``jpeg`` being base64 of a JPEG (FF D8 FF). Asserted: nothing
raises, a message is stored exactly when the oracle accepts it (so good input generated
within the bounds IS stored), nothing outside the bounds reaches the database, and a burst
of hostile messages does not grow the process's memory.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gc
import json
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import msgspec
import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.validators import extend
from msgspec import inspect
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from controller.db.session import Database
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from protocol import MESSAGE_TYPES, encode
from protocol import limits as L
from protocol.jsonschema import schemas
from tests.broker import Mosquitto
from tests.waiting import wait_for

DEVICE = "cam-1"
KINDS = [k.value for k in INGESTED_KINDS]
STREAM_KINDS = ("snapshot",)
"""Kinds whose topic ends with a stream name (``.../{kind}/{stream}``)."""
RETAINED = ("status", "reported", "snapshot")
"""An empty payload on these clears a retained topic."""
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Derandomized by tests/conftest.py's profile (EDGEFLEET_FUZZ_RANDOM=1 explores)."""

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


def acceptable(topic: str, payload: bytes) -> bool:
    """What the protocol says of a message on ``topic``, without the code under test."""
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


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
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
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["boundary", "boundary", "json", "delete", "add"]))
        if action == "boundary":
            _set(doc, path, draw(BOUNDARY))
        elif action == "json":
            _set(doc, path, draw(json_values))
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


# --- the database ------------------------------------------------------------------------

TABLES = ("devices", "device_streams", "telemetry", "events")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = Database.from_url(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'c.db'}")
    database.upgrade()
    yield database
    database.dispose()


def counts(db: Database) -> dict[str, int]:
    with db.connect() as conn:
        return {
            t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES
        }


def assert_stored_within_bounds(db: Database) -> None:
    """What the database holds is inside the protocol's bounds, whatever was sent."""
    with db.connect() as conn:
        t = conn.execute(
            text(
                "SELECT min(ts), max(ts), min(spool_depth), max(spool_depth), max(mem_used_bytes),"
                " min(cpu_percent), max(cpu_percent), max(length(streams)) FROM telemetry"
            )
        ).one()
        e = conn.execute(
            text("SELECT min(ts), max(ts), max(length(message)), max(length(code)) FROM events")
        ).one()
        d = conn.execute(
            text("SELECT min(desired_rev), max(desired_rev), max(status_ts) FROM devices")
        ).one()
        jpegs = [bytes(r[0]) for r in conn.execute(text("SELECT jpeg FROM device_snapshots"))]
    assert all(j.startswith(b"\xff\xd8\xff") for j in jpegs), "only JPEGs are stored"
    if t[0] is not None:
        assert t[0] >= L.MIN_TS and t[1] <= L.MAX_TS
        assert t[2] >= 0 and t[3] <= L.MAX_SAFE_INT and t[4] <= L.MAX_SAFE_INT
        assert t[5] >= 0 and t[6] <= 100
        assert t[7] <= L.MAX_MESSAGE_BYTES["telemetry"]
    if e[0] is not None:
        assert e[0] >= L.MIN_TS and e[1] <= L.MAX_TS
        assert e[2] <= L.MAX_TEXT_LEN and e[3] <= L.MAX_CODE_LEN
    if d[0] is not None:
        assert d[0] >= 0 and d[1] <= L.MAX_SAFE_INT
    if d[2] is not None:
        assert d[2] <= L.MAX_TS


def expected(topic: str, payload: bytes) -> str:
    if not payload and kind_of(topic) in RETAINED and topic_ok(topic):
        return "ignored"  # clears a retained topic (a topic of a bad shape is refused first)
    return "queued" if acceptable(topic, payload) else "malformed"


def ingest(db: Database, batch: list[tuple[str, bytes]]) -> None:
    before = counts(db)
    ingestor = Ingestor(db=db, batch_size=4)
    outcomes = [ingestor.handle(topic, payload) for topic, payload in batch]  # never raises
    for (topic, payload), outcome in zip(batch, outcomes, strict=True):
        assert outcome == expected(topic, payload), (topic, payload[:300])
        hypothesis.event(f"{kind_of(topic)}: {outcome}")
    ingestor.write_pending()
    snap = ingestor.snapshot()
    assert snap.rejected == 0, f"decoded but refused by the database: {snap.malformed_by_kind}"
    assert snap.stored == outcomes.count("queued")
    after = counts(db)
    stored = [kind_of(t) for (t, _), o in zip(batch, outcomes, strict=True) if o == "queued"]
    assert after["telemetry"] - before["telemetry"] == stored.count("telemetry")
    assert after["events"] - before["events"] == stored.count("events")
    assert_stored_within_bounds(db)


@settings(FUZZ, max_examples=250)
@given(batch=st.lists(hostile(), min_size=1, max_size=6))
def test_hostile_messages_are_stored_exactly_when_within_the_bounds(
    db: Database, batch: list[tuple[str, bytes]]
) -> None:
    ingest(db, batch)


@settings(FUZZ, max_examples=150)
@given(batch=st.lists(good_messages.map(good), min_size=1, max_size=4))
def test_good_messages_of_every_kind_generated_within_the_bounds_are_stored(
    db: Database, batch: list[tuple[str, bytes]]
) -> None:
    for topic, payload in batch:
        kind = kind_of(topic)
        if len(payload) <= L.MAX_MESSAGE_BYTES[kind]:  # non-ASCII text at its bounds may not be
            assert acceptable(topic, payload), "the oracle accepts what the types generate"
    ingest(db, batch)


def test_a_burst_of_hostile_messages_does_not_grow_memory(db: Database) -> None:
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
    burst = [
        ("edgefleet/v1/cam-1/events", big_event),
        ("edgefleet/v1/cam-1/telemetry", many_streams),
        ("edgefleet/v1/cam-1/telemetry", b'{"schema":1,"x":' + DEEP + b"}"),
        ("edgefleet/v1/cam-1/status", b"\xff" * 100_000),
    ]
    ingestor = Ingestor(db=db)
    process = psutil.Process()
    for _ in range(3):  # warm-up: lazily built decoders, logging
        for topic, payload in burst:
            ingestor.handle(topic, payload)
    gc.collect()
    rss = process.memory_info().rss
    for _ in range(60):
        for topic, payload in burst:
            assert ingestor.handle(topic, payload) == "malformed"
    assert ingestor.queue_depth == 0
    gc.collect()
    grown = process.memory_info().rss - rss
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 240 messages"


# --- through a real broker -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, db: Database
) -> Iterator[tuple[Ingestor, mqtt.Client]]:
    """A Mosquitto with no packet limit of its own, the controller's subscriber and writer
    thread on it, and a publishing client."""
    with Mosquitto(tmp_path_factory.mktemp("broker")) as broker:
        ingestor = Ingestor(db=db, flush_interval_s=0.02)
        ingestor.start()
        sub = MqttSubscriber(
            settings=MqttSettings(url=broker.url, client_id="ctl-fuzz"),
            kinds=INGESTED_KINDS,
            on_message=ingestor.handle,
        )
        sub.start()
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            yield ingestor, client
        finally:
            client.loop_stop()
            client.disconnect()
            sub.stop()
            ingestor.stop()


@settings(FUZZ, max_examples=8)
@given(batch=st.lists(st.one_of(hostile(), good_messages.map(good)), min_size=1, max_size=8))
def test_through_a_real_broker_the_ingestion_loop_stores_exactly_the_acceptable_messages(
    live: tuple[Ingestor, mqtt.Client], db: Database, batch: list[tuple[str, bytes]]
) -> None:
    ingestor, client = live
    before, received = counts(db), ingestor.stats.received
    for topic, payload in batch:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    wait_for(
        lambda: ingestor.stats.received >= received + len(batch),
        timeout=15,
        what="the controller to receive the batch",
    )
    assert ingestor.wait_idle(15)
    assert ingestor.stats.rejected == 0
    after = counts(db)
    ok = [kind_of(t) for t, p in batch if acceptable(t, p)]
    assert after["telemetry"] - before["telemetry"] == ok.count("telemetry")
    assert after["events"] - before["events"] == ok.count("events")
    assert_stored_within_bounds(db)


@pytest.mark.parametrize(
    ("topic", "outcome"),
    [
        ("edgefleet/v1/cam-1/snapshot/front", "ignored"),  # clears the retained snapshot
        ("edgefleet/v1/cam-1/status", "ignored"),
        ("edgefleet/v1/cam-1/snapshot/Bad", "malformed"),  # found by the fuzzer: bad topic first
        ("edgefleet/v1/cam-1/snapshot", "malformed"),
        ("edgefleet/v1/cam-1/telemetry", "malformed"),  # not retained: empty is just bad
    ],
)
def test_an_empty_payload_clears_a_retained_topic_only_when_the_topic_is_valid(
    db: Database, topic: str, outcome: str
) -> None:
    assert expected(topic, b"") == outcome
    assert Ingestor(db=db, batch_size=4).handle(topic, b"") == outcome
