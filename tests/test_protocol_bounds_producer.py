"""The producer's side of the protocol's bounds (protocol.limits): ``encode_checked`` refuses
what a consumer would refuse, ``fit`` repairs what it can, and the agent never publishes a
message outside the bounds, from this machine's facts to its pipeline and publisher."""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path
from typing import Any, cast

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
    Detection,
    Detections,
    InvalidMessage,
    Status,
    StreamStatus,
    Telemetry,
    decode,
    encode,
    encode_checked,
    events_topic,
    fit,
)
from protocol import limits as L
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.protocol_bounds_support import (
    detections,
    event,
    stream_telemetry,
    telemetry,
    with_fields,
)
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


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

    def set_retrieve(self, _retrieve: object) -> None:
        pass

    def get_any(self, timeout: float) -> Frame | None:
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
            pub.publish_event(with_fields(event(), message="x" * L.BROKER_MESSAGE_SIZE_LIMIT))
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
