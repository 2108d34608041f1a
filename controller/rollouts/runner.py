"""The background thread that drives rollouts: tick the engine, publish desired states.

About once per ``interval_s`` (and at once when ``wake()`` is called, e.g. after an API
change) it runs ``engine.tick()`` and then the publisher. On PostgreSQL only the replica
holding a session-level advisory lock does this (the others wait and retry), so several
controllers on one database never drive the same rollout twice or publish out of order;
the lock goes with its connection, so a replica that dies (even by SIGKILL) hands over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.db.session import Database
from controller.rollouts.engine import RolloutEngine
from controller.rollouts.locks import PG_ENGINE_LOCK, pg_lock_sql
from controller.rollouts.publisher import DesiredPublisher

log = logging.getLogger(__name__)


class Leadership:
    """Who may drive rollouts: always this process on SQLite, the advisory lock holder on PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None

    @property
    def held(self) -> bool:
        return self.db.dialect != "postgresql" or self._conn is not None

    def acquire(self) -> bool:
        """True if this process leads now (checks a held lock's connection is still alive)."""
        if self.db.dialect != "postgresql":
            return True
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql("SELECT 1")
                self._conn.commit()
                return True
            except Exception as err:  # noqa: BLE001 - a dead connection means the lock is gone
                log.warning("lost the rollout lock's database connection (%s)", err)
                self._drop()
        try:
            conn = self.db.engine.connect()
            got = bool(conn.execute(pg_lock_sql("pg_try_advisory_lock", PG_ENGINE_LOCK)).scalar())
            conn.commit()
        except Exception as err:  # noqa: BLE001 - retried on the next pass
            log.warning("cannot try the rollout lock: %s", err)
            return False
        if not got:
            conn.close()
            return False
        log.info("this controller drives the rollouts (PostgreSQL advisory lock taken)")
        self._conn = conn
        return True

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(pg_lock_sql("pg_advisory_unlock", PG_ENGINE_LOCK))
            self._conn.commit()
        except Exception as err:  # noqa: BLE001 - closing the connection releases it anyway
            log.debug("unlocking the rollout lock failed: %s", err)
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        try:
            conn.invalidate()
            conn.close()
        except Exception as err:  # noqa: BLE001
            log.debug("closing the rollout lock connection failed: %s", err)


class RolloutRunner:
    def __init__(
        self,
        *,
        db: Database,
        engine: RolloutEngine,
        publisher: DesiredPublisher | None,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.engine = engine
        self.publisher = publisher
        self.interval_s = interval_s
        self.clock = clock
        self.leadership = Leadership(db)
        self.ticks = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._republish = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the rollout thread did not stop within %.0fs", timeout)
            self._thread = None
        self.leadership.release()

    def wake(self) -> None:
        """Tick soon (an operator changed something)."""
        self._wake.set()

    def on_session(self, session_present: bool) -> None:
        """MQTT connect hook: without a stored session the broker may have lost the retained
        desired states, so publish them all again; either way publish what is pending."""
        if not session_present:
            self._republish.set()
        self._wake.set()

    def run_once(self) -> bool:
        """One pass (tests call it directly); False when another replica leads."""
        if not self.leadership.acquire():
            return False
        if self.publisher is not None and self._republish.is_set():
            self._republish.clear()
            self.publisher.republish_all()
        self.engine.tick(self.clock())
        if self.publisher is not None:
            self.publisher.publish_pending()
        self.ticks += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
                self._failures = 0
            except Exception as err:  # keep driving; the database may come back
                self._failures += 1
                if self._failures <= 3 or self._failures % 60 == 0:
                    log.exception(
                        "rollout pass failed (%d in a row): %s; retrying - check the database",
                        self._failures,
                        err,
                    )
            self._wake.wait(self.interval_s)
