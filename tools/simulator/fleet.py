"""Many OTA-capable simulated devices over a few shared MQTT connections
(:class:`SimulatedFleet`, for benchmarks of the controller).

Phase steps run on one scheduler thread; bundle downloads (``OtaBehaviour.download``) run
on a pool of ``download_workers`` threads, so thousands of devices download at once (as a
real fleet does) instead of one after another; a device's later phases follow its download.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from protocol import (
    ProtocolError,
    desired_topic,
    encode,
    parse_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
)
from tools.simulator.messages import DEFAULT_MODEL, status_message
from tools.simulator.mqtt import Scheduler, connect, mqtt_client
from tools.simulator.ota import DeviceOta, OtaBehaviour, Step, decode_desired


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """What a fleet's devices ended with, for one model on one stream."""

    devices: int
    on_model: int
    """Devices whose stream runs the model."""
    one_rev: int
    """Devices that received exactly one desired rev carrying the model (none got two revs
    for one assignment)."""

    def __add__(self, other: FleetSummary) -> FleetSummary:
        return FleetSummary(
            self.devices + other.devices,
            self.on_model + other.on_model,
            self.one_rev + other.one_rev,
        )


class SimulatedFleet:
    """Many OTA-capable simulated devices over a few shared MQTT connections (no last wills:
    for benchmarks of the controller, not of connection handling)."""

    def __init__(
        self,
        *,
        broker_url: str,
        device_ids: Sequence[str],
        behaviour: OtaBehaviour,
        username: str | None = None,
        password: str | None = None,
        streams: Sequence[str] = ("cam0",),
        model: str | None = DEFAULT_MODEL,
        per_connection: int = 250,
        telemetry_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        download_workers: int = 64,
    ) -> None:
        self.broker_url = broker_url
        self.streams = tuple(streams)
        self.model = model
        self.telemetry_interval_s = telemetry_interval_s
        self.clock = clock
        self.devices = {
            d: DeviceOta(d, streams=streams, baseline=model, behaviour=behaviour, seed=i)
            for i, d in enumerate(device_ids)
        }
        ids = list(device_ids)
        self._groups = [ids[i : i + per_connection] for i in range(0, len(ids), per_connection)]
        self._clients: list[Any] = []
        self._owner: dict[str, Any] = {}
        self._scheduler = Scheduler("sim-fleet")
        self._downloads = ThreadPoolExecutor(download_workers, thread_name_prefix="sim-download")
        self._subscribed = threading.Semaphore(0)
        self._stopped = threading.Event()
        for n, group in enumerate(self._groups):
            client = mqtt_client(f"sim-fleet-{n}-{time.monotonic_ns() % 10**9}", username, password)
            client.max_inflight_messages_set(1000)
            client.on_message = self._on_message
            client.on_connect = self._connector(group)
            client.on_subscribe = lambda *_: self._subscribed.release()
            self._clients.append(client)
            for d in group:
                self._owner[d] = client

    def _connector(self, group: list[str]) -> Callable[..., None]:
        def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                return
            topics = [(desired_topic(d), 1) for d in group]
            for i in range(0, len(topics), 100):
                client.subscribe(topics[i : i + 100])

        return on_connect

    def connect(self, timeout: float = 30.0) -> None:
        for client in self._clients:
            connect(client, self.broker_url, keepalive=30)
            client.loop_start()
        expected = sum((len(g) + 99) // 100 for g in self._groups)
        deadline = time.monotonic() + timeout
        for _ in range(expected):
            if not self._subscribed.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"simulated fleet: not subscribed within {timeout}s")

    def _publish(self, device_id: str, topic: str, payload: bytes, *, retain: bool) -> Any:
        return self._owner[device_id].publish(topic, payload, qos=1, retain=retain)

    def announce(self) -> None:
        """Online status, reported state and a first telemetry for every device."""
        now = self.clock()
        last: Any = None
        for d, ota in self.devices.items():
            status = status_message(
                d, state="online", ts=now, started_at=now, streams=self.streams, model=self.model
            )
            self._publish(d, status_topic(d), encode(status), retain=True)
            self._publish(d, reported_topic(d), encode(ota.reported(now)), retain=True)
            last = self._publish(
                d,
                telemetry_topic(d),
                encode(ota.telemetry(now, self.telemetry_interval_s)),
                retain=False,
            )
        if last is not None:
            last.wait_for_publish(timeout=60)

    def publish_telemetry(self) -> None:
        now = self.clock()
        for d, ota in self.devices.items():
            self._publish(
                d,
                telemetry_topic(d),
                encode(ota.telemetry(now, self.telemetry_interval_s)),
                retain=False,
            )

    def start_telemetry(self, interval_s: float) -> None:
        """Publish every device's telemetry every ``interval_s`` until :meth:`stop`."""

        def loop() -> None:
            while not self._stopped.wait(interval_s):
                self.publish_telemetry()

        threading.Thread(target=loop, name="sim-telemetry", daemon=True).start()

    def summary(self, model: str, stream: str = "cam0") -> FleetSummary:
        devices = list(self.devices.values())
        return FleetSummary(
            devices=len(devices),
            on_model=sum(1 for d in devices if d.streams[stream]["active"] == model),
            one_rev=sum(1 for d in devices if len(d.revs_with(model)) == 1),
        )

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            device_id = parse_topic(msg.topic).device_id
        except ProtocolError:
            return
        ota = self.devices.get(device_id)
        desired = decode_desired(device_id, msg.payload)
        if ota is None or desired is None:
            return
        steps = ota.on_desired(desired)
        if not steps:
            return
        self._scheduler.call_later(0.0, lambda: self._report(device_id))
        self._schedule(device_id, ota, steps)

    def _schedule(self, device_id: str, ota: DeviceOta, steps: list[Step]) -> None:
        """One step per phase delay; a download goes to the pool, the rest follow it."""
        delay = ota.behaviour.phase_delay_s
        for i, step in enumerate(steps):

            def run(step: Step = step) -> None:
                if ota.apply(step):
                    self._report(device_id)

            if step[2] == "download":

                def download(step: Step = step, rest: list[Step] = steps[i + 1 :]) -> None:
                    run(step)
                    self._schedule(device_id, ota, rest)

                self._scheduler.call_later(
                    (i + 1) * delay, functools.partial(self._submit, download)
                )
                return
            self._scheduler.call_later((i + 1) * delay, run)

    def _submit(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # stopped
            self._downloads.submit(fn)

    def _report(self, device_id: str) -> None:
        ota = self.devices[device_id]
        self._publish(
            device_id, reported_topic(device_id), encode(ota.reported(self.clock())), retain=True
        )

    def stop(self) -> None:
        self._stopped.set()
        self._scheduler.stop()
        self._downloads.shutdown(wait=False, cancel_futures=True)
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
