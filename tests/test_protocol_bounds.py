"""The protocol's bounds (protocol.limits): declared once, carried by the message types and
their JSON Schemas, refused by consumers. What producers do with them (``encode_checked``,
``fit``, the agent's messages) is tests/test_protocol_bounds_producer.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import jsonschema
import msgspec
import pytest

from protocol import (
    MESSAGE_TYPES,
    Desired,
    Detection,
    Event,
    Gate,
    GateEvidence,
    InvalidMessage,
    ModelRef,
    ProtocolError,
    Snapshot,
    Status,
    StreamReport,
    StreamStatus,
    check_payload,
    decode,
    decode_manifest,
    encode,
    encode_checked,
    validate_device_id,
)
from protocol import limits as L
from protocol.jsonschema import schemas
from tests.protocol_bounds_support import (
    BIG,
    REF,
    F,
    detections,
    event,
    reported,
    stream_telemetry,
    telemetry,
    uid,
    with_fields,
)

# --- the findings ------------------------------------------------------------------------

FINDINGS: list[tuple[str, str, Callable[[], bytes], str, str]] = [
    (
        "10 MB event",
        "events",
        lambda: with_fields(event(), message="x" * 10_000_000),
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
    ("ts = 1e300", "telemetry", lambda: with_fields(telemetry(), ts=1e300), "out_of_bounds", "ts"),
    (
        "negative spool_depth",
        "telemetry",
        lambda: with_fields(telemetry(), spool_depth=-1),
        "out_of_bounds",
        "spool_depth",
    ),
    (
        "desired_rev = -2^63",
        "reported",
        lambda: with_fields(reported(), desired_rev=-(2**63)),
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
        check_payload("events", with_fields(event(), device_id=value))
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
    payload = with_fields(event(), ts=ts)
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
    payload = with_fields(telemetry(), cpu_percent=0).replace(
        b'"cpu_percent":0', b'"cpu_percent":' + raw
    )
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
        decode(with_fields(event(), device_id="Cam 1"), Event)
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
