"""The protocol's bounds (protocol.limits): declared once, carried by the message types and
their JSON Schemas, refused by consumers, never exceeded by what the agent publishes."""

from __future__ import annotations

import ast
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import jsonschema
import msgspec
import numpy as np
import pytest

from agent.config import BrokerConfig, StreamConfig
from agent.facts import collect_facts
from agent.pipeline import StreamPipeline
from agent.publisher import Publisher
from agent.sources import Frame, FrameSource
from agent.spool.queue import Spool
from agent.telemetry import build_telemetry, read_temperature, sample_system
from inference.detector import InferenceResult
from protocol import (
    MESSAGE_TYPES,
    Desired,
    Detection,
    Detections,
    Event,
    Gate,
    GateEvidence,
    InvalidMessage,
    ModelRef,
    ProtocolError,
    Reported,
    Snapshot,
    Status,
    StreamReport,
    StreamStatus,
    StreamTelemetry,
    Telemetry,
    check_payload,
    decode,
    decode_manifest,
    encode,
    encode_checked,
    events_topic,
    fit,
    validate_device_id,
)
from protocol import limits as L
from protocol.jsonschema import schemas
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
F = 1.2345678901234567e-300
"""A float within every non-negative range whose JSON is as long as any (23 characters)."""
BIG = L.MAX_SAFE_INT
REF = "m" * 64 + "@" + "v" * 64


def uid(i: int, n: int = 64) -> str:
    return (f"{i:03d}" + "a" * n)[:n]


def stream_telemetry(name: str = "cam0", **over: Any) -> StreamTelemetry:
    fields: dict[str, Any] = {
        "name": name,
        "source_state": "running",
        "fps": 10.0,
        "frames_captured": 5,
        "frames_processed": 5,
        "frames_dropped": 0,
        "infer_ms_p50": 1.0,
        "infer_ms_p95": None,
        "latency_ms_p50": 2.0,
        "latency_ms_p95": None,
    }
    fields.update(over)
    return StreamTelemetry(**fields)


def telemetry(**over: Any) -> Telemetry:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "interval_s": 10.0,
        "cpu_percent": 50.0,
        "mem_percent": 40.0,
        "mem_used_bytes": 1000,
        "temp_c": 50.0,
        "disk_percent": 30.0,
        "disk_free_bytes": 2000,
        "spool_depth": 3,
        "spool_dropped": 0,
    }
    fields.update(over)
    return Telemetry(**fields)


def event(**over: Any) -> Event:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "code": "source.failed",
        "level": "error",
        "message": "cannot open the camera",
    }
    fields.update(over)
    return Event(**fields)


def reported(**over: Any) -> Reported:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "ts": 1_800_000_000.0,
        "desired_rev": 7,
        "streams": {"cam0": StreamReport(active="m@2", previous="m@1")},
    }
    fields.update(over)
    return Reported(**fields)


def detections(**over: Any) -> Detections:
    fields: dict[str, Any] = {
        "schema": 1,
        "device_id": "cam-1",
        "stream": "cam0",
        "seq": 1,
        "frame_ts": 1_800_000_000.0,
        "frame_index": 0,
        "model": "face@1.0.0",
        "infer_ms": 1.5,
        "width": 640,
        "height": 480,
        "detections": [Detection(label="face", score=0.9, box=(0.1, 0.2, 0.3, 0.4))],
    }
    fields.update(over)
    return Detections(**fields)


def _with(original: msgspec.Struct, **fields: Any) -> bytes:
    doc = msgspec.to_builtins(original)
    doc.update(fields)
    return msgspec.json.encode(doc)


# --- the findings ------------------------------------------------------------------------

FINDINGS: list[tuple[str, str, Callable[[], bytes], str, str]] = [
    (
        "10 MB event",
        "events",
        lambda: _with(event(), message="x" * 10_000_000),
        "too_large",
        "payload",
    ),
    (
        "telemetry naming 20000 streams",
        "telemetry",
        lambda: encode(telemetry(streams=[stream_telemetry(f"s{i}") for i in range(20_000)])),
        "too_large",
        "payload",
    ),
    (
        "reported with 20000 streams",
        "reported",
        lambda: encode(
            reported(streams={f"s{i}": StreamReport(active=None) for i in range(20_000)})
        ),
        "too_large",
        "payload",
    ),
    ("ts = 1e300", "telemetry", lambda: _with(telemetry(), ts=1e300), "out_of_bounds", "ts"),
    (
        "negative spool_depth",
        "telemetry",
        lambda: _with(telemetry(), spool_depth=-1),
        "out_of_bounds",
        "spool_depth",
    ),
    (
        "desired_rev = -2^63",
        "reported",
        lambda: _with(reported(), desired_rev=-(2**63)),
        "out_of_bounds",
        "desired_rev",
    ),
]


