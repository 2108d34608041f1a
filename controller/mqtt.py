"""The controller's MQTT v5 connection: subscribes to what the devices publish and
publishes their retained desired states.

paho-mqtt 2.x runs the network loop on its own thread, reading its socket in chunks
(:mod:`controller.mqtt_reads`); ``on_message`` only hands the topic and payload to the
ingestor (decode + enqueue). The session is persistent
(``clean_start`` false with a session expiry), so QoS 1 messages published while the
controller restarts are queued by the broker and delivered when it comes back.
``publish_confirmed`` publishes QoS 1 messages and reports which ones the broker
acknowledged (PUBACK without an error reason code).

With ``manual_ack`` the PUBACK of a received QoS 1 message is not sent when ``on_message``
returns but when the handler calls the ``ack`` it is given (the ingestor does after the
database commit), so a replica killed with messages in memory leaves them unacknowledged
in its broker session, to be delivered again.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controller.errors import BrokerError
from protocol import Kind, ProtocolError, subscription
from protocol.broker import BrokerAddress, parse_broker_url

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how to connect; built by the service from the config."""

    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    session_expiry_s: int = 3600
    shared_group: str | None = None

    @property
    def address(self) -> BrokerAddress:
        try:
            return parse_broker_url(self.url)
        except ProtocolError as err:
            raise BrokerError(f"mqtt.url: {err}") from err

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def tls(self) -> bool:
        return self.address.tls

    @property
    def port(self) -> int:
        return self.address.port


class MqttSubscriber:
    """Connect, subscribe to ``kinds`` of every device and pass messages to ``on_message``."""

    def __init__(
        self,
        *,
        settings: MqttSettings,
        kinds: tuple[Kind, ...],
        on_message: Callable[..., object],
        on_connection_change: Callable[[bool], None] | None = None,
        on_session: Callable[[bool], None] | None = None,
        manual_ack: bool = False,
        will: tuple[str, bytes] | None = None,
        extra_filters: Sequence[str] = (),
    ) -> None:
        """``on_session(session_present)`` runs on every successful connect (network thread);
        ``manual_ack``: ``on_message(topic, payload, ack)``, see the module doc; ``will``: a
        (topic, payload) last will, retained; ``extra_filters``: more (unshared) filters."""
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        from controller.mqtt_reads import ChunkedReadClient

        self.settings = settings
        self.kinds = kinds
        self._handler = on_message
        self._on_change = on_connection_change
        self._on_session = on_session
        self._manual_ack = manual_ack
        self._connected = threading.Event()
        self._refused_pubs: dict[int, str] = {}
        self._pub_lock = threading.Lock()
        self._stopping = False
        self._refused: str | None = None
        self.filters = [
            subscription(kind, shared_group=settings.shared_group) for kind in self.kinds
        ]
        self.filters += list(extra_filters)
        client = ChunkedReadClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as err:
                raise BrokerError(
                    f"cannot set up TLS for {settings.url}: {err}; check broker.ca_file, "
                    "broker.cert_file and broker.key_file"
                ) from err
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, *, wait: bool = True) -> None:
        """Connect in the background; with ``wait``, raise BrokerError if that fails in time."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        s = self.settings
        try:
            self._client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as err:
            raise BrokerError(f"cannot connect to the MQTT broker at {s.url}: {err}") from err
        self._client.loop_start()
        if wait and not self._connected.wait(s.connect_timeout_s):
            why = self._refused or "no answer"
            self.stop()
            raise BrokerError(
                f"cannot connect to the MQTT broker at {s.url} within {s.connect_timeout_s:.0f}s "
                f"({why}); check broker.url, the credentials and that the broker is running"
            )

    def publish_confirmed(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        qos: int = 1,
        retain: bool = True,
        timeout: float = 10.0,
    ) -> list[bool]:
        """Publish ``(topic, payload)`` pairs; True for each the broker acknowledged within
        ``timeout`` (all False at once while disconnected: nothing is queued in paho then)."""
        from paho.mqtt.enums import MQTTErrorCode

        if not self.connected:
            return [False] * len(messages)
        infos: list[Any] = []
        for topic, payload in messages:
            try:
                infos.append(self._client.publish(topic, payload, qos=qos, retain=retain))
            except ValueError as err:  # a topic or payload paho refuses: a bug, not the network
                log.error("cannot publish on %s: %s", topic, err)
                infos.append(None)
        deadline = time.monotonic() + timeout
        acked = []
        for (topic, _), info in zip(messages, infos, strict=True):
            ok = False
            if info is not None and info.rc in (
                MQTTErrorCode.MQTT_ERR_SUCCESS,
                MQTTErrorCode.MQTT_ERR_AGAIN,
            ):
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                    ok = info.is_published()
                except (RuntimeError, ValueError):
                    ok = False
                with self._pub_lock:
                    refused = self._refused_pubs.pop(info.mid, None)
                if refused is not None:
                    log.error(
                        "the MQTT broker refused the message on %s (%s); check its ACL: the "
                        "controller must be allowed to publish edgefleet/v1/+/desired",
                        topic,
                        refused,
                    )
                    ok = False
            acked.append(ok)
        return acked

    def publish_nowait(self, topic: str, payload: bytes) -> None:
        """Queue a retained QoS 1 message without waiting (safe on the network thread)."""
        self._client.publish(topic, payload, qos=1, retain=True)

    def unsubscribe(self, filters: Sequence[str]) -> None:
        """Stop receiving on ``filters`` (messages already queued in the session still come)."""
        if filters:
            self._client.unsubscribe(list(filters))

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect; ``end_session``: tell the broker to drop the session now (session
        expiry 0), with whatever it still queues for it."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._stopping = True
        props = None
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()
        self._set_connected(False)

    # paho callbacks (network thread) ---------------------------------------------------

    def _set_connected(self, value: bool) -> None:
        if value:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_change is not None:
            self._on_change(value)

    def _on_connect(
        self, client: Any, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refused = f"refused: {reason}"
            log.error("MQTT broker %s refused the connection: %s", self.settings.url, reason)
            return
        if self.filters:
            client.subscribe([(f, 1) for f in self.filters])
        if self._on_session is not None:
            try:
                self._on_session(bool(flags.session_present))
            except Exception:
                log.exception("the MQTT session hook failed")
        log.info(
            "connected to MQTT broker %s (session present: %s), subscribed to %s",
            self.settings.url,
            flags.session_present,
            ", ".join(self.filters),
        )
        self._set_connected(True)

    def _on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning(
                "disconnected from MQTT broker %s: %s; reconnecting", self.settings.url, reason
            )
        self._set_connected(False)

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            with self._pub_lock:
                self._refused_pubs[mid] = str(reason)

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)
        try:
            if self._manual_ack:
                self._handler(topic, msg.payload, self._acker(msg.mid, msg.qos))
            else:
                self._handler(topic, msg.payload)
        except Exception:
            log.exception("ingesting a message on %s failed", topic)

    def _acker(self, mid: int, qos: int) -> Callable[[], None]:
        client = self._client

        def ack() -> None:
            if qos > 0:
                client.ack(mid, qos)

        return ack
