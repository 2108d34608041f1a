"""Camera/video sources: one capture thread per stream, delivering :class:`Frame` objects.

Delivery modes:

- live sources (V4L2, network) and video files with ``realtime=True``: newest frame wins — a
  single-slot mailbox; a frame replaced before :meth:`FrameSource.get` took it counts as dropped.
  Files are paced at their own frame rate on a monotonic schedule (no drift).
- files with ``realtime=False``: as fast as the consumer takes them, no drops — a small bounded
  queue and the capture thread waits while it is full (offline inference, benchmarks).

A consumer that needs only some frames as images (motion gating checks every few frames) sets
a retrieve predicate (:meth:`FrameSource.set_retrieve`): the other frames are only grabbed —
decoded by FFmpeg (H.264 needs every frame) but not converted to a BGR image — and delivered
as :class:`Grabbed` (:meth:`FrameSource.get_any`), counted in ``frames_grab_only``. A grabbed
frame never displaces a waiting image frame in newest-frame-wins mode: it is dropped instead.

Live sources that fail to open or stop delivering reconnect with exponential backoff; a file that
cannot be opened fails once. The capture thread never raises: problems become the source's state
(``starting``, ``running``, ``reconnecting``, ``failed``, ``ended``, ``stopped``) and error text.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.capture import (
    DEFAULT_FILE_FPS,
    OPEN_TIMEOUT_S,
    READ_TIMEOUT_S,
    SourceSpec,
    nominal_fps,
    open_capture,
    parse_source,
)
from agent.errors import SourceError
from common.backoff import Backoff
from protocol.messages import SourceState

if TYPE_CHECKING:
    import cv2

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray[Any, Any]], object]
Retrieve = Callable[[int], bool]
"""Whether the capture thread converts frame ``index`` to an image (False: only grab it)."""
StateCallback = Callable[[str, str | None], None]

QUEUE_DEPTH = 3
"""Frames a non-realtime file source reads ahead of its consumer."""
_TERMINAL: frozenset[SourceState] = frozenset({"ended", "failed", "stopped"})
_RESYNC_S = 1.0
"""A paced file that falls further behind its schedule than this restarts the schedule."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame."""

    index: int
    """Running frame number of this source, 0-based; keeps counting across file loops/reconnects."""
    file_frame: int
    """Files: position within the file (wraps to 0 on each loop); live sources: same as index."""
    ts: float
    """Capture time, epoch seconds (from the source's clock)."""
    mono: float
    """``time.monotonic()`` at capture, for latency measurements."""
    image: np.ndarray[Any, Any]
    """BGR, as OpenCV decodes it."""
    prepared: object | None
    """``transform(image)``, computed in the capture thread; None without (or on a failing) transform."""


@dataclass(frozen=True, slots=True)
class Grabbed:
    """A frame that was only grabbed (decoded, no image): see :meth:`FrameSource.set_retrieve`."""

    index: int
    file_frame: int
    ts: float
    mono: float


@dataclass(frozen=True, slots=True)
class SourceStats:
    """A consistent snapshot of a source's counters."""

    state: SourceState
    error: str | None
    frames_captured: int
    frames_dropped: int
    reconnects: int
    """Reopen attempts after a failure (successful or not)."""
    fps_nominal: float
    """Frame rate the file/camera reports (files: fallback 15); 0.0 while unknown."""
    transform_errors: int = 0
    frames_grab_only: int = 0
    """Frames only grabbed, not converted to an image (part of ``frames_captured``)."""


