"""A test subscriber: collects (topic, payload) pairs from a real broker and lets tests wait."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.waiting import wait_for


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool


class Subscriber:
    """QoS 1 subscriber with a persistent session (survives a broker restart with persistence)."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        persistent: bool = True,
        client_id: str | None = None,
        client_class: type[mqtt.Client] = mqtt.Client,
    ) -> None:
        """``client_id``: to come back to a persistent session (default: a new one);
        ``client_class``: a paho ``Client`` subclass under test."""
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._subscribed = threading.Event()
        self.client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(
            "127.0.0.1", port, keepalive=10, clean_start=not persistent, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("test subscriber did not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), bool(msg.retain), bool(msg.dup))
            )
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; returns the messages at that moment."""
        with self._cond:
            wait_for(
                lambda: predicate(self.messages),
                timeout=timeout,
                what=lambda: (
                    f"the messages to match; got {len(self.messages)}, "
                    f"last topics {[m.topic for m in self.messages[-5:]]}"
                ),
                condition=self._cond,
            )
            return list(self.messages)

    def on(self, suffix: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def payloads(self, topic: str) -> list[bytes]:
        """Payloads on ``topic`` in arrival order, without the broker's own re-deliveries.

        When the BROKER restarts, it re-sends (with DUP set) the messages it had sent to this
        subscriber but whose PUBACK it had not processed yet: subscriber-side QoS 1
        duplicates, unrelated to the publisher. Those are left out; any other duplicate or any
        reordering stays in.
        """
        with self._cond:
            seen: set[bytes] = set()
            out: list[bytes] = []
            for m in self.messages:
                if m.topic != topic or (m.dup and m.payload in seen):
                    continue
                seen.add(m.payload)
                out.append(m.payload)
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
