"""Home Assistant MQTT discovery configs (agent.homeassistant)."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import jsonschema
import pytest

from agent.homeassistant import (
    DiscoveryMessage,
    discovery_messages,
    removal_messages,
)
from protocol import (
    SCHEMA_VERSION,
    Detection,
    Detections,
    ProtocolError,
    Status,
    detections_topic,
    encode,
    status_topic,
)

# Configuration variables documented on https://www.home-assistant.io/integrations/sensor.mqtt/
# ("Configuration Variables"), as of Home Assistant 2025.10+ (default_entity_id replaces the
# deprecated object_id).
SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "device_class", "enabled_by_default", "encoding",
    "entity_category", "entity_picture", "expire_after", "force_update", "icon",
    "json_attributes_template", "json_attributes_topic", "last_reset_value_template", "name",
    "object_id", "options", "payload_available", "payload_not_available", "platform", "qos",
    "state_class", "state_topic", "suggested_display_precision", "unique_id",
    "unit_of_measurement", "value_template",
}  # fmt: skip
# https://www.home-assistant.io/integrations/binary_sensor.mqtt/ ("Configuration Variables").
BINARY_SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "device_class", "enabled_by_default", "encoding",
    "entity_category", "entity_picture", "expire_after", "force_update", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "object_id", "off_delay",
    "payload_available", "payload_not_available", "payload_off", "payload_on", "platform",
    "qos", "state_topic", "unique_id", "value_template",
}  # fmt: skip
# Both pages: the keys of one `availability` list item and of the `device` map.
AVAILABILITY_ITEM_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
# https://www.home-assistant.io/integrations/mqtt/ ("Discovery messages", origin info): an
# optional `origin` map on every discovery payload; `name` is required inside it.
ORIGIN_KEYS = {"name", "sw_version", "support_url"}


def _schema(keys: set[str]) -> dict[str, Any]:
    strings = {"type": "string", "minLength": 1}
    props: dict[str, Any] = {k: {} for k in keys | {"origin"}}
    props.update(
        state_topic=strings,
        name=strings,
        unique_id=strings,
        default_entity_id={"type": "string", "pattern": r"^[a-z_]+\.[a-z0-9_]+$"},
        qos={"enum": [0, 1, 2]},
        availability={
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["topic"],
                "additionalProperties": False,
                "properties": {k: strings for k in AVAILABILITY_ITEM_KEYS},
            },
        },
        device={
            "type": "object",
            "required": ["identifiers"],
            "additionalProperties": False,
            "properties": {
                **{k: strings for k in DEVICE_KEYS},
                "identifiers": {"type": "array", "items": strings, "minItems": 1},
            },
        },
        origin={
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {k: strings for k in ORIGIN_KEYS},
        },
    )
    return {
        "type": "object",
        "required": ["state_topic"],
        "additionalProperties": False,
        "properties": props,
    }


SENSOR_SCHEMA = _schema(SENSOR_KEYS)
BINARY_SENSOR_SCHEMA = _schema(BINARY_SENSOR_KEYS)
BINARY_SENSOR_SCHEMA["properties"]["device_class"] = {"const": "occupancy"}


def _messages() -> list[DiscoveryMessage]:
    return discovery_messages(
        device_id="cam-01", streams=["front", "back_yard"], agent_version="0.1.0"
    )


def _by_topic() -> dict[str, dict[str, Any]]:
    return {m.topic: json.loads(m.payload) for m in _messages()}


def _render(template: str, payload: bytes) -> str:
    env = jinja2.Environment(autoescape=False)
    return env.from_string(template).render(value_json=json.loads(payload))


def _detections(n: int) -> bytes:
    return encode(
        Detections(
            schema=SCHEMA_VERSION,
            device_id="cam-01",
            stream="front",
            seq=7,
            frame_ts=1_700_000_000.0,
            frame_index=42,
            model="blazeface@1",
            infer_ms=0.6,
            width=640,
            height=480,
            detections=[
                Detection(label="face", score=0.9, box=(0.1, 0.1, 0.2, 0.2)) for _ in range(n)
            ],
        )
    )


def test_each_stream_gets_a_count_sensor_and_a_detected_binary_sensor_on_ha_topics() -> None:
    topics = [m.topic for m in _messages()]
    assert topics == [
        "homeassistant/sensor/cam-01/front_count/config",
        "homeassistant/binary_sensor/cam-01/front_detected/config",
        "homeassistant/sensor/cam-01/back_yard_count/config",
        "homeassistant/binary_sensor/cam-01/back_yard_detected/config",
    ]
    assert all(m.retain for m in _messages())


def test_payloads_use_only_documented_home_assistant_keys() -> None:
    for topic, payload in _by_topic().items():
        schema = SENSOR_SCHEMA if "/sensor/" in topic else BINARY_SENSOR_SCHEMA
        jsonschema.validate(payload, schema)
        component = topic.split("/")[1]
        assert payload["default_entity_id"] == f"{component}.{payload['unique_id']}"
        assert "object_id" not in payload  # deprecated since Home Assistant 2025.10


def test_the_schema_would_reject_an_undocumented_key() -> None:
    payload = _by_topic()["homeassistant/sensor/cam-01/front_count/config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**payload, "value_tmpl": "x"}, SENSOR_SCHEMA)


def test_state_and_availability_are_wired_to_the_protocol_topics() -> None:
    for topic, payload in _by_topic().items():
        stream = "back_yard" if "back_yard" in topic else "front"
        assert payload["state_topic"] == detections_topic("cam-01", stream)
        (avail,) = payload["availability"]
        assert avail["topic"] == status_topic("cam-01")
        assert avail["payload_available"] == "online"
        assert avail["payload_not_available"] == "offline"
        assert payload["device"]["identifiers"] == ["edgefleet_cam-01"]
        assert payload["device"]["manufacturer"] == "edgefleet"
        assert payload["device"]["sw_version"] == "0.1.0"
        assert payload["origin"]["name"] == "edgefleet"


def test_unique_ids_differ_across_streams_and_entities() -> None:
    ids = [p["unique_id"] for p in _by_topic().values()]
    assert len(set(ids)) == len(ids) == 4


@pytest.mark.parametrize(("n", "count", "state"), [(0, "0", "OFF"), (1, "1", "ON"), (3, "3", "ON")])
def test_value_templates_render_count_and_on_off_from_a_real_detections_message(
    n: int, count: str, state: str
) -> None:
    payloads = _by_topic()
    sensor = payloads["homeassistant/sensor/cam-01/front_count/config"]
    binary = payloads["homeassistant/binary_sensor/cam-01/front_detected/config"]
    message = _detections(n)
    assert _render(sensor["value_template"], message) == count
    rendered = _render(binary["value_template"], message)
    assert rendered == state
    assert rendered in (binary["payload_on"], binary["payload_off"])


@pytest.mark.parametrize("state", ["online", "offline"])
def test_availability_template_renders_the_status_state(state: str) -> None:
    status = encode(
        Status(
            schema=SCHEMA_VERSION,
            device_id="cam-01",
            state=state,  # type: ignore[arg-type]
            ts=1.0,
            agent_version="0.1.0",
            started_at=0.0,
        )
    )
    avail = _by_topic()["homeassistant/sensor/cam-01/front_count/config"]["availability"][0]
    assert _render(avail["value_template"], status) == state


def test_removal_messages_clear_every_discovery_topic() -> None:
    removal = removal_messages(device_id="cam-01", streams=["front", "back_yard"])
    assert [m.topic for m in removal] == [m.topic for m in _messages()]
    assert all(m.payload == b"" and m.retain for m in removal)


def test_invalid_device_or_stream_names_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        discovery_messages(device_id="Cam 1", streams=["front"], agent_version="0.1.0")
    with pytest.raises(ProtocolError):
        discovery_messages(device_id="cam-01", streams=["Front Door"], agent_version="0.1.0")
