"""Fuzzing the controller's MQTT ingestion against the protocol's bounds (hypothesis).

Every kind the controller subscribes to, through the real decode + enqueue
(``Ingestor.handle``) and write path into a real database (SQLite and PostgreSQL: the
fixtures of tests/controller/conftest.py), and through a real Mosquitto to the real
subscriber and writer thread. The oracle (independent of the code under test) and the good
and hostile messages are tests/ingest_fuzz_support.py. Asserted: nothing raises, a message
is stored exactly when the oracle accepts it (so good input generated within the bounds IS
stored), nothing outside the bounds reaches the database, and neither a burst of hostile
messages nor the whole module grows the process's memory. The counts (examples and
messages per test and database, the process's RSS before and after the module) are
printed (``pytest -s``) and written to ``fuzz-report.txt`` in the module's tmp dir.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
from collections import Counter
from collections.abc import Iterable, Iterator

import hypothesis
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
from tests.controller.conftest import (  # noqa: F401 - fixtures: SQLite, PostgreSQL (own schema)
    database,
    db_url,
    pg_enabled,
    pg_url,
)
from tests.ingest_fuzz_support import (
    FUZZ,
    acceptable,
    burst,
    expected,
    good,
    good_messages,
    hostile,
    kind_of,
)
from tests.waiting import wait_for

# --- what ran, and the process's memory over the whole module ------------------------------

MODULE_RSS_GROWTH_MAX = 48 * 2**20
"""What the whole module may add to the process's RSS after the warm-up. Measured: 24 to
33 MiB (x86-64, glibc), what hypothesis's engine and Python's allocator keep after the
first 250-example run (a second identical run, on the other database, adds nothing). The
module sends the controller over 16 times this (asserted: 0.85 GiB per database), so keeping
more than a few percent of what it is sent fails this."""
EXAMPLES: Counter[str] = Counter()
"""Cases run per ``test on dialect``, counted in the test bodies: hypothesis examples (the
burst test: its rounds)."""
OUTCOMES: dict[str, Counter[str]] = {}
"""Messages sent per ``test on dialect``, by what ``Ingestor.handle`` answered."""
SENT: Counter[str] = Counter()
"""Payload bytes sent per ``test on dialect``."""
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def _rss() -> int:
    """The process's RSS after a garbage collection and, on glibc, after handing freed heap
    back (``malloc_trim``): what is in use, not the allocator's high-water mark."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
    return int(psutil.Process().memory_info().rss)


def _count(
    label: str, db: Database, batch: list[tuple[str, bytes]], outcomes: Iterable[str]
) -> None:
    key = f"{label} on {db.dialect}"
    EXAMPLES[key] += 1
    OUTCOMES.setdefault(key, Counter()).update(outcomes)
    SENT[key] += sum(len(payload) for _, payload in batch)


def report(cold: int, before: int, after: int) -> str:
    mib = 2**20
    lines = [
        f"ingest fuzz: RSS {cold / mib:.1f} MiB cold, {before / mib:.1f} MiB after the warm-up "
        f"and before the module's tests, {after / mib:.1f} MiB after them "
        f"({(after - before) / mib:+.1f} MiB, at most {MODULE_RSS_GROWTH_MAX / mib:.0f}); "
        f"{sum(SENT.values()) / mib:.0f} MiB of payloads sent"
    ]
    for key in sorted(EXAMPLES):
        out = OUTCOMES[key]
        lines.append(
            f"  {key}: {EXAMPLES[key]} cases, {sum(out.values())} messages, "
            f"{SENT[key] / mib:.1f} MiB ({out['queued']} stored, {out['malformed']} refused "
            f"as malformed, {out['ignored']} ignored)"
        )
    return "\n".join(lines)


def _warm_up(db: Database) -> None:
    """Allocate for good what the first examples do (the engine's and the allocator's pools,
    decoders, SQLAlchemy's caches, the burst's buffers, the PostgreSQL driver), so that the
    module's growth after it is what the tests leave: a cold start adds about 45 MiB more."""

    @settings(FUZZ, max_examples=25)
    @given(batch=st.lists(st.one_of(hostile(), good_messages.map(good)), max_size=6))
    def run(batch: list[tuple[str, bytes]]) -> None:
        ingestor = Ingestor(db=db, batch_size=4)
        for topic, payload in batch:
            ingestor.handle(topic, payload)
        ingestor.write_pending()

    run()
    for topic, payload in burst():
        Ingestor(db=db).handle(topic, payload)
    if pg_enabled():
        importlib.import_module("psycopg")