class FrameSource:
    """Reads one source in its own thread; the consumer calls :meth:`get`."""

    def __init__(
        self,
        *,
        name: str,
        uri: str,
        loop: bool = True,
        realtime: bool = True,
        transform: Transform | None = None,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        on_state: StateCallback | None = None,
        clock: Callable[[], float] = time.time,
        open_timeout_s: float = OPEN_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        decode_threads: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        """Raises :class:`SourceError` at once if ``uri`` has a form that can never work."""
        self.name = name
        self.spec: SourceSpec = parse_source(uri)
        self.loop = loop
        self.realtime = realtime
        self._transform = transform
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s, rng=rng)
        self._on_state = on_state
        self._clock = clock
        self._open_timeout_s = open_timeout_s
        self._read_timeout_s = read_timeout_s
        self._decode_threads = decode_threads
        # The queue mode (no drops, producer waits) is for files read as fast as possible.
        self._lossless = not self.spec.live and not realtime
        self._capacity = QUEUE_DEPTH if self._lossless else 1

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._frames: deque[Frame | Grabbed] = deque()
        self._state: SourceState = "starting"
        self._error: str | None = None
        self._captured = 0
        self._dropped = 0
        self._reconnects = 0
        self._fps = 0.0
        self._transform_errors = 0
        self._transform_logged = False
        self._wants: Retrieve | None = None
        self._grab_only = 0

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap: cv2.VideoCapture | None = None
        """Only the capture thread touches the capture."""

    # -- consumer side -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the capture thread (once)."""
        if self._thread is not None:
            raise SourceError(f"source {self.name!r} was already started; create a new one")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the capture thread to stop; returns at once (see :meth:`join`)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the capture thread to end; True when it has ended.

        Prompt while the thread waits in backoff, on pacing or on a full queue. A thread blocked
        inside OpenCV (a network open or read) returns after at most the open/read timeout and
        then releases the capture itself; until then this returns False.
        """
        thread = self._thread
        if thread is not None:
            timeout = max(0.0, timeout)
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "source %s: capture thread still inside OpenCV after %.1f s (it gives up "
                    "after the open/read timeout of %g/%g s)",
                    self.name,
                    timeout,
                    self._open_timeout_s,
                    self._read_timeout_s,
                )
                return False
        self._set_state("stopped", None)
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and release the capture: :meth:`request_stop` then :meth:`join`."""
        self.request_stop()
        return self.join(timeout)

    def get(self, timeout: float) -> Frame | None:
        """The next frame, or None after ``timeout`` s or at once when no frame can come again.

        Passes over grabbed-only frames (a consumer that sets a retrieve predicate wants
        :meth:`get_any`)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.get_any(deadline - time.monotonic())
            if not isinstance(frame, Grabbed):
                return frame

    def get_any(self, timeout: float) -> Frame | Grabbed | None:
        """Like :meth:`get`, grabbed-only frames included."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._frames:
                if self._state in _TERMINAL:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame = self._frames.popleft()
            self._cond.notify_all()  # a producer may wait for room
            return frame

    @property
    def ended(self) -> bool:
        """True when no frame will ever come again and every frame was taken.

        A file with ``loop=False`` after its last frame, or a source that failed or was stopped
        (``stats().state`` tells which).
        """
        with self._lock:
            return self._state in _TERMINAL and not self._frames

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(
                state=self._state,
                error=self._error,
                frames_captured=self._captured,
                frames_dropped=self._dropped,
                reconnects=self._reconnects,
                fps_nominal=self._fps,
                transform_errors=self._transform_errors,
                frames_grab_only=self._grab_only,
            )

    def set_transform(self, transform: Transform | None) -> None:
        """Swap the per-frame transform (hot model swap) from any thread.

        Applies from the next captured frame; frames already waiting in the queue (at most
        ``QUEUE_DEPTH``, or 1 in newest-frame-wins mode) keep the old transform's result.
        """
        with self._lock:
            self._transform = transform
            self._transform_logged = False

    def set_retrieve(self, retrieve: Retrieve | None) -> None:
        """Convert only the frames ``retrieve(index)`` is true for to images; the others are
        only grabbed (``cap.grab()``: decoded, no BGR image, no transform) and delivered as
        :class:`Grabbed`. None (the default): every frame is an image. Called on the capture
        thread once the frame is grabbed (a paced file's: at its time): keep it cheap, it
        must not raise. A live connection's first frame is always an image (its size may
        have changed)."""
        with self._lock:
            self._wants = retrieve

    # -- capture thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.spec.live:
                self._run_live()
            else:
                self._run_file()
        except Exception as err:  # the thread never dies silently
            log.exception("source %s: capture thread crashed", self.name)
            self._set_state("failed", f"internal error in the capture thread: {err!r}")
        finally:
            self._release()
            if self._stop.is_set():
                self._set_state("stopped", None)

    def _open(self) -> cv2.VideoCapture:
        self._release()
        self._cap = open_capture(
            self.spec,
            open_timeout_s=self._open_timeout_s,
            read_timeout_s=self._read_timeout_s,
            decode_threads=self._decode_threads,
        )
        return self._cap

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _fail(self, error: str) -> None:
        log.error("source %s: %s", self.name, error)
        self._set_state("failed", error)

    def _run_file(self) -> None:
        import cv2

        try:
            cap = self._open()
        except SourceError as err:
            self._fail(str(err))
            return
        fps = nominal_fps(cap, fallback=DEFAULT_FILE_FPS)
        with self._lock:
            self._fps = fps
        period = 1.0 / fps
        due = time.monotonic()
        index = 0
        file_frame = 0
        while not self._stop.is_set():
            ok = cap.grab()
            if ok and self.realtime:  # paced before the retrieve decision: it may need the time
                now = time.monotonic()
                if now - due > _RESYNC_S:
                    due = now  # the machine stalled: do not burst frames to catch up
                if self._stop.wait(max(0.0, due - now)):
                    return
                due += period
            ok, image = self._image(cap, index, first=False) if ok else (False, None)
            if not ok:
                if file_frame == 0:
                    self._fail(
                        f"cannot read video file {self.spec.path}: it has no decodable frames"
                    )
                    return
                if not self.loop:
                    self._set_state("ended", None)
                    return
                file_frame = 0
                if not cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    try:  # the container cannot seek: start it again
                        cap = self._open()
                    except SourceError as err:
                        self._fail(str(err))
                        return
                continue
            self._deliver(index, file_frame, image)
            if index == 0:
                self._set_state("running", None)
            index += 1
            file_frame += 1

    def _run_live(self) -> None:
        index = 0
        attempt_failed = False
        while not self._stop.is_set():
            if attempt_failed:
                with self._lock:
                    self._reconnects += 1
            try:
                cap = self._open()
            except SourceError as err:
                attempt_failed = True
                self._retry_later(str(err))
                continue
            with self._lock:
                self._fps = nominal_fps(cap)
            frames_this_connection = 0
            while not self._stop.is_set():
                first = frames_this_connection == 0
                ok, image = self._image(cap, index, first=first) if cap.grab() else (False, None)
                if not ok:
                    break
                self._deliver(index, index, image)
                if frames_this_connection == 0:
                    self._backoff.reset()
                    self._set_state("running", None)
                index += 1
                frames_this_connection += 1
            self._release()
            if self._stop.is_set():
                return
            attempt_failed = True
            if frames_this_connection:
                why = (
                    f"lost {self.spec.display}: the stream closed or sent no frame "
                    f"within {self._read_timeout_s:g} s"
                )
            else:
                why = f"opened {self.spec.display} but could not read a frame from it"
            self._retry_later(why)

    def _retry_later(self, error: str) -> None:
        delay = self._backoff.next()
        previous = self._set_state("reconnecting", error)
        if previous is not None and previous != "reconnecting":
            log.warning("source %s: %s (retrying with backoff)", self.name, error)
        else:
            log.debug("source %s: still failing: %s; next try in %.1f s", self.name, error, delay)
        self._stop.wait(delay)

    def _image(
        self, cap: cv2.VideoCapture, index: int, *, first: bool
    ) -> tuple[bool, np.ndarray[Any, Any] | None]:
        """After a ``cap.grab()``: ``cap.retrieve()`` (the BGR image), or (True, None) for a
        frame the retrieve predicate passes over (it stays only grabbed)."""
        wants = self._wants
        if wants is not None and not first and not wants(index):
            return True, None
        ok, image = cap.retrieve()
        return ok, image if ok else None

    def _deliver(self, index: int, file_frame: int, image: np.ndarray[Any, Any] | None) -> None:
        """Queue frame ``index``: an image frame (transformed) or, image None, a grabbed one."""
        ts = self._clock()
        mono = time.monotonic()
        frame: Frame | Grabbed | None
        if image is None:
            frame = Grabbed(index=index, file_frame=file_frame, ts=ts, mono=mono)
        else:
            with self._lock:
                transform = self._transform
            prepared = self._apply(transform, image) if transform is not None else None
            frame = Frame(
                index=index, file_frame=file_frame, ts=ts, mono=mono, image=image, prepared=prepared
            )
        with self._cond:
            if self._lossless:
                while len(self._frames) >= self._capacity and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
            elif self._frames:
                self._dropped += 1
                if image is None and isinstance(self._frames[0], Frame):
                    frame = None  # a waiting image is worth more than a newer grab
                else:
                    self._frames.popleft()
            if frame is not None:
                self._frames.append(frame)
            self._captured += 1
            self._grab_only += image is None
            self._cond.notify_all()

    def _apply(self, transform: Transform, image: np.ndarray[Any, Any]) -> object | None:
        try:
            return transform(image)
        except Exception:  # a bad transform must not stop the camera
            with self._lock:
                self._transform_errors += 1
                first = not self._transform_logged
                self._transform_logged = True
            if first:
                log.exception("source %s: transform failed; frames get prepared=None", self.name)
            return None

    def _set_state(self, state: SourceState, error: str | None) -> SourceState | None:
        """Record state and error; on a change calls ``on_state`` and returns the previous state."""
        with self._cond:
            previous = self._state
            if state == previous and error == self._error:
                return None
            self._state = state
            self._error = error
            self._cond.notify_all()  # a terminal state wakes waiting consumers
        if self._on_state is not None:
            try:
                self._on_state(state, error)
            except Exception:  # a listener bug must not stop the camera
                log.exception("source %s: on_state callback failed", self.name)
        if state != previous and state in ("running", "ended", "stopped"):
            log.info("source %s: %s", self.name, state)
        return previous