@pytest.mark.parametrize(
    ("kind", "make", "reason", "field"),
    [f[1:] for f in FINDINGS],
    ids=[f[0] for f in FINDINGS],
)
def test_each_finding_is_refused_by_the_protocol_and_by_its_json_schema(
    kind: str, make: Callable[[], bytes], reason: str, field: str
) -> None:
    payload = make()
    with pytest.raises(InvalidMessage) as info:
        check_payload(kind, payload, device_id="cam-1")
    assert (info.value.reason, info.value.field) == (reason, field), str(info.value)
    with pytest.raises(ProtocolError):
        decode(payload, MESSAGE_TYPES[kind])  # the size aside, the fields are out of bounds
    doc = json.loads(payload)
    streams = doc.get("streams") or []
    if len(streams) > L.MAX_STREAMS + 1:  # as far out of bounds, faster to check
        doc["streams"] = (
            streams[: L.MAX_STREAMS + 1]
            if isinstance(streams, list)
            else dict(list(streams.items())[: L.MAX_STREAMS + 1])
        )
    validator = jsonschema.Draft202012Validator(schemas()[f"{kind}.schema.json"])
    assert not validator.is_valid(doc), "a third party's schema check agrees"


# --- the bounds themselves ---------------------------------------------------------------


def _worst_cases() -> dict[str, msgspec.Struct]:
    ge = GateEvidence(
        stage="probation",
        pairs=BIG,
        informative_pairs=BIG,
        agreement=F,
        agreement_low=F,
        agreement_high=F,
        precision=F,
        recall=F,
        latency_ratio=F,
        latency_ratio_low=F,
        latency_ratio_high=F,
        score_shift=-F,
        errors=BIG,
        confidence=F,
        verdict="undecided",
        reason="r" * L.MAX_REASON_LEN,
        summary="s" * L.MAX_SUMMARY_LEN,
    )
    gate = Gate(compare=False, min_agreement=F, max_latency_ratio=F, max_errors=10**6)
    ids = [uid(i) for i in range(L.MAX_STREAMS)]
    return {
        "status": Status(
            schema=1,
            device_id=uid(0),
            state="stopping",
            ts=F,
            agent_version="v" * 64,
            started_at=F,
            streams=[
                StreamStatus(name=n, source_state="reconnecting", model=REF, error="e" * 500)
                for n in ids
            ],
            facts={uid(i): "f" * L.MAX_VALUE_LEN for i in range(L.MAX_FACTS)},
        ),
        "telemetry": telemetry(
            device_id=uid(0),
            ts=F,
            interval_s=F,
            mem_used_bytes=BIG,
            temp_c=-F,
            disk_free_bytes=BIG,
            spool_depth=BIG,
            spool_dropped=BIG,
            streams=[
                stream_telemetry(
                    n,
                    source_state="reconnecting",
                    fps=F,
                    frames_captured=BIG,
                    frames_processed=BIG,
                    frames_dropped=BIG,
                    infer_ms_p50=F,
                    infer_ms_p95=F,
                    latency_ms_p50=F,
                    latency_ms_p95=F,
                    errors=BIG,
                    reconnects=BIG,
                    score_psi=F,
                )
                for n in ids
            ],
        ),
        "detections": detections(
            device_id=uid(0),
            stream=uid(1),
            seq=BIG,
            frame_ts=F,
            frame_index=BIG,
            model=REF,
            infer_ms=F,
            width=L.MAX_FRAME_SIDE,
            height=L.MAX_FRAME_SIDE,
            detections=[Detection(label="l" * L.MAX_LABEL_LEN, score=F, box=(F, F, F, F))]
            * L.MAX_DETECTIONS,
        ),
        "desired": Desired(
            schema=1,
            rev=BIG,
            rollout_id="r" * 64,
            models={
                n: ModelRef(
                    name=n,
                    version="v" * 64,
                    url="u" * L.MAX_URL_LEN,
                    sha256="f" * 64,
                    size=BIG,
                    signature="s" * L.MAX_SIGNATURE_LEN,
                    gate=gate,
                )
                for n in ids
            },
        ),
        "reported": reported(
            device_id=uid(0),
            ts=F,
            desired_rev=BIG,
            streams={
                n: StreamReport(
                    active=REF,
                    previous=REF,
                    installed=[REF] * L.MAX_INSTALLED,
                    phase="downloading",
                    target=REF,
                    reason="r" * L.MAX_REASON_LEN,
                    gate=ge,
                )
                for n in ids
            },
        ),
        "events": event(
            device_id=uid(0),
            ts=F,
            code="c" * L.MAX_CODE_LEN,
            message="m" * L.MAX_TEXT_LEN,
            stream=uid(1),
            phase="downloading",
            details={uid(i): "d" * L.MAX_VALUE_LEN for i in range(L.MAX_DETAILS)},
        ),
        "snapshot": Snapshot(
            schema=1,
            device_id=uid(0),
            stream=uid(1),
            ts=F,
            model=REF,
            width=L.MAX_FRAME_SIDE,
            height=L.MAX_FRAME_SIDE,
            detections=[Detection(label="l" * L.MAX_LABEL_LEN, score=F, box=(F, F, F, F))]
            * L.MAX_SNAPSHOT_DETECTIONS,
            jpeg="A" * L.MAX_SNAPSHOT_JPEG_B64,
        ),
    }


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_a_message_at_every_bound_fits_the_size_limit_of_its_kind(kind: str) -> None:
    """The size limit never refuses a message whose fields are within their bounds (ASCII)."""
    payload = encode_checked(_worst_cases()[kind])
    assert len(payload) <= L.MAX_MESSAGE_BYTES[kind]


