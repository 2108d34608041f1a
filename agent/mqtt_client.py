"""The agent's MQTT connection: a paho-mqtt 2.x client built from ``BrokerConfig``.

- MQTT v5, ``clean_start=False`` and a session expiry interval, so the broker keeps the
  session (subscriptions, queued ``desired`` messages) across reconnects and restarts.
- A last will (the retained ``offline`` status) that the broker publishes when the agent
  vanishes without a DISCONNECT.
- Reconnects forever with exponential backoff and jitter (``common.backoff.Backoff`` drives
  paho's own reconnect loop), at most ``reconnect_max_s`` between attempts (the agent's
  ``[broker] reconnect_max_s``); an unreachable broker at start is not an error. The state is
  logged once per change (connected / lost / unreachable), not once per retry.
- ``subscribe()`` returns its own unsubscribe function, subscriptions are renewed after every
  reconnect, and a failing handler is logged, never fatal.

Bad TLS files or a malformed URL raise :class:`agent.errors.PublishError` when the connection
object is built, before anything is started.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import PublishError
from common.backoff import Backoff
from protocol import ProtocolError
from protocol import broker as protocol_broker
from protocol.broker import BrokerAddress

log = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
"""How long the broker keeps the agent's session (subscriptions, queued messages) offline."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


MessageHandler = Callable[[InboundMessage], None]