@pytest.fixture(scope="module", autouse=True)
def module_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The RSS before the module's first test (after a warm-up) and after its last one,
    and the report of what ran."""
    for counter in (EXAMPLES, OUTCOMES, SENT):
        counter.clear()
    cold = _rss()
    warm_db = Database.from_url(f"sqlite:///{tmp_path_factory.mktemp('warm-up') / 'c.db'}")
    warm_db.upgrade()
    _warm_up(warm_db)
    warm_db.dispose()
    before = _rss()
    yield
    after = _rss()
    summary = report(cold, before, after)
    (tmp_path_factory.mktemp("ingest-fuzz") / "fuzz-report.txt").write_text(summary + "\n")
    print(f"\n{summary}")
    assert after - before < MODULE_RSS_GROWTH_MAX, summary
    if len({key.split(" on ")[0] for key in EXAMPLES}) == 4:  # every test, not a -k selection
        assert sum(SENT.values()) > 16 * MODULE_RSS_GROWTH_MAX, summary


# --- the database ------------------------------------------------------------------------

TABLES = ("devices", "device_streams", "telemetry", "events")


@pytest.fixture
def db(database: Database) -> Database:  # noqa: F811 - the fixture imported above
    """A migrated database, per test: SQLite, and PostgreSQL in a fresh schema."""
    return database


_COUNTS = text("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES))


def counts(db: Database) -> dict[str, int]:
    with db.connect() as conn:  # one round trip: PostgreSQL runs this 1,000 times
        return dict(zip(TABLES, map(int, conn.execute(_COUNTS).one()), strict=True))


def assert_stored_within_bounds(db: Database) -> None:
    """What the database holds is inside the protocol's bounds, whatever was sent."""
    with db.connect() as conn:
        t = conn.execute(
            text(
                "SELECT min(ts), max(ts), min(spool_depth), max(spool_depth), max(mem_used_bytes),"
                " min(cpu_percent), max(cpu_percent), max(length(CAST(streams AS TEXT)))"
                " FROM telemetry"
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


def ingest(db: Database, batch: list[tuple[str, bytes]], label: str) -> None:
    before = counts(db)
    ingestor = Ingestor(db=db, batch_size=4)
    outcomes = [ingestor.handle(topic, payload) for topic, payload in batch]  # never raises
    _count(label, db, batch, outcomes)
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
    ingest(db, batch, "hostile")


@settings(FUZZ, max_examples=150)
@given(batch=st.lists(good_messages.map(good), min_size=1, max_size=4))
def test_good_messages_of_every_kind_generated_within_the_bounds_are_stored(
    db: Database, batch: list[tuple[str, bytes]]
) -> None:
    for topic, payload in batch:
        kind = kind_of(topic)
        if len(payload) <= L.MAX_MESSAGE_BYTES[kind]:  # non-ASCII text at its bounds may not be
            assert acceptable(topic, payload), "the oracle accepts what the types generate"
    ingest(db, batch, "good")


def test_a_burst_of_hostile_messages_does_not_grow_memory(db: Database) -> None:
    messages = burst()
    ingestor = Ingestor(db=db)
    process = psutil.Process()
    for _ in range(3):  # warm-up: lazily built decoders, logging
        for topic, payload in messages:
            ingestor.handle(topic, payload)
    gc.collect()
    rss = process.memory_info().rss
    for _ in range(60):
        for topic, payload in messages:
            assert ingestor.handle(topic, payload) == "malformed"
        _count("burst", db, messages, ["malformed"] * len(messages))
    assert ingestor.queue_depth == 0
    gc.collect()
    grown = process.memory_info().rss - rss
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 240 messages"


# --- through a real broker -----------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto with no packet limit of its own."""
    with Mosquitto(tmp_path_factory.mktemp("broker")) as mosquitto:
        yield mosquitto


@pytest.fixture
def live(broker: Mosquitto, db: Database) -> Iterator[tuple[Ingestor, mqtt.Client]]:
    """The controller's subscriber and writer thread on ``broker``, and a publishing client."""
    ingestor = Ingestor(db=db, flush_interval_s=0.02)
    ingestor.start()
    sub = MqttSubscriber(
        settings=MqttSettings(url=broker.url, client_id=f"ctl-fuzz-{db.dialect}"),
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
    _count("through a broker", db, batch, [expected(t, p) for t, p in batch])
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
    topic: str, outcome: str
) -> None:
    assert expected(topic, b"") == outcome
    # ``handle`` decides without the database (the writer thread is what writes).
    unused = Database.from_url("sqlite://")
    assert Ingestor(db=unused, batch_size=4).handle(topic, b"") == outcome
    unused.dispose()
