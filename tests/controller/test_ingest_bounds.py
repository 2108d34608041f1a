"""What outside testers sent the controller's MQTT ingestion: each is refused, counted, logged
once per device, and nothing of it reaches the database (a real SQLite file)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from msgspec import to_builtins
from sqlalchemy import text

from controller.db.models import CODE_LEN, ID_LEN, MODEL_LEN, SHORT_LEN, VERSION_LEN
from controller.db.session import Database
from controller.ingest.decode import RejectedMessage, decode_message
from controller.ingest.rejects import RejectLog
from controller.ingest.writer import Ingestor
from controller.metrics import build_registry
from protocol import StreamReport, StreamStatus, StreamTelemetry, encode
from protocol import limits as L
from protocol.limits import MAX_MESSAGE_BYTES, MAX_SAFE_INT, MAX_TS
from protocol.messages import DeploymentPhase, DeviceState, EventLevel, SourceState
from tests.controller.conftest import event, reported, status, telemetry

TABLES = ("devices", "device_streams", "telemetry", "events")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database.from_url(f"sqlite:///{tmp_path / 'controller.db'}")
    db.upgrade()
    yield db
    db.dispose()


def rows(db: Database) -> dict[str, int]:
    with db.connect() as conn:
        return {
            t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES
        }


def ingest(db: Database, topic: str, payload: bytes) -> tuple[str, Ingestor]:
    ingestor = Ingestor(db=db)
    outcome = ingestor.handle(topic, payload)
    ingestor.write_pending()
    return outcome, ingestor


def _stream(name: str) -> StreamTelemetry:
    return StreamTelemetry(
        name=name,
        source_state="running",
        fps=10.0,
        frames_captured=1,
        frames_processed=1,
        frames_dropped=0,
        infer_ms_p50=1.0,
        infer_ms_p95=2.0,
        latency_ms_p50=3.0,
        latency_ms_p95=4.0,
    )


def _with(original: msgspec.Struct, **fields: Any) -> bytes:
    doc = msgspec.to_builtins(original)
    doc.update(fields)
    return msgspec.json.encode(doc)


def _assert_refused(
    db: Database, topic: str, payload: bytes, *, reason: str, field: str
) -> Ingestor:
    outcome, ingestor = ingest(db, topic, payload)
    assert outcome == "malformed"
    assert rows(db) == dict.fromkeys(TABLES, 0), "a refused message must not be written"
    snap = ingestor.snapshot()
    kind = topic.rsplit("/", 1)[1]
    assert snap.rejected_by_reason == {(kind, reason): 1}
    with pytest.raises(RejectedMessage) as info:
        decode_message(topic, payload)
    assert info.value.reason == reason and info.value.field == field, str(info.value)
    assert field in str(info.value)
    return ingestor


def test_a_10_mb_event_is_refused_by_its_size_before_decoding(sqlite_db: Database) -> None:
    payload = encode(event("cam-1")).replace(b'"done"', b'"' + b"x" * 10_000_000 + b'"')
    assert len(payload) > 10_000_000
    _assert_refused(
        sqlite_db, "edgefleet/v1/cam-1/events", payload, reason="too_large", field="payload"
    )


def test_telemetry_naming_20000_streams_is_refused(sqlite_db: Database) -> None:
    message = telemetry("cam-1", streams=[_stream(f"s{i}") for i in range(20_000)])
    payload = encode(message)
    assert len(payload) > 4_000_000  # the 4.7 MB row the testers saw stored
    _assert_refused(
        sqlite_db, "edgefleet/v1/cam-1/telemetry", payload, reason="too_large", field="payload"
    )


def test_telemetry_with_too_many_streams_within_the_size_limit_is_refused(
    sqlite_db: Database,
) -> None:
    payload = encode(telemetry("cam-1", streams=[_stream(f"s{i}") for i in range(65)]))
    assert len(payload) <= MAX_MESSAGE_BYTES["telemetry"]
    _assert_refused(
        sqlite_db,
        "edgefleet/v1/cam-1/telemetry",
        payload,
        reason="out_of_bounds",
        field="streams",
    )


def test_reported_with_20000_streams_writes_no_rows(sqlite_db: Database) -> None:
    streams = {f"s{i}": StreamReport(active="m@1") for i in range(20_000)}
    payload = _with(reported("cam-1"), streams=msgspec.to_builtins(streams))
    _assert_refused(
        sqlite_db, "edgefleet/v1/cam-1/reported", payload, reason="too_large", field="payload"
    )
    small = {f"s{i}": StreamReport(active="m@1") for i in range(65)}
    payload = _with(reported("cam-1"), streams=msgspec.to_builtins(small))
    _assert_refused(
        sqlite_db,
        "edgefleet/v1/cam-1/reported",
        payload,
        reason="out_of_bounds",
        field="streams",
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("telemetry", telemetry("cam-1")),
        ("status", status("cam-1")),
        ("events", event("cam-1")),
        ("reported", reported("cam-1")),
    ],
)
def test_a_timestamp_of_1e300_is_refused(sqlite_db: Database, kind: str, message: Any) -> None:
    _assert_refused(
        sqlite_db,
        f"edgefleet/v1/cam-1/{kind}",
        _with(message, ts=1e300),
        reason="out_of_bounds",
        field="ts",
    )


def test_a_negative_spool_depth_is_refused(sqlite_db: Database) -> None:
    _assert_refused(
        sqlite_db,
        "edgefleet/v1/cam-1/telemetry",
        _with(telemetry("cam-1"), spool_depth=-1),
        reason="out_of_bounds",
        field="spool_depth",
    )


@pytest.mark.parametrize("rev", [-(2**63), -1, MAX_SAFE_INT + 1, 2**63 - 1])
def test_a_desired_rev_outside_0_to_2_53_is_refused(sqlite_db: Database, rev: int) -> None:
    _assert_refused(
        sqlite_db,
        "edgefleet/v1/cam-1/reported",
        _with(reported("cam-1"), desired_rev=rev),
        reason="out_of_bounds",
        field="desired_rev",
    )


def test_messages_at_the_bounds_are_stored(sqlite_db: Database) -> None:
    """The other side of every bound: a clock not yet synced (1970), the largest counters,
    64 streams, the year-2099 timestamp all pass."""
    ingestor = Ingestor(db=sqlite_db)
    good = [
        ("telemetry", _with(telemetry("cam-1"), ts=0.0, spool_depth=MAX_SAFE_INT)),
        ("telemetry", encode(telemetry("cam-1", streams=[_stream(f"s{i}") for i in range(64)]))),
        ("status", _with(status("cam-1"), ts=MAX_TS, started_at=0.0)),
        ("reported", _with(reported("cam-1"), desired_rev=MAX_SAFE_INT)),
        ("reported", _with(reported("cam-2"), desired_rev=0)),
        ("events", _with(event("cam-1"), message="x" * 2000)),
    ]
    for kind, payload in good:
        assert ingestor.handle(f"edgefleet/v1/{payload_device(payload)}/{kind}", payload) == (
            "queued"
        ), kind
    ingestor.write_pending()
    assert ingestor.snapshot().stored == len(good)
    assert rows(sqlite_db)["telemetry"] == 2 and rows(sqlite_db)["events"] == 1


def payload_device(payload: bytes) -> str:
    device: str = msgspec.json.decode(payload)["device_id"]
    return device


@pytest.mark.parametrize(
    ("topic", "payload", "field"),
    [
        ("edgefleet/v1/cam-2/telemetry", encode(telemetry("cam-1")), "device_id"),
        ("edgefleet/v1/cam-2/events", encode(event("cam-1")), "device_id"),
    ],
)
def test_a_payload_for_another_device_than_its_topic_is_refused(
    sqlite_db: Database, topic: str, payload: bytes, field: str
) -> None:
    _assert_refused(sqlite_db, topic, payload, reason="topic_mismatch", field=field)


def test_rejections_are_counted_in_prometheus_and_logged_once_per_device_per_minute(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    ingestor = Ingestor(db=sqlite_db, monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="controller.ingest")
    bad = _with(telemetry("cam-1"), spool_depth=-1)
    for _ in range(5):
        assert ingestor.handle("edgefleet/v1/cam-1/telemetry", bad) == "malformed"
    ingestor.handle("edgefleet/v1/cam-2/telemetry", _with(telemetry("cam-2"), ts=1e300))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "cam-1" in lines[0] and "spool_depth" in lines[0]
    assert "cam-2" in lines[1] and "ts" in lines[1]
    caplog.clear()
    now[0] += 61
    ingestor.handle("edgefleet/v1/cam-1/telemetry", bad)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "4 more" in lines[0], lines
    registry = build_registry(db=sqlite_db, ingest_snapshot=ingestor.snapshot)
    value = registry.get_sample_value(
        "edgefleet_ingest_rejected_total", {"kind": "telemetry", "reason": "out_of_bounds"}
    )
    assert value == 7


def test_protocol_bounds_fit_the_database() -> None:
    """What passes the protocol's bounds fits the columns it is written to, so the writer
    needs no checks of its own (the controller used to carry a copy of them)."""
    longest_ref = L.MAX_ID_LEN + 1 + L.MAX_ID_LEN  # name@version
    assert L.MAX_ID_LEN <= ID_LEN and longest_ref <= MODEL_LEN
    assert L.MAX_CODE_LEN <= CODE_LEN and L.MAX_ID_LEN <= VERSION_LEN  # agent_version
    for literal in (SourceState, DeviceState, DeploymentPhase, EventLevel):
        assert max(len(v) for v in get_args(literal)) <= SHORT_LEN
    assert L.MAX_SAFE_INT < 2**63  # BIGINT


def test_the_refused_message_log_remembers_a_bounded_number_of_devices(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Made-up device ids cannot grow the log's memory: beyond ``max_devices`` they share
    one entry (one line a minute for all of them)."""
    now = [0.0]
    log = RejectLog(max_devices=3, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="controller.ingest")
    for i in range(100):
        try:
            decode_message(f"edgefleet/v1/dev-{i}/telemetry", b"{}")
        except RejectedMessage as err:
            log.rejected(err)
    assert len(log._last) <= 4
    assert len(caplog.records) == 4  # three devices, then all the others together


