"""MQTT plumbing of the simulator: a paho v5 client, connecting it to a broker URL (parsed by
:func:`protocol.broker.parse_broker_url`), and the scheduler that runs OTA steps off the
network thread."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from protocol.broker import parse_broker_url

log = logging.getLogger(__name__)


def mqtt_client(client_id: str, username: str | None, password: str | None) -> Any:
    """A paho MQTT v5 client (callback API 2), with credentials when ``username`` is set."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    return client


def connect(client: Any, broker_url: str, *, keepalive: int) -> None:
    """Connect ``client`` to ``mqtt://host[:port]`` (``mqtts://``: TLS with the system's CAs);
    :class:`protocol.ProtocolError` for a malformed URL."""
    address = parse_broker_url(broker_url)
    if address.tls:
        client.tls_set()
    client.connect(address.host, address.port, keepalive=keepalive)


class Scheduler:
    """One thread running callbacks at their due time (``time.monotonic``)."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("simulated device step failed")
