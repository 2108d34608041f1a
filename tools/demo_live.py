"""What a third-party MQTT subscriber sees during the demo (:mod:`tools.demo`): sampled
detections of one device, every model switch and every OTA event, printed live."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import Detections, Event, Kind, ProtocolError, decode, subscription
from protocol.broker import parse_broker_url


class LivePrinter:
    """What a third-party subscriber sees: detections (sampled), model switches, OTA events."""

    def __init__(
        self, url: str, username: str | None, password: str | None, *, sampled: str
    ) -> None:
        """``sampled``: the device whose detections are printed (every 5th frame and every
        change between face and no face)."""
        address = parse_broker_url(url)
        self.sampled = sampled
        self.frames = 0
        self.faces = 0
        self.verbose = True
        """Print sampled detections; model switches and OTA events are always printed."""
        self._lock = threading.Lock()
        self._last_had_face: dict[str, bool] = {}
        self._model: dict[str, str] = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = lambda c, *_: c.subscribe(
            [(subscription(Kind.DETECTIONS), 1), (subscription(Kind.EVENTS), 1)]
        )
        self._client.on_message = self._on_message
        self._client.connect(address.host, address.port)
        self._client.loop_start()

    def models(self) -> dict[str, str]:
        with self._lock:
            return dict(self._model)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic.endswith("/events"):
                self._event(decode(bytes(msg.payload), Event))
            else:
                self._detections(msg.topic, decode(bytes(msg.payload), Detections))
        except ProtocolError as err:
            print(f"  (bad message on {msg.topic}: {err})")

    def _event(self, ev: Event) -> None:
        if not ev.code.startswith("ota."):
            return
        colour = {"info": "34", "warning": "33", "error": "31"}[ev.level]
        reason = ev.details.get("reason")
        extra = f" [{reason}]" if reason else ""
        print(f"  \033[{colour}m{ev.device_id} {ev.code}{extra}\033[0m  {ev.message}", flush=True)

    def _detections(self, topic: str, det: Detections) -> None:
        with self._lock:
            self.frames += 1
            has_face = bool(det.detections)
            self.faces += has_face
            before = self._model.get(det.device_id)
            self._model[det.device_id] = det.model
            changed = has_face != self._last_had_face.get(det.device_id)
            self._last_had_face[det.device_id] = has_face
        if before is not None and before != det.model:
            print(
                f"  \033[1;35m{det.device_id} now runs {det.model}\033[0m (was {before}; "
                f"frame {det.frame_index}, no restart)",
                flush=True,
            )
        if not self.verbose or det.device_id != self.sampled:
            return
        if det.frame_index % 5 and not changed:
            return
        if det.detections:
            d = det.detections[0]
            box = ", ".join(f"{v:.2f}" for v in d.box)
            what = f"\033[32m{d.label} {d.score:.2f}\033[0m box [{box}]"
        else:
            what = "\033[2mno face\033[0m"
        print(
            f"  {topic}  seq {det.seq:5d}  frame {det.frame_index:3d}  {what}  "
            f"({det.infer_ms:.2f} ms, {det.model})",
            flush=True,
        )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
