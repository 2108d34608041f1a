"""systemd readiness and watchdog notifications (sd_notify), pure standard library.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket path, or an
abstract socket written with a leading ``@``); with ``WatchdogSec=`` it also passes
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process the watchdog is meant for). Outside
systemd none of these are set and every call here is a no-op.

Three pieces:

- :class:`Notifier` sends ``READY=1``, ``STATUS=…``, ``STOPPING=1`` and ``WATCHDOG=1``.
- :class:`ProgressWatchdog` pings ``WATCHDOG=1`` only while every running stream made
  inference progress recently (Frigate's watchdog checks progress, not liveness): a stuck
  detector stops the pings and systemd restarts the service.
- :class:`ReadinessGate` sends ``READY=1`` once every enabled stream has processed its first
  frame or reported that it failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes:
    """``@name`` is an abstract socket (leading NUL byte); anything else is a path."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when ``address`` is None."""

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` / ``WATCHDOG_PID``.

        The watchdog is enabled only when ``WATCHDOG_PID`` is absent or names this process
        (systemd sets it so that a forked child does not ping for its parent).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        raw_pid = env.get("WATCHDOG_PID", "")
        try:
            usec = int(raw_usec) if raw_usec else 0
            pid_ok = not raw_pid or int(raw_pid) == os.getpid()
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw_usec, raw_pid)
            usec, pid_ok = 0, False
        if usec > 0 and pid_ok:
            watchdog_usec = usec
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout (systemd's advice), or None when there is no watchdog."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, message: str) -> bool:
        """Send one raw message (``KEY=value`` lines); returns whether it was sent."""
        if self._address is None:
            return False
        try:
            with (
                self._lock,
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
            ):
                sock.sendto(message.encode(), self._address)
        except OSError as err:
            # Never fatal: a daemon must keep running even if systemd's socket went away.
            log.warning("sd_notify %r failed: %s", message.split("=", 1)[0], err)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        msg = "READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}"
        return self.notify(msg)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ProgressWatchdog:
    """Pings ``WATCHDOG=1`` every ``interval_s`` while every stream makes progress.

    ``progress()`` returns, per running stream, the monotonic timestamp of its last finished
    inference (streams whose source is down are left out by the caller: a camera outage is
    handled by reconnecting, not by restarting the service). When any timestamp is older
    than ``stall_s`` the pings stop, so systemd's ``WatchdogSec=`` kills and restarts the
    service. An empty sequence (no stream running) counts as healthy.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        interval_s: float,
        stall_s: float,
        progress: Callable[[], Sequence[float]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or stall_s <= 0:
            raise ValueError("interval_s and stall_s must be positive")
        self._notifier = notifier
        self.interval_s = interval_s
        self.stall_s = stall_s
        self._progress = progress
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.stalled = False

    def healthy(self) -> bool:
        """Whether every running stream finished an inference within ``stall_s``."""
        now = self._clock()
        return all(now - last <= self.stall_s for last in self._progress())

    def tick(self) -> bool:
        """One check: ping when healthy. Returns whether a ping was sent."""
        try:
            ok = self.healthy()
        except Exception:  # a broken progress probe must stop the pings, not the thread
            log.exception("watchdog progress probe failed; withholding the ping")
            ok = False
        if not ok:
            if not self.stalled:
                log.error(
                    "inference made no progress for %.0f s; withholding the systemd "
                    "watchdog ping so the service gets restarted",
                    self.stall_s,
                )
                self._notifier.status("stalled: a stream's detector made no progress")
            self.stalled = True
            return False
        if self.stalled:
            log.info("inference progresses again; resuming watchdog pings")
            self.stalled = False
        self._notifier.watchdog()
        self.pings += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class ReadinessGate:
    """Calls ``on_ready`` once, when each expected stream is marked processed or failed.

    With no expected streams it is ready at once.
    """

    def __init__(self, expected_streams: Sequence[str], on_ready: Callable[[], object]) -> None:
        self._pending = set(expected_streams)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._fired = False
        self.failed: list[str] = []
        self._maybe_fire()

    @property
    def is_ready(self) -> bool:
        with self._lock:
            return self._fired

    @property
    def pending(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._pending)

    def first_frame(self, stream: str) -> None:
        """The stream finished its first inference."""
        self._settle(stream)

    def observer(self, stream: str) -> _FirstFrame:
        """A pipeline frame observer that marks ``stream`` processed on its first frame."""
        return _FirstFrame(lambda: self.first_frame(stream))

    def stream_failed(self, stream: str) -> None:
        """The stream could not start (model or source failed)."""
        with self._lock:
            if stream in self._pending:
                self.failed.append(stream)
        self._settle(stream)

    def _settle(self, stream: str) -> None:
        with self._lock:
            self._pending.discard(stream)
        self._maybe_fire()

    def _maybe_fire(self) -> None:
        with self._lock:
            if self._fired or self._pending:
                return
            self._fired = True
        self._on_ready()


class _FirstFrame:
    """Calls ``on_first`` once, on the first inferred frame (or failed inference)."""

    def __init__(self, on_first: Callable[[], object]) -> None:
        self._on_first: Callable[[], object] | None = on_first

    def frame(self, model: str, infer_ms: float, scores: Sequence[float]) -> None:
        self._fire()

    def error(self, model: str) -> None:
        self._fire()

    def _fire(self) -> None:
        on_first, self._on_first = self._on_first, None
        if on_first is not None:
            on_first()
