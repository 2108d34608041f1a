"""Controller replicas in one MQTT shared group: no QoS 1 message stranded in a dead one's session.

With ``broker.shared_group`` every replica subscribes ``$share/{group}/edgefleet/v1/+/...``
with a persistent session. A broker (Mosquitto 2.0 measured, docs/scaling.md) keeps giving
a *disconnected* member with a live session its share of the group's messages, queued in
that session, and keeps the messages that were in flight to it there too, until the same
client id comes back or the session expires. So:

* **graceful stop** (``leave``): unsubscribe the shared filters, wait until everything
  received is written and acknowledged, then disconnect with session expiry 0: the broker
  drops the (empty) session and the group has one member less;
* **crash** (kill -9, node loss): each replica's connection carries a retained last will
  ``gone`` on ``edgefleet/controllers/{group}/{client_id}`` (and publishes ``up`` there
  once connected). A survivor that sees ``gone`` (PostgreSQL: the one that takes an
  advisory lock on that client id) *adopts* the dead session: it connects with the dead
  client id (same credentials), unsubscribes its shared filters, ingests what the broker
  had queued there until nothing came for ``idle_s`` and all of it is committed and
  acknowledged, then ends that session and clears the retained ``gone``.

Adoption needs the broker to let one set of credentials connect under another replica's
client id: true with shared controller credentials, false with Mosquitto's
``use_username_as_clientid`` (packaging/mosquitto/edgefleet.conf), where each replica's
username is its client id: there set ``broker.adopt_sessions = false`` and give replicas
stable ids that come back (a StatefulSet), so the broker delivers the queue on return.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text

from controller.db.session import Database
from controller.errors import BrokerError
from controller.mqtt import MqttSettings, MqttSubscriber

log = logging.getLogger(__name__)

PRESENCE_ROOT = "edgefleet/controllers"
UP, GONE = b"up", b"gone"
_ADOPT_LOCK_NS = 0x6566_7231
"""First key of the advisory lock that picks one adopter ("efr1")."""

Ingest = Callable[[str, bytes, Callable[[], None]], object]


def presence_topic(group: str, client_id: str) -> str:
    return f"{PRESENCE_ROOT}/{group}/{client_id}"


class SessionHandover:
    """Leave the shared group cleanly and adopt the sessions of replicas that died."""

    def __init__(
        self,
        *,
        settings: MqttSettings,
        shared_filters: Sequence[str],
        ingest: Ingest,
        wait_idle: Callable[[float], bool],
        db: Database,
        adopt: bool = True,
        idle_s: float = 1.0,
    ) -> None:
        if settings.shared_group is None:
            raise ValueError("SessionHandover needs broker.shared_group")
        self.settings = settings
        self.group = settings.shared_group
        self.shared_filters = list(shared_filters)
        self.ingest = ingest
        self.wait_idle = wait_idle
        self.db = db
        self.adopt_enabled = adopt
        self.idle_s = idle_s
        self.adopted: list[tuple[str, int]] = []
        """(client id, messages ingested from its session) of every adoption done."""
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._publish: Callable[[str, bytes], object] | None = None

    # wiring into the replica's own subscriber -----------------------------------------

    @property
    def will(self) -> tuple[str, bytes]:
        return presence_topic(self.group, self.settings.client_id), GONE

    @property
    def presence_filter(self) -> str:
        return f"{PRESENCE_ROOT}/{self.group}/+"

    def connected(self, publish: Callable[[str, bytes], object]) -> None:
        """On every connect of the own subscriber: announce ``up`` (retained)."""
        self._publish = publish
        publish(presence_topic(self.group, self.settings.client_id), UP)

    def on_presence(self, topic: str, payload: bytes) -> bool:
        """A message on the presence filter (False: not one); adopts on ``gone``."""
        prefix = f"{PRESENCE_ROOT}/{self.group}/"
        if not topic.startswith(prefix):
            return False
        client_id = topic[len(prefix) :]
        if payload != GONE or client_id == self.settings.client_id or not self.adopt_enabled:
            return True
        with self._lock:
            if client_id in self._busy:
                return True
            self._busy.add(client_id)
        thread = threading.Thread(
            target=self._adopt_guarded, args=(client_id,), name=f"adopt-{client_id}", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return True

    def leave(self, subscriber: MqttSubscriber, *, timeout: float = 10.0) -> None:
        """Graceful stop: unsubscribe, let everything received be written, end the session."""
        subscriber.unsubscribe(self.shared_filters)
        subscriber.publish_nowait(presence_topic(self.group, self.settings.client_id), b"")
        time.sleep(min(self.idle_s, 0.5))
        if not self.wait_idle(timeout):
            log.warning("messages still unwritten after %.0fs; keeping the MQTT session", timeout)
            subscriber.stop()
            return
        subscriber.stop(end_session=True)

    def join(self, timeout: float = 30.0) -> None:
        """Wait for adoptions in progress (tests, shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)

    # adoption --------------------------------------------------------------------------

    def _adopt_guarded(self, client_id: str) -> None:
        try:
            lock = self._take_lock(client_id)
            if lock is False:
                log.info("another replica adopts the MQTT session of %s", client_id)
                return
            try:
                n = self.adopt(client_id)
            finally:
                if lock is not None:
                    lock.close()
            self.adopted.append((client_id, n))
        except Exception:
            log.exception("adopting the MQTT session of %s failed", client_id)
        finally:
            with self._lock:
                self._busy.discard(client_id)

    def _take_lock(self, client_id: str) -> Any:
        """PostgreSQL: a connection holding the adoption lock of ``client_id`` (False: taken
        by another replica); SQLite (one process): None."""
        if self.db.dialect != "postgresql":
            return None
        conn = self.db.engine.connect()
        got = conn.execute(
            text(
                "SELECT pg_try_advisory_lock(CAST(:ns AS integer), "
                "hashtext(current_database() || '.' || :cid))"
            ),
            {"ns": _ADOPT_LOCK_NS, "cid": client_id},
        ).scalar()
        conn.commit()
        if not got:
            conn.close()
            return False
        return conn

    def adopt(self, client_id: str) -> int:
        """Drain the session of ``client_id`` into the ingestion; the messages taken."""
        count = [0]
        done = [0]
        done_lock = threading.Lock()
        last = [time.monotonic()]
        present: list[bool] = []
        kicked = threading.Event()

        def on_message(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
            if topic.startswith(PRESENCE_ROOT + "/"):  # its presence subscription: not data
                ack()
                return
            count[0] += 1
            last[0] = time.monotonic()

            def acked() -> None:
                ack()
                with done_lock:
                    done[0] += 1

            self.ingest(topic, payload, acked)

        def on_change(up: bool) -> None:
            if not up and present:
                kicked.set()

        sub = MqttSubscriber(
            settings=dataclasses.replace(self.settings, client_id=client_id, shared_group=None),
            kinds=(),
            on_message=on_message,
            on_session=present.append,
            on_connection_change=on_change,
            manual_ack=True,
        )
        try:
            sub.start(wait=True)
        except BrokerError as err:
            log.warning("cannot adopt the MQTT session of %s: %s", client_id, err)
            return 0
        if not present or not present[0]:
            sub.stop(end_session=True)
            self._clear(client_id)
            return 0
        log.warning("replica %s is gone: taking over its MQTT session", client_id)
        sub.unsubscribe([*self.shared_filters, self.presence_filter])
        while not kicked.is_set() and time.monotonic() - last[0] < self.idle_s:
            time.sleep(0.05)
        deadline = time.monotonic() + 30.0  # every adopted message committed and acknowledged
        while done[0] < count[0] and time.monotonic() < deadline and not kicked.is_set():
            time.sleep(0.05)
        idle = done[0] >= count[0]
        if kicked.is_set():  # it came back and took its session over: it gets the rest
            log.warning(
                "replica %s came back during the takeover; leaving it its session", client_id
            )
            sub.stop()
            return count[0]
        sub.stop(end_session=idle)
        if idle:
            self._clear(client_id)
        log.warning(
            "took over %d queued messages of replica %s; its MQTT session is closed",
            count[0],
            client_id,
        )
        return count[0]

    def _clear(self, client_id: str) -> None:
        if self._publish is not None:
            self._publish(presence_topic(self.group, client_id), b"")


def build_subscriber(
    *,
    settings: MqttSettings,
    kinds: Sequence[Any],
    handle: Ingest,
    wait_idle: Callable[[float], bool],
    db: Database,
    adopt: bool,
    on_connection_change: Callable[[bool], None] | None,
    on_session: Callable[[bool], None] | None,
) -> tuple[MqttSubscriber, SessionHandover | None]:
    """The controller's subscriber (PUBACK after the commit); with a shared group, wired to
    a :class:`SessionHandover` (last will, presence, adoption)."""
    if settings.shared_group is None:
        sub = MqttSubscriber(
            settings=settings,
            kinds=tuple(kinds),
            on_message=handle,
            on_connection_change=on_connection_change,
            on_session=on_session,
            manual_ack=True,
        )
        return sub, None
    holder: list[MqttSubscriber] = []
    handover = SessionHandover(
        settings=settings,
        shared_filters=[],
        ingest=handle,
        wait_idle=wait_idle,
        db=db,
        adopt=adopt,
    )

    def on_message(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if handover.on_presence(topic, payload):
            ack()
        else:
            handle(topic, payload, ack)

    def session(present: bool) -> None:
        handover.connected(holder[0].publish_nowait)
        if on_session is not None:
            on_session(present)

    sub = MqttSubscriber(
        settings=settings,
        kinds=tuple(kinds),
        on_message=on_message,
        on_connection_change=on_connection_change,
        on_session=session,
        manual_ack=True,
        will=handover.will,
        extra_filters=[handover.presence_filter],
    )
    holder.append(sub)
    handover.shared_filters = [f for f in sub.filters if f.startswith("$share/")]
    return sub, handover