def test_the_broker_limit_is_the_largest_message() -> None:
    assert max(L.MAX_MESSAGE_BYTES.values()) == L.BROKER_MESSAGE_SIZE_LIMIT
    assert set(L.MAX_MESSAGE_BYTES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (L.ID_PATTERN, ["a", "cam-01", "0_x", "a" * 64], ["", "Cam", "-a", "a" * 65, "cam\n", "é"]),
        (
            L.MODEL_REF_PATTERN,
            ["face@1.0.0", "yolo.v8-n@2024.01+rc_1", "m@v1-ßeta"],
            ["face", "face@", "Face@1", "face@1 0", "face@1@2", "face@a/b", "face@1\n"],
        ),
        (L.CODE_PATTERN, ["source.failed", "ota.rolled_back", "x"], ["", "Source", "a b", "a\n"]),
        (L.SHA256_PATTERN, ["0" * 64, "af" * 32], ["0" * 63, "A" * 64, "0" * 64 + "\n"]),
    ],
)
def test_each_pattern_accepts_good_text_and_refuses_its_neighbours(
    pattern: str, good: list[str], bad: list[str]
) -> None:
    annotated: Any = Annotated[str, msgspec.Meta(pattern=pattern)]
    for value in good:
        msgspec.json.decode(msgspec.json.encode(value), type=annotated)
    for value in bad:
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(msgspec.json.encode(value), type=annotated)


@pytest.mark.parametrize("value", ["a", "cam-01", "a" * 64, "a" * 65, "Cam", "cam\n", "-x", ""])
def test_the_topic_rule_and_the_payload_rule_for_ids_agree(value: str) -> None:
    try:
        validate_device_id(value)
        topic_ok = True
    except ProtocolError:
        topic_ok = False
    payload_ok = True
    try:
        check_payload("events", _with(event(), device_id=value))
    except InvalidMessage:
        payload_ok = False
    assert topic_ok == payload_ok


@pytest.mark.parametrize(
    ("ts", "ok"),
    [(0.0, True), (1.0, True), (L.MAX_TS, True), (-1e-9, False), (L.MAX_TS + 1, False)],
)
def test_a_clock_not_yet_synced_is_accepted_a_timestamp_past_2100_is_not(
    ts: float, ok: bool
) -> None:
    payload = _with(event(), ts=ts)
    if ok:
        assert check_payload("events", payload).ts == ts
    else:
        with pytest.raises(InvalidMessage, match="ts"):
            check_payload("events", payload)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"NaN", "not_json"), (b"Infinity", "not_json"), (b"1e400", "out_of_bounds")],
)
def test_non_finite_numbers_never_decode(raw: bytes, reason: str) -> None:
    payload = _with(telemetry(), cpu_percent=0).replace(b'"cpu_percent":0', b'"cpu_percent":' + raw)
    with pytest.raises(InvalidMessage) as info:
        check_payload("telemetry", payload)
    assert info.value.reason == reason
    with pytest.raises(InvalidMessage, match="got `null`"):
        encode_checked(telemetry(cpu_percent=math.nan))  # msgspec writes NaN as null


def test_the_payload_must_name_the_device_and_stream_of_its_topic() -> None:
    with pytest.raises(InvalidMessage, match="does not match the topic's device id") as info:
        check_payload("detections", encode(detections()), device_id="cam-2")
    assert (info.value.reason, info.value.field) == ("topic_mismatch", "device_id")
    with pytest.raises(InvalidMessage, match="stream") as info:
        check_payload("detections", encode(detections()), device_id="cam-1", stream="cam9")
    assert (info.value.reason, info.value.field) == ("topic_mismatch", "stream")


