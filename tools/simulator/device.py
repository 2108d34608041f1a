"""One simulated device with its own MQTT connection and last will (:class:`SimulatedDevice`);
with an :class:`~tools.simulator.ota.OtaBehaviour` it acts on its desired state."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from protocol import (
    desired_topic,
    encode,
    events_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
)
from tools.simulator.messages import (
    DEFAULT_MODEL,
    event_message,
    reported_message,
    status_message,
    telemetry_message,
)
from tools.simulator.mqtt import Scheduler, connect, mqtt_client
from tools.simulator.ota import DeviceOta, OtaBehaviour, Step, decode_desired


class SimulatedDevice:
    """One simulated device with its own MQTT connection and last will."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        username: str | None = None,
        password: str | None = None,
        streams: Sequence[str] = ("cam0",),
        model: str | None = DEFAULT_MODEL,
        telemetry_interval_s: float = 10.0,
        keepalive_s: int = 10,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        ota: OtaBehaviour | None = None,
    ) -> None:
        """``ota``: act on the desired state (see :mod:`tools.simulator`); None: ignore it."""
        self.device_id = device_id
        self.broker_url = broker_url
        self.streams = tuple(streams)
        self.model = model
        self.telemetry_interval_s = telemetry_interval_s
        self.keepalive_s = keepalive_s
        self.clock = clock
        self.rng = random.Random(seed)
        self.started_at = clock()
        self.sent = 0
        self._connected = threading.Event()
        self.ota: DeviceOta | None = None
        self._scheduler: Scheduler | None = None
        if ota is not None:
            self.ota = DeviceOta(
                device_id, streams=self.streams, baseline=model, behaviour=ota, seed=seed or 0
            )
        self._client = mqtt_client(f"sim-{device_id}", username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        will = status_message(
            device_id,
            state="offline",
            ts=self.started_at,
            started_at=self.started_at,
            streams=self.streams,
            model=model,
        )
        self._client.will_set(status_topic(device_id), encode(will), qos=1, retain=True)

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            if self.ota is not None:
                client.subscribe(desired_topic(self.device_id), qos=1)
            self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        """A desired state (network thread): schedule its steps, never block here."""
        desired = decode_desired(self.device_id, msg.payload)
        if desired is None or self.ota is None:
            return
        steps = self.ota.on_desired(desired)
        if not steps:
            return
        if self._scheduler is None:
            self._scheduler = Scheduler(f"sim-{self.device_id}")
        self._schedule(steps, 0.0)

    def _schedule(self, steps: list[Step], delay: float) -> None:
        assert self.ota is not None
        assert self._scheduler is not None
        ota = self.ota
        self._scheduler.call_later(delay, lambda: self.publish_reported(wait=False))
        phase_delay = ota.behaviour.phase_delay_s
        for i, step in enumerate(steps, start=1):

            def run(step: Step = step) -> None:
                if ota.apply(step):
                    self.publish_reported(wait=False)

            self._scheduler.call_later(delay + i * phase_delay, run)

    def connect(self, timeout: float = 10.0) -> None:
        connect(self._client, self.broker_url, keepalive=self.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise TimeoutError(f"{self.device_id}: no CONNACK from {self.broker_url}")

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(timeout=10)
        self.sent += 1

    def publish_status(self, state: str = "online") -> None:
        msg = status_message(
            self.device_id,
            state=state,
            ts=self.clock(),
            started_at=self.started_at,
            streams=self.streams,
            model=self.model,
        )
        self._publish(status_topic(self.device_id), encode(msg), retain=True)

    def publish_reported(self, *, desired_rev: int | None = None, wait: bool = True) -> None:
        if self.ota is not None:
            payload = encode(self.ota.reported(self.clock()))
            self._publish(reported_topic(self.device_id), payload, retain=True, wait=wait)
            return
        msg = reported_message(
            self.device_id,
            ts=self.clock(),
            streams=self.streams,
            model=self.model,
            desired_rev=desired_rev,
        )
        self._publish(reported_topic(self.device_id), encode(msg), retain=True)

    def publish_telemetry(self, *, wait: bool = True) -> None:
        if self.ota is not None:
            tele = self.ota.telemetry(self.clock(), self.telemetry_interval_s)
            self._publish(telemetry_topic(self.device_id), encode(tele), wait=wait)
            return
        msg = telemetry_message(
            self.device_id,
            ts=self.clock(),
            rng=self.rng,
            streams=self.streams,
            interval_s=self.telemetry_interval_s,
        )
        self._publish(telemetry_topic(self.device_id), encode(msg), wait=wait)

    def publish_event(self, code: str, *, level: str = "info", message: str = "") -> None:
        msg = event_message(
            self.device_id, ts=self.clock(), code=code, level=level, message=message
        )
        self._publish(events_topic(self.device_id), encode(msg))

    def announce(self) -> None:
        """What an agent does after connecting: online status, reported state, first telemetry."""
        self.publish_status("online")
        self.publish_reported()
        self.publish_telemetry()

    def stop(self, *, graceful: bool = True) -> None:
        """Graceful: publish ``offline`` and disconnect (no will); else just drop the socket."""
        if self._scheduler is not None:
            self._scheduler.stop()
        if graceful and self._connected.is_set():
            self.publish_status("offline")
            self._client.disconnect()
        self._client.loop_stop()
