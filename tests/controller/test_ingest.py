"""Ingestion: decoding rules, counting, batching, and a database that rejects one message."""

from __future__ import annotations

import logging

import msgspec
import pytest

from controller.db.session import Database
from controller.errors import MalformedMessageError
from controller.fleet.devices import get_device
from controller.fleet.history import count_telemetry
from controller.fleet.writes import Received
from controller.ingest.decode import decode_message
from controller.ingest.writer import Ingestor
from protocol import encode, status_topic, telemetry_topic
from tests.controller.conftest import event, reported, status, telemetry


def test_decode_accepts_every_ingested_kind() -> None:
    for msg, kind in (
        (status("cam-1"), "status"),
        (telemetry("cam-1"), "telemetry"),
        (reported("cam-1"), "reported"),
        (event("cam-1"), "events"),
    ):
        decoded = decode_message(f"edgefleet/v1/cam-1/{kind}", encode(msg))
        assert decoded == ("cam-1", msg)


@pytest.mark.parametrize(
    ("topic", "payload", "why"),
    [
        ("edgefleet/v1/cam-1/telemetry", b"{not json", "not valid JSON"),
        ("edgefleet/v1/cam-1/telemetry", b"", "empty payload"),
        ("edgefleet/v1/cam-1/status", encode(telemetry("cam-1")), "invalid Status"),
        ("edgefleet/v1/cam-2/telemetry", encode(telemetry("cam-1")), "does not match"),
        ("edgefleet/v1/Cam!/telemetry", encode(telemetry("cam-1")), "invalid device id"),
        ("edgefleet/v1/cam-1/desired", b"{}", "does not ingest desired"),
        ("other/cam-1/telemetry", b"{}", "not under edgefleet/v1"),
        (
            "edgefleet/v1/cam-1/telemetry",
            encode(telemetry("cam-1", mem_used_bytes=2**64)),
            "<= 9007199254740991 - at `$.mem_used_bytes`",
        ),
        (
            "edgefleet/v1/cam-1/events",
            encode(event("cam-1", code="x" * 101)),
            "a code of 1-100",
        ),
        (
            "edgefleet/v1/cam-1/events",
            encode(msgspec.structs.replace(event("cam-1"), message="nul\x00inside")),
            "`message` contains a NUL",
        ),
    ],
)
def test_malformed_messages_are_rejected_with_the_topic_and_the_reason(
    topic: str, payload: bytes, why: str
) -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode_message(topic, payload)
    assert topic in str(info.value) and why in str(info.value)


def test_empty_retained_status_is_ignored_not_malformed() -> None:
    assert decode_message(status_topic("cam-1"), b"") is None


def test_handle_counts_every_outcome_and_logs_the_topic(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    ingestor = Ingestor(db=database, queue_size=2, enqueue_timeout_s=0)
    caplog.set_level(logging.WARNING, logger="controller.ingest")
    outcomes = [
        ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1"))),
        ingestor.handle(status_topic("cam-1"), b""),
        ingestor.handle("edgefleet/v1/cam-1/telemetry", b"\xff\xfe"),
        ingestor.handle(status_topic("cam-1"), encode(status("cam-1"))),
        ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1"))),  # queue full
    ]
    assert outcomes == ["queued", "ignored", "malformed", "queued", "dropped"]
    snap = ingestor.snapshot()
    assert (snap.received, snap.queued, snap.ignored, snap.malformed, snap.dropped) == (
        5,
        2,
        1,
        1,
        1,
    )
    assert snap.malformed_by_kind == {"telemetry": 1}
    assert snap.queue_depth == 2
    assert "edgefleet/v1/cam-1/telemetry" in caplog.text


def test_pending_messages_are_written_in_batches_of_batch_size(database: Database) -> None:
    ingestor = Ingestor(db=database, batch_size=5)
    for i in range(12):
        ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1", ts=float(i))))
    assert ingestor.write_pending() == 12
    snap = ingestor.snapshot()
    assert (snap.stored, snap.batches, snap.queue_depth) == (12, 3, 0)
    with database.connect() as conn:
        assert count_telemetry(conn, "cam-1") == 12


def test_writer_thread_flushes_a_partial_batch_after_the_flush_interval(database: Database) -> None:
    ingestor = Ingestor(db=database, batch_size=1000, flush_interval_s=0.1)
    ingestor.start()
    try:
        ingestor.handle(status_topic("cam-1"), encode(status("cam-1")))
        ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1")))
        ingestor.handle(telemetry_topic("cam-2"), encode(telemetry("cam-2")))
        assert ingestor.wait_idle(timeout=10)
    finally:
        ingestor.stop()
    snap = ingestor.snapshot()
    assert snap.stored == 3 and snap.stored_by_kind == {"status": 1, "telemetry": 2}
    assert snap.lag_max_s is not None and snap.lag_max_s >= 0
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
        assert device is not None and device.online
        assert count_telemetry(conn) == 2


def test_a_message_the_database_rejects_costs_only_itself(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # Injected fault: a message built without validation (2**70 does not fit BIGINT).
    bad = telemetry("cam-bad", mem_used_bytes=2**70)
    ingestor = Ingestor(db=database)
    for i in range(3):
        ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1", ts=float(i))))
    ingestor.enqueue(  # the fault bypasses decode_message on purpose
        Received(
            topic=telemetry_topic("cam-bad"), device_id="cam-bad", message=bad, received_at=1.0
        )
    )
    ingestor.handle(telemetry_topic("cam-1"), encode(telemetry("cam-1", ts=9.0)))
    caplog.set_level(logging.WARNING, logger="controller.ingest")
    ingestor.write_pending()
    snap = ingestor.snapshot()
    assert (snap.stored, snap.rejected) == (4, 1)
    assert snap.malformed_by_kind == {"telemetry:database": 1}
    assert telemetry_topic("cam-bad") in caplog.text
    with database.connect() as conn:
        assert count_telemetry(conn, "cam-1") == 4
        assert count_telemetry(conn, "cam-bad") == 0