def test_statuses_naming_new_streams_each_time_never_give_a_device_more_than_the_cap(
    sqlite_db: Database,
) -> None:
    """A status adds stream rows and only a reported state removes them: a device naming
    new streams in every status must not grow its rows without end."""
    ingestor = Ingestor(db=sqlite_db)
    base = status("cam-1")
    for batch in range(10):
        streams = [
            StreamStatus(name=f"b{batch}s{i}", source_state="running", model="m@1")
            for i in range(L.MAX_STREAMS)
        ]
        ingestor.handle("edgefleet/v1/cam-1/status", _with(base, streams=to_builtins(streams)))
        ingestor.write_pending()
    with sqlite_db.connect() as conn:
        names = conn.execute(text("SELECT name FROM device_streams")).scalars().all()
    assert len(names) == L.MAX_STREAMS and set(names) == {f"b0s{i}" for i in range(64)}
    # the streams it already has are still updated
    again = [StreamStatus(name="b0s1", source_state="failed", model=None, error="gone")]
    ingestor.handle("edgefleet/v1/cam-1/status", _with(base, streams=to_builtins(again)))
    ingestor.write_pending()
    with sqlite_db.connect() as conn:
        state = conn.execute(
            text("SELECT source_state FROM device_streams WHERE name = 'b0s1'")
        ).scalar_one()
    assert state == "failed"