def test_decode_errors_name_the_field_and_say_the_rule_in_words() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_with(event(), device_id="Cam 1"), Event)
    text = str(info.value)
    assert "$.device_id" in text and "1-64 characters of a-z, 0-9" in text
    assert "regex" not in text


def test_a_manifest_whose_version_cannot_be_a_model_ref_is_refused_when_loaded() -> None:
    manifest = {
        "schema": 1,
        "name": "face",
        "version": "1.0 beta",
        "runtime": "litert",
        "model": "m.tflite",
        "input": {"width": 8, "height": 8},
        "decoder": {"type": "yolo"},
        "labels": ["face"],
    }
    with pytest.raises(ProtocolError, match=r"invalid model version '1\.0 beta'"):
        decode_manifest(json.dumps(manifest))
    assert decode_manifest(json.dumps(dict(manifest, version="1.0-beta"))).ref == "face@1.0-beta"


# --- the producer's side: encode_checked and fit -----------------------------------------


def test_encode_checked_refuses_what_a_consumer_would_refuse_and_fit_repairs_it() -> None:
    bad = telemetry(spool_depth=-1, cpu_percent=math.inf, temp_c=math.nan)
    with pytest.raises(InvalidMessage):
        encode_checked(bad)
    fixed = decode(encode_checked(bad, fit=True), Telemetry)
    assert (fixed.spool_depth, fixed.cpu_percent, fixed.temp_c) == (0, 100.0, None)


def test_fit_truncates_text_cuts_lists_and_keeps_the_best_detections() -> None:
    long_event = event(
        message="é" * 5000 + "\x00",
        details={f"k{i}": "v" * 1000 for i in range(40)},
    )
    fitted = fit(long_event)
    assert len(fitted.message) == L.MAX_TEXT_LEN and fitted.message.endswith("…")
    assert len(fitted.details) == L.MAX_DETAILS
    assert all(len(str(v)) == L.MAX_VALUE_LEN for v in fitted.details.values())
    assert "\x00" not in encode(fit(event(message="a\x00b"))).decode()
    many = [
        Detection(label="x" * 300, score=1 - i / 2000, box=(0.1, 0.1, 0.2, 0.2))
        for i in range(1500)
    ]
    fitted_d = fit(detections(detections=many))
    assert len(fitted_d.detections) == L.MAX_DETECTIONS
    assert fitted_d.detections[0].score == 1.0 and len(fitted_d.detections[0].label) == 100
    status = Status(
        schema=1,
        device_id="cam-1",
        state="online",
        ts=1.0,
        agent_version="1",
        started_at=1.0,
        streams=[StreamStatus(name="c", source_state="failed", model=None, error="e" * 9000)],
    )
    assert decode(encode_checked(status, fit=True), Status).streams[0].error == "e" * 499 + "…"


def test_fit_cannot_invent_an_id_so_encode_checked_still_refuses_it() -> None:
    with pytest.raises(InvalidMessage, match="name@version"):
        encode_checked(detections(model="not a ref"), fit=True)


def test_what_the_agent_builds_from_this_machine_is_within_the_bounds(tmp_path: Path) -> None:
    """The real facts, system sample and temperature of the machine running the tests."""
    status = Status(
        schema=1,
        device_id="cam-1",
        state="online",
        ts=1_800_000_000.0,
        agent_version="0.1.0",
        started_at=1_799_999_000.0,
        streams=[StreamStatus(name="front", source_state="running", model="face@1.0.0")],
        facts=collect_facts(),
    )
    encode_checked(status)  # no fit: as built
    message = build_telemetry(
        device_id="cam-1",
        interval_s=10.0,
        system=sample_system(tmp_path),
        streams=[stream_telemetry("front")],
        spool_depth=0,
        spool_dropped=0,
        ts=1_800_000_000.0,
    )
    encode_checked(message)


def test_broken_temperature_sensors_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    class Reading:
        def __init__(self, current: float) -> None:
            self.current = current

    readings = {"cpu_thermal": [Reading(6553.5), Reading(-273.0), Reading(48.25)]}
    monkeypatch.setattr("psutil.sensors_temperatures", lambda: readings, raising=False)
    assert read_temperature() == 48.2
    readings["cpu_thermal"] = [Reading(6553.5), Reading(math.nan)]
    assert read_temperature() is None


