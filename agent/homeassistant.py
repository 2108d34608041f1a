"""Home Assistant MQTT discovery messages for a device's streams (opt-in, pure builders).

For every stream the agent announces two entities, per the Home Assistant MQTT discovery
docs (https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery):

- ``sensor.edgefleet_{device}_{stream}_count``: objects in the last published frame
  (``value_json.detections | length`` of the detections topic);
- ``binary_sensor.edgefleet_{device}_{stream}_detected`` (device_class occupancy): ON
  while the last frame had detections, OFF after ``off_delay_s`` without any (the agent
  publishes frames without detections only with ``publish_empty``);
- with ``[snapshots] enabled``, ``camera.edgefleet_{device}_{stream}_snapshot``: the latest
  snapshot, the raw JPEG on ``edgefleet/v1/{device}/snapshot/{stream}/jpeg`` (Home
  Assistant's MQTT camera reads image bytes, not JSON).

Both read availability from the retained status topic (``value_json.state``: online /
offline, the broker's last will sets offline). Discovery configs are published retained,
so Home Assistant picks them up whenever it (re)starts; ``removal_messages`` clears them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from protocol import detections_topic, snapshot_jpeg_topic, status_topic, validate_device_id

DISCOVERY_PREFIX = "homeassistant"
MANUFACTURER = "edgefleet"

COUNT_TEMPLATE = "{{ value_json.detections | length }}"
DETECTED_TEMPLATE = "{{ 'ON' if value_json.detections | length > 0 else 'OFF' }}"
AVAILABILITY_TEMPLATE = "{{ value_json.state }}"


class DiscoveryMessage(NamedTuple):
    """One retained discovery config to publish."""

    topic: str
    payload: bytes
    retain: bool = True


def _slug(value: str) -> str:
    """Entity ids allow a-z, 0-9 and '_' only; our ids may also contain '-'."""
    return value.replace("-", "_")


def _object_id(device_id: str, stream: str, suffix: str) -> str:
    return f"edgefleet_{_slug(device_id)}_{_slug(stream)}_{suffix}"


def discovery_topic(
    component: str, device_id: str, stream: str, suffix: str, *, prefix: str = DISCOVERY_PREFIX
) -> str:
    """``{prefix}/{component}/{device_id}/{stream}_{suffix}/config``.

    The device id is Home Assistant's optional ``node_id`` level, so a broker ACL can let each
    device write only its own discovery topics (``pattern write homeassistant/+/%u/+/config``).
    """
    return f"{prefix}/{component}/{device_id}/{stream}_{suffix}/config"


def _common(
    *,
    device_id: str,
    stream: str,
    component: str,
    suffix: str,
    name: str,
    agent_version: str,
    device_model: str,
) -> dict[str, Any]:
    object_id = _object_id(device_id, stream, suffix)
    return {
        "name": name,
        "unique_id": object_id,
        "default_entity_id": f"{component}.{object_id}",
        "state_topic": detections_topic(device_id, stream),
        "qos": 1,
        "availability": [
            {
                "topic": status_topic(device_id),
                "value_template": AVAILABILITY_TEMPLATE,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "device": {
            "identifiers": [f"edgefleet_{device_id}"],
            "name": device_id,
            "manufacturer": MANUFACTURER,
            "model": device_model,
            "sw_version": agent_version,
        },
        "origin": {"name": "edgefleet", "sw_version": agent_version},
    }


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def count_sensor_config(
    *,
    device_id: str,
    stream: str,
    agent_version: str,
    device_model: str = "edgefleet agent",
) -> dict[str, Any]:
    """The discovery config of the object-count sensor of one stream."""
    config = _common(
        device_id=device_id,
        stream=stream,
        component="sensor",
        suffix="count",
        name=f"{stream} objects",
        agent_version=agent_version,
        device_model=device_model,
    )
    config.update(
        value_template=COUNT_TEMPLATE,
        state_class="measurement",
        unit_of_measurement="objects",
        icon="mdi:cctv",
    )
    return config


def detected_sensor_config(
    *,
    device_id: str,
    stream: str,
    agent_version: str,
    device_model: str = "edgefleet agent",
    off_delay_s: int = 5,
) -> dict[str, Any]:
    """The discovery config of the "something detected" binary sensor of one stream."""
    config = _common(
        device_id=device_id,
        stream=stream,
        component="binary_sensor",
        suffix="detected",
        name=f"{stream} detected",
        agent_version=agent_version,
        device_model=device_model,
    )
    config.update(
        device_class="occupancy",
        value_template=DETECTED_TEMPLATE,
        payload_on="ON",
        payload_off="OFF",
    )
    if off_delay_s > 0:
        config["off_delay"] = off_delay_s
    return config


def camera_config(
    *,
    device_id: str,
    stream: str,
    agent_version: str,
    device_model: str = "edgefleet agent",
) -> dict[str, Any]:
    """The discovery config of the snapshot camera of one stream (``[snapshots]``)."""
    config = _common(
        device_id=device_id,
        stream=stream,
        component="camera",
        suffix="snapshot",
        name=f"{stream} snapshot",
        agent_version=agent_version,
        device_model=device_model,
    )
    del config["state_topic"], config["qos"]
    config.update(topic=snapshot_jpeg_topic(device_id, stream), icon="mdi:cctv")
    return config


def discovery_messages(
    *,
    device_id: str,
    streams: Sequence[str],
    agent_version: str,
    device_model: str = "edgefleet agent",
    off_delay_s: int = 5,
    prefix: str = DISCOVERY_PREFIX,
    cameras: bool = False,
) -> list[DiscoveryMessage]:
    """Retained discovery configs (sensor + binary_sensor, and a camera with ``cameras``:
    ``[snapshots] enabled``) for every stream of a device."""
    validate_device_id(device_id)
    messages: list[DiscoveryMessage] = []
    for stream in streams:
        count = count_sensor_config(
            device_id=device_id,
            stream=stream,
            agent_version=agent_version,
            device_model=device_model,
        )
        detected = detected_sensor_config(
            device_id=device_id,
            stream=stream,
            agent_version=agent_version,
            device_model=device_model,
            off_delay_s=off_delay_s,
        )
        messages.append(
            DiscoveryMessage(
                discovery_topic("sensor", device_id, stream, "count", prefix=prefix),
                _encode(count),
            )
        )
        messages.append(
            DiscoveryMessage(
                discovery_topic("binary_sensor", device_id, stream, "detected", prefix=prefix),
                _encode(detected),
            )
        )
        if cameras:
            camera = camera_config(
                device_id=device_id,
                stream=stream,
                agent_version=agent_version,
                device_model=device_model,
            )
            messages.append(
                DiscoveryMessage(
                    discovery_topic("camera", device_id, stream, "snapshot", prefix=prefix),
                    _encode(camera),
                )
            )
    return messages


def removal_messages(
    *,
    device_id: str,
    streams: Sequence[str],
    prefix: str = DISCOVERY_PREFIX,
    cameras: bool = False,
) -> list[DiscoveryMessage]:
    """Empty retained payloads that make Home Assistant remove the entities again
    (``cameras``: the snapshot cameras too)."""
    validate_device_id(device_id)
    messages: list[DiscoveryMessage] = []
    for stream in streams:
        detections_topic(device_id, stream)  # validates the stream name
        for component, suffix in (
            ("sensor", "count"),
            ("binary_sensor", "detected"),
            *((("camera", "snapshot"),) if cameras else ()),
        ):
            messages.append(
                DiscoveryMessage(
                    discovery_topic(component, device_id, stream, suffix, prefix=prefix), b""
                )
            )
    return messages