class PublishResult(NamedTuple):
    """What paho did with a message handed to :meth:`MqttConnection.publish`."""

    mid: int
    """Its message id (the one ``on_published`` reports)."""
    sent: bool
    """Paho took it onto the live connection (``MQTT_ERR_SUCCESS``); False e.g. while
    disconnected, where paho keeps a QoS > 0 message and re-sends it after the reconnect."""


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` → address; PublishError otherwise."""
    try:
        return protocol_broker.parse_broker_url(url)
    except ProtocolError as err:
        raise PublishError(f"broker.url: {err}") from err


def _tls_path(name: str, value: str, resolver: Callable[[str], Path] | None) -> Path:
    if resolver is not None:
        return resolver(value)
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise PublishError(
            f"broker.{name} {value!r} is a relative path and no base folder is known; use an "
            "absolute path"
        )
    return path


def build_tls_context(
    broker: BrokerConfig, resolver: Callable[[str], Path] | None = None
) -> ssl.SSLContext:
    """An SSL context with the configured CA and client certificate; PublishError if unusable."""
    ca = _tls_path("ca_file", broker.ca_file, resolver) if broker.ca_file else None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as err:
        raise PublishError(
            f"broker.ca_file {ca}: cannot load CA certificates ({err}); point it at a PEM "
            "file with the CA that signed the broker's certificate"
        ) from err
    if broker.cert_file or broker.key_file:
        if not (broker.cert_file and broker.key_file):
            raise PublishError(
                "broker.cert_file and broker.key_file go together: set both or neither"
            )
        cert = _tls_path("cert_file", broker.cert_file, resolver)
        key = _tls_path("key_file", broker.key_file, resolver)
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as err:
            raise PublishError(
                f"broker.cert_file {cert} / broker.key_file {key}: cannot load the client "
                f"certificate ({err}); both must be PEM files and the key must match the "
                "certificate"
            ) from err
    return context


@dataclass(slots=True)
class _Subscription:
    qos: int
    handlers: list[MessageHandler] = field(default_factory=list)


class MqttConnection:
    """One paho client with reconnects, a last will and renewable subscriptions.

    The ``on_connected(receive_maximum)``, ``on_disconnected()`` and
    ``on_published(mid, failed)`` hooks run on paho's network thread; they must be quick and
    must not call back into paho while holding a lock that a publishing thread holds.
    ``will(n)`` is the last will of connection number ``n`` (set before each connect).
    """

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        client_id: str,
        will: Callable[[int], Will] | None = None,
        tls_resolver: Callable[[str], Path] | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float | None = None,
        on_connected: Callable[[int], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        on_published: Callable[[int, bool], None] | None = None,
    ) -> None:
        self._address = parse_broker_url(broker.url)
        if not self._address.tls and (broker.ca_file or broker.cert_file or broker.key_file):
            raise PublishError(
                f"broker.url {broker.url!r} is plain mqtt:// but TLS files are configured; use "
                "mqtts:// to connect with TLS (or remove ca_file/cert_file/key_file)"
            )
        self._broker = broker
        self._session_expiry_s = session_expiry_s
        # By default the broker config's [broker] reconnect_max_s (10 s unless set).
        ceiling = broker.reconnect_max_s if reconnect_max_s is None else reconnect_max_s
        self._backoff = Backoff(reconnect_min_s, ceiling)
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_published = on_published
        self._lock = threading.Lock()
        self._subs: dict[str, _Subscription] = {}
        self._connected = False
        self._state = "new"
        self._stopping = False
        self._started = False
        self._last_refusal: str | None = None
        self._will = will
        self.connections = 0
        """Connections made so far (the one up now, or the last one, is number
        ``connections``)."""

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.on_log = self._handle_log
        client.suppress_exceptions = True
        client.max_inflight_messages = 0  # the Publisher bounds in-flight messages itself
        client.max_queued_messages = 0
        client.connect_timeout = broker.connect_timeout_s
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if self._address.tls:
            client.tls_set_context(build_tls_context(broker, tls_resolver))
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_publish = self._handle_publish
        self._client = client
        self._set_will()
        self._set_next_delay(reconnect_min_s)

    # --- properties -----------------------------------------------------------------------

    @property
    def client(self) -> mqtt.Client:
        """The paho client (for publishing; do not replace its callbacks)."""
        return self._client

    @property
    def address(self) -> BrokerAddress:
        return self._address

    @property
    def connected(self) -> bool:
        return self._connected

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (paho's network thread); never blocks."""
        if self._started:
            return
        self._started = True
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        self._client.connect_async(
            self._address.host,
            self._address.port,
            keepalive=self._broker.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker does NOT publish the will) and stop the network thread."""
        self._stopping = True
        if not self._started:
            return
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False
        self._started = False

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> PublishResult:
        """Hand a message to paho; see paho's ``publish`` (QoS > 0 is kept until acknowledged)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return PublishResult(info.mid, info.rc == mqtt.MQTT_ERR_SUCCESS)

    # --- subscriptions --------------------------------------------------------------------

    def subscribe(
        self, topic_filter: str, handler: MessageHandler, qos: int = 1
    ) -> Callable[[], None]:
        """Call ``handler`` for every message matching ``topic_filter``; returns an unsubscribe.

        The subscription is renewed after every reconnect; retained messages are sent again
        then, so handlers must be idempotent (desired-state handlers are).
        """
        with self._lock:
            sub = self._subs.get(topic_filter)
            first = sub is None
            if sub is None:
                sub = self._subs[topic_filter] = _Subscription(qos=qos)
            sub.qos = max(sub.qos, qos)
            sub.handlers.append(handler)
            sub_qos = sub.qos
        if first:
            self._client.message_callback_add(topic_filter, self._dispatcher(topic_filter))
        if self._connected:
            self._client.subscribe(topic_filter, qos=sub_qos)

        done = False

        def unsubscribe() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                current = self._subs.get(topic_filter)
                if current is None:
                    return
                current.handlers.remove(handler)
                last = not current.handlers
                if last:
                    del self._subs[topic_filter]
            if last:
                self._client.message_callback_remove(topic_filter)
                if self._connected:
                    self._client.unsubscribe(topic_filter)

        return unsubscribe

    def _dispatcher(
        self, topic_filter: str
    ) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        def dispatch(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            with self._lock:
                sub = self._subs.get(topic_filter)
                handlers = list(sub.handlers) if sub else []
            inbound = InboundMessage(
                topic=message.topic,
                payload=bytes(message.payload),
                retain=bool(message.retain),
                qos=int(message.qos),
            )
            for handler in handlers:
                try:
                    handler(inbound)
                except Exception:
                    log.exception(
                        "handler for %s failed on a message on %s", topic_filter, inbound.topic
                    )

        return dispatch

    # --- paho callbacks (network thread) ---------------------------------------------------

    def _set_next_delay(self, delay: float) -> None:
        # paho annotates these as int but computes with any number; sub-second delays matter
        # for fast reconnects. min == max makes paho wait exactly ``delay``.
        self._client.reconnect_delay_set(cast(int, delay), cast(int, delay))

    def _handle_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            text = str(reason)
            if text != self._last_refusal:
                self._last_refusal = text
                log.error(
                    "broker %s refused the connection: %s; check broker.username/password, "
                    "the client id and the broker's ACL (retrying with backoff)",
                    self._address,
                    text,
                )
            self._state = "refused"
            return
        self._last_refusal = None
        self._backoff.reset()
        previous = self._state
        self._state = "connected"
        self.connections += 1
        self._connected = True
        log.info(
            "%s MQTT broker %s (session present: %s)",
            "reconnected to" if previous in ("lost", "unreachable", "refused") else "connected to",
            self._address,
            flags.session_present,
        )
        with self._lock:
            subs = [(f, s.qos) for f, s in self._subs.items()]
        if subs:
            client.subscribe(subs)
        receive_max = 65535
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            receive_max = int(properties.ReceiveMaximum)
        if self._on_connected is not None:
            try:
                self._on_connected(receive_max)
            except Exception:
                log.exception("on_connected hook failed")

    def _handle_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was_connected = self._connected
        self._connected = False
        if self._stopping:
            self._state = "stopped"
            log.info("disconnected from MQTT broker %s", self._address)
        else:
            self._set_next_delay(self._backoff.next())
            if was_connected:
                self._state = "lost"
                log.warning(
                    "lost the connection to MQTT broker %s (%s); reconnecting with backoff, "
                    "messages are spooled meanwhile",
                    self._address,
                    reason,
                )
        if was_connected:
            self._set_will()  # for the next connection, before paho reconnects
        if was_connected and self._on_disconnected is not None:
            try:
                self._on_disconnected()
            except Exception:
                log.exception("on_disconnected hook failed")

    def _set_will(self) -> None:
        """The last will of the next connection: ``will`` is given its number."""
        if self._will is not None:
            will = self._will(self.connections + 1)
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _handle_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        delay = self._backoff.next()
        self._set_next_delay(delay)
        if self._state == "lost":
            self._state = "unreachable"  # the loss was just logged; retries stay quiet
        elif self._state not in ("unreachable", "refused"):
            log.warning(
                "cannot reach MQTT broker %s; retrying with backoff (up to %g s between "
                "attempts), messages are spooled meanwhile",
                self._address,
                self._backoff.max_s,
            )
            self._state = "unreachable"
        else:
            log.debug(
                "MQTT broker %s still unreachable; next attempt in %.1f s", self._address, delay
            )

    def _handle_log(self, _client: mqtt.Client, _userdata: Any, _level: int, text: str) -> None:
        # paho logs some conditions at ERROR on every retry ("Client is not connected"); the
        # connection state is logged above once per change, so paho's own lines are debug.
        log.debug("paho: %s", text)

    def _handle_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _properties: Properties,
    ) -> None:
        if self._on_published is not None:
            try:
                self._on_published(mid, bool(reason.is_failure))
            except Exception:
                log.exception("on_published hook failed")
