"""The protocol package: topics, strict messages, manifest, and the published JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgspec
import pytest

import protocol
from protocol import (
    Detection,
    Detections,
    Kind,
    ProtocolError,
    Status,
    decode,
    encode,
    parse_topic,
)
from protocol.jsonschema import render, schemas

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol"


def _detections(**over: object) -> Detections:
    fields: dict[str, object] = {
        "schema": 1,
        "device_id": "cam-01",
        "stream": "front",
        "seq": 7,
        "frame_ts": 1.5,
        "frame_index": 3,
        "model": "blazeface@1.0.0",
        "infer_ms": 0.6,
        "width": 640,
        "height": 480,
        "detections": [Detection(label="face", score=0.9, box=(0.1, 0.2, 0.3, 0.4))],
    }
    fields.update(over)
    return Detections(**fields)  # type: ignore[arg-type]


def test_topics_round_trip_for_every_kind() -> None:
    for kind in Kind:
        stream = "front" if kind in (Kind.DETECTIONS, Kind.SNAPSHOT) else None
        text = protocol.topic("cam-01", kind, stream)
        assert text.startswith("edgefleet/v1/cam-01/")
        parsed = parse_topic(text)
        assert (parsed.device_id, parsed.kind, parsed.stream) == ("cam-01", kind, stream)
        assert str(parsed) == text


@pytest.mark.parametrize("device_id", ["", "Cam", "-x", "a" * 65, "a/b", "a+b", "a#", "ü"])
def test_invalid_device_ids_are_rejected_with_the_rule(device_id: str) -> None:
    with pytest.raises(ProtocolError, match="1-64 characters"):
        protocol.validate_device_id(device_id)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("other/v1/cam/status", "not under"),
        ("edgefleet/v1/cam/unknown", "unknown kind"),
        ("edgefleet/v1/cam/detections", "end with /detections"),
        ("edgefleet/v1/cam/status/extra", "no further levels"),
        ("edgefleet/v1/CAM/status", "invalid device id"),
    ],
)
def test_parse_topic_names_the_bad_part(text: str, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        parse_topic(text)


def test_subscription_filters_and_shared_groups() -> None:
    assert protocol.subscription(Kind.STATUS) == "edgefleet/v1/+/status"
    assert protocol.subscription(Kind.DETECTIONS) == "edgefleet/v1/+/detections/+"
    assert (
        protocol.subscription(Kind.TELEMETRY, shared_group="ctl")
        == "$share/ctl/edgefleet/v1/+/telemetry"
    )


def test_messages_round_trip_and_carry_the_schema_version() -> None:
    msg = _detections()
    raw = encode(msg)
    assert json.loads(raw)["schema"] == 1
    assert decode(raw, Detections) == msg


def test_unknown_field_is_rejected_with_its_name() -> None:
    raw = json.loads(encode(_detections()))
    raw["colour"] = "red"
    with pytest.raises(ProtocolError, match="colour"):
        decode(json.dumps(raw), Detections)


def test_missing_field_is_rejected_with_its_name() -> None:
    raw = json.loads(encode(_detections()))
    del raw["seq"]
    with pytest.raises(ProtocolError, match="seq"):
        decode(json.dumps(raw), Detections)


def test_wrong_schema_version_and_bad_json_are_rejected() -> None:
    raw = json.loads(encode(_detections()))
    raw["schema"] = 2
    with pytest.raises(ProtocolError, match="schema"):
        decode(json.dumps(raw), Detections)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode(b"{nope", Status)


def test_generated_schemas_validate_real_messages_and_reject_bad_ones() -> None:
    docs = schemas()
    validator = jsonschema.Draft202012Validator(docs["detections.schema.json"])
    good = json.loads(encode(_detections()))
    validator.validate(good)
    bad = dict(good, extra=1)
    assert not validator.is_valid(bad)
    missing = {k: v for k, v in good.items() if k != "model"}
    assert not validator.is_valid(missing)


def test_docs_protocol_schemas_are_in_sync_with_the_code() -> None:
    expected = render()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in DOCS.glob("*.schema.json")}
    assert set(on_disk) == set(expected), "run `make schemas` and commit docs/protocol"
    for name, text in expected.items():
        assert on_disk[name] == text, (
            f"{name} is stale: run `make schemas` and commit docs/protocol"
        )


def test_manifest_rejects_path_traversal_and_unlisted_model() -> None:
    base = json.loads(
        (
            Path(protocol.__file__).parent.parent / "inference/assets/blazeface-short-int8.json"
        ).read_text()
    )
    protocol.decode_manifest(json.dumps(base))
    evil = dict(base, model="../../etc/passwd")
    with pytest.raises(ProtocolError, match="unsafe path"):
        protocol.decode_manifest(json.dumps(evil))
    unlisted = dict(base, model="other.tflite")
    with pytest.raises(ProtocolError, match="not listed"):
        protocol.decode_manifest(json.dumps(unlisted))
    bad_decoder = dict(base, decoder={"type": "nope"})
    with pytest.raises(ProtocolError, match="invalid model manifest"):
        protocol.decode_manifest(json.dumps(bad_decoder))


def test_manifest_canonical_encoding_is_stable() -> None:
    base = (
        Path(protocol.__file__).parent.parent / "inference/assets/blazeface-short-int8.json"
    ).read_bytes()
    m = protocol.decode_manifest(base)
    assert protocol.encode_manifest(m) == protocol.encode_manifest(
        protocol.decode_manifest(protocol.encode_manifest(m))
    )
    assert msgspec.json.decode(protocol.encode_manifest(m))["name"] == "blazeface-short-int8"