def test_no_agent_module_publishes_with_the_unchecked_encode() -> None:
    """``protocol.encode`` skips the bounds: the agent publishes only ``encode_checked``
    payloads. ota/state.py persists the desired state (a file, not a message)."""
    allowed = {"agent/ota/state.py"}
    offenders = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("protocol")
                and any(a.name == "encode" for a in node.names)
                and rel not in allowed
            ):
                offenders.append(rel)
    assert offenders == []


# --- the agent's pipeline and publisher ----------------------------------------------------


class FakeSource:
    """Three frames, then ended."""

    def __init__(self, frames: int = 3) -> None:
        self.frames = [
            Frame(
                index=i,
                file_frame=i,
                ts=1_800_000_000.0 + i,
                mono=0.0,
                image=np.zeros((4, 6, 3), np.uint8),
                prepared=None,
            )
            for i in range(frames)
        ]

    def set_transform(self, _transform: object) -> None:
        pass

    def get(self, timeout: float) -> Frame | None:
        return self.frames.pop(0) if self.frames else None

    @property
    def ended(self) -> bool:
        return not self.frames


class FakeDetector:
    def __init__(self, ref: str, result: list[Detection]) -> None:
        self.ref = ref
        self.result = result

    def preprocess(self, image: object) -> object:
        return image

    def infer(self, _prepared: object) -> InferenceResult:
        return InferenceResult(detections=self.result, infer_ms=1.0)


def run_pipeline(detector: FakeDetector) -> tuple[StreamPipeline, list[bytes]]:
    published: list[bytes] = []
    seq = iter(range(1, 100))
    pipeline = StreamPipeline(
        device_id="cam-1",
        config=StreamConfig(name="front", source="x.mp4", model="x.json"),
        source=cast(FrameSource, FakeSource()),
        detector=cast(Any, detector),
        publish=lambda _topic, payload: published.append(payload),
        next_seq=lambda: next(seq),
    )
    pipeline.start()
    assert pipeline.finished.wait(10), "the stream thread must run to the end of its source"
    pipeline.stop()
    return pipeline, published


def test_the_pipeline_fits_a_model_output_outside_the_bounds() -> None:
    raw = [
        Detection(label="y" * 300, score=math.nan if i == 5 else 0.99, box=(0.1, 0.1, 1.5, 0.2))
        for i in range(1500)
    ]
    pipeline, published = run_pipeline(FakeDetector("face@1.0.0", raw))
    assert len(published) == 3 and pipeline.refused == 0
    message = decode(published[0], Detections)
    assert len(message.detections) == L.MAX_DETECTIONS
    assert message.detections[0].box == (0.1, 0.1, 1.0, 0.2)
    assert message.detections[5].score == 0.0


def test_a_message_that_cannot_be_fitted_is_logged_once_and_dropped_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="agent")
    pipeline, published = run_pipeline(FakeDetector("Not A Ref", []))
    assert published == [] and pipeline.refused == 3
    assert pipeline.stats.snapshot().frames_processed == 3, "every frame was still inferred"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "$.model" in lines[0], lines


def test_the_publisher_drops_an_oversized_payload_instead_of_blocking_the_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker with the shipped packet limit disconnects a client that sends more; an
    ordered QoS 1 message over it would be re-sent and refused forever."""
    limit = L.BROKER_MESSAGE_SIZE_LIMIT + 1024
    caplog.set_level(logging.ERROR, logger="agent.publisher")
    with Mosquitto(tmp_path / "broker", extra_config=f"max_packet_size {limit}") as broker:
        sub = Subscriber(broker.port, [events_topic("cam-1")], persistent=False)
        pub = Publisher(
            device_id="cam-1",
            broker=BrokerConfig(url=broker.url),
            spool=Spool(tmp_path / "spool", max_bytes=1 << 20),
            will_payload=encode_checked(
                Status(
                    schema=1,
                    device_id="cam-1",
                    state="offline",
                    ts=1.0,
                    agent_version="1",
                    started_at=1.0,
                )
            ),
            reconnect_min_s=0.1,
        )
        pub.start()
        try:
            pub.publish_event(_with(event(), message="x" * L.BROKER_MESSAGE_SIZE_LIMIT))
            good = encode_checked(event(message="after"))
            pub.publish_event(good)
            wait_for(
                lambda: any(m.payload == good for m in sub.messages),
                timeout=15,
                what="the event queued after the oversized one",
            )
            assert [m.payload for m in sub.messages] == [good]
            assert pub.refused == 1
            assert any("over the 32768-byte limit" in r.getMessage() for r in caplog.records)
        finally:
            pub.close(timeout=2)
            sub.client.loop_stop()
            sub.client.disconnect()
