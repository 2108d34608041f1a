"""Fuzzing the controller's MQTT ingestion against the protocol's bounds (hypothesis).

Every kind the controller subscribes to, through the real decode + enqueue
(``Ingestor.handle``) and write path into a real SQLite file, and once through a real
Mosquitto to the real subscriber and writer thread. The oracle (independent of the code
under test) and the good and hostile messages are tests/ingest_fuzz_support.py. Asserted:
nothing raises, a message is stored exactly when the oracle accepts it (so good input
generated within the bounds IS stored), nothing outside the bounds reaches the database,
and a burst of hostile messages does not grow the process's memory.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import hypothesis
import msgspec
import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from controller.db.session import Database
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from protocol import limits as L
from tests.broker import Mosquitto
from tests.ingest_fuzz_support import (
    DEEP,
    DEVICE,
    FUZZ,
    acceptable,
    expected,
    good,
    good_messages,
    hostile,
    kind_of,
)
from tests.waiting import wait_for

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
