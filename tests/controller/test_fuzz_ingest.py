"""Fuzzing the ingestion with hypothesis: nothing crashes, every bad message is counted.

No broker: ``Ingestor.handle`` (decode + enqueue) is called directly, then the queue is
written to a real database; what decoding accepts, the database must store.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.db.session import Database
from controller.ingest.writer import Ingestor
from protocol import StreamTelemetry, encode
from tests.controller.conftest import event, reported, status, telemetry
from tests.ingest_fuzz_support import json_paths, set_path

UNUSED_DB = Database.from_url("sqlite://")  # never connected: these tests write nothing
KINDS = ["status", "telemetry", "reported", "events", "detections", "desired", "bogus"]
TEMPLATES: dict[str, dict[str, Any]] = {
    "status": msgspec.to_builtins(status("cam-1")),
    "telemetry": msgspec.to_builtins(
        telemetry(
            "cam-1",
            streams=[
                StreamTelemetry(
                    name="cam0",
                    source_state="running",
                    fps=10.0,
                    frames_captured=5,
                    frames_processed=5,
                    frames_dropped=0,
                    infer_ms_p50=1.0,
                    infer_ms_p95=None,
                    latency_ms_p50=2.0,
                    latency_ms_p95=None,
                )
            ],
        )
    ),
    "reported": msgspec.to_builtins(reported("cam-1")),
    "events": msgspec.to_builtins(event("cam-1")),
}

device_ids = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True),
    st.text(max_size=70),
    st.just("cam-1"),
)
topics = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda d, k, tail: f"edgefleet/v1/{d}/{k}{tail}",
        device_ids,
        st.sampled_from(KINDS),
        st.sampled_from(["", "", "/cam0", "/x/y"]),
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _same_type(original: Any) -> st.SearchStrategy[Any]:
    """Adversarial values of the original's JSON type (what a buggy device might send)."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers(min_value=-(2**66), max_value=2**66)
    if isinstance(original, float):
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**66), 2**66)
    if isinstance(original, str):
        return st.text(max_size=300) | st.text(alphabet="\x00a", max_size=4)
    return json_values


@st.composite
def mutated(draw: st.DrawFn, *, same_type: bool) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    doc = copy.deepcopy(TEMPLATES[kind])
    device = draw(device_ids) if not same_type else draw(st.sampled_from(["cam-1", "cam-2"]))
    doc["device_id"] = device
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(json_paths(doc)))
        if same_type:
            current: Any = doc
            for part in path:
                current = current[part]
            set_path(doc, path, draw(_same_type(current)))
        else:
            action = draw(st.sampled_from(["set", "delete", "add"]))
            if action == "set":
                set_path(doc, path, draw(json_values))
            elif action == "delete" and len(path) == 1:
                doc.pop(path[0], None)
            else:
                doc[draw(st.text(max_size=8))] = draw(json_values)
    topic_device = device if draw(st.booleans()) or same_type else draw(device_ids)
    return f"edgefleet/v1/{topic_device}/{kind}", msgspec.json.encode(doc)


messages = st.one_of(
    st.tuples(topics, st.binary(max_size=200)),
    st.tuples(topics, st.sampled_from([encode(status("cam-1")), b"", b"null", b"[]"])),
    mutated(same_type=False),
)


@settings(max_examples=400, deadline=None)
@given(batch=st.lists(messages, min_size=1, max_size=20))
def test_fuzzed_topics_and_payloads_never_crash_and_every_message_is_counted(
    batch: list[tuple[str, bytes]],
) -> None:
    ingestor = Ingestor(db=UNUSED_DB, queue_size=1000)  # decode + enqueue only
    outcomes = [ingestor.handle(topic, payload) for topic, payload in batch]
    snap = ingestor.snapshot()
    assert snap.received == len(batch)
    assert snap.malformed == outcomes.count("malformed")
    assert snap.queued == outcomes.count("queued") == snap.queue_depth
    assert snap.ignored == outcomes.count("ignored")
    assert snap.queued + snap.malformed + snap.ignored + snap.dropped == len(batch)
    assert sum(snap.malformed_by_kind.values()) == snap.malformed


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(mutated(same_type=True), min_size=1, max_size=15))
def test_what_decoding_accepts_the_database_stores(
    database: Database, batch: list[tuple[str, bytes]]
) -> None:
    ingestor = Ingestor(db=database, batch_size=8)
    outcomes = [ingestor.handle(topic, payload) for topic, payload in batch]
    ingestor.write_pending()
    snap = ingestor.snapshot()
    assert snap.rejected == 0, snap.malformed_by_kind
    assert snap.stored == outcomes.count("queued")
    assert snap.queued + snap.malformed + snap.ignored == len(batch)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"schema":1,"device_id":"cam-1","ts":1e400}',
        b'{"schema":1,"device_id":"cam-1","ts":NaN}',
        b"\x00" * 10,
        b'{"schema":2}',
    ],
)
def test_non_finite_and_binary_payloads_are_malformed(payload: bytes) -> None:
    ingestor = Ingestor(db=UNUSED_DB)
    assert ingestor.handle("edgefleet/v1/cam-1/telemetry", payload) == "malformed"
