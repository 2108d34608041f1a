"""One stream's inference loop: newest frame → detector → detections message → publisher.

The camera thread (agent.sources) already decodes and preprocesses the frame on the other
core, so this thread only invokes the model, decodes boxes, and hands a small JSON payload
to the publisher thread. A new detector can be swapped in between two frames.

With motion gating (``[streams.motion]``, agent.motion) the camera thread converts only every
``check_every``-th frame of a still scene to an image (the others are only grabbed:
:class:`Grabbed`), shrinks it to a grey thumbnail and preprocesses only frames that may be
inferred; this thread skips the grabbed frames and those that did not change (publishing
nothing or the last result again). Frames an fps cap (``streams[].fps``) skips are only
grabbed too, and the cap keeps to its schedule within a few milliseconds (a frame slightly
early counts as due). With cross-stream batching (agent.batching) the invoke
goes through the stream's batch group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import StreamConfig
from agent.errors import AgentError
from agent.motion import MotionGate
from agent.ota.shadow import ShadowOutcome, ShadowRunner
from agent.publisher import RefusedLog
from agent.snapshots import SnapshotWorker
from agent.sources import Frame, FrameSource, Grabbed, Retrieve
from agent.stats import StreamStats
from inference.detector import Detector, InferenceResult, Prepared
from protocol import (
    SCHEMA_VERSION,
    Detection,
    Detections,
    ProtocolError,
    detections_topic,
    encode_checked,
)
from protocol.limits import MAX_DETECTIONS

log = logging.getLogger(__name__)

PublishFn = Callable[[str, bytes], None]


class Batcher(Protocol):
    """Runs a stream's frame in a batch with other streams' (agent.batching.BatchGroup)."""

    def infer(self, stream: str, detector: Detector, prepared: Prepared) -> InferenceResult | None:
        """The frame's result, or None when this batcher does not serve ``detector``."""

    def leave(self, stream: str) -> None:
        """``stream`` sends no frame for now: batches do not wait for it."""


class FrameObserver(Protocol):
    """Sees every inferred frame (on the inference thread: keep it cheap)."""

    def frame(self, model: str, infer_ms: float, scores: Sequence[float]) -> None:
        """``model`` (``name@version``) inferred a frame; ``scores`` of its published detections."""

    def error(self, model: str) -> None:
        """Inference with ``model`` raised on a frame."""


class ObserverGroup:
    """Several frame observers as one; each sees every frame, in the given order."""

    def __init__(self, *observers: FrameObserver) -> None:
        self._observers = observers

    def frame(self, model: str, infer_ms: float, scores: Sequence[float]) -> None:
        for observer in self._observers:
            observer.frame(model, infer_ms, scores)

    def error(self, model: str) -> None:
        for observer in self._observers:
            observer.error(model)


@dataclass(frozen=True, slots=True)
class _Tagged:
    """A frame as the camera thread prepared it: the detector whose preprocessing made
    ``prepared`` (None: the motion gate saw no change, so it was not preprocessed) and the
    frame's motion thumbnail (None without gating)."""

    detector: Detector
    prepared: Prepared | None
    thumb: Any = None


def _tagging(detector: Detector, gate: MotionGate | None) -> Callable[[Any], _Tagged]:
    if gate is None:

        def transform(image: Any) -> _Tagged:
            return _Tagged(detector, detector.preprocess(image))

        return transform

    def gated(image: Any) -> _Tagged:
        thumb = gate.thumbnail(image)
        if gate.due(time.monotonic()) or gate.changed(thumb):
            return _Tagged(detector, detector.preprocess(image), thumb)
        return _Tagged(detector, None, thumb)

    return gated


FPS_EARLY_MAX_S = 0.02
"""At most this much early (and at most a quarter of the cap's interval), a frame counts as
due for the fps cap: the camera thread decides whether to convert a frame to an image when
it is grabbed, a little before the frame's timestamp is taken, and a paced source's frames
fall around the cap's schedule, not on it."""


def _checking(gate: MotionGate | None) -> Retrieve | None:
    """Which frames the camera thread converts to images under gating: every ``check_every``-th,
    every one while the scene moves, and, so that ``max_skip_s`` holds, any while the gate is
    due. None: every frame."""
    if gate is None or gate.config.check_every == 1:
        return None
    every = gate.config.check_every

    def check(index: int) -> bool:
        return index % every == 0 or gate.moving or gate.due(time.monotonic())

    return check


class StreamPipeline:
    """Runs inference for one stream on its own thread."""

    def __init__(
        self,
        *,
        device_id: str,
        config: StreamConfig,
        source: FrameSource,
        detector: Detector,
        publish: PublishFn,
        next_seq: Callable[[], int],
        stats: StreamStats | None = None,
        observer: FrameObserver | None = None,
        snapshots: SnapshotWorker | None = None,
    ) -> None:
        """``snapshots``: takes the frames with detections as camera snapshots (``[snapshots]``);
        the pipeline starts and stops it with itself."""
        self.name = config.name
        self.snapshots = snapshots
        self._observer = observer
        self._config = config
        self._source = source
        self._detector = detector
        self._publish = publish
        self._next_seq = next_seq
        self.stats = stats or StreamStats()
        self._topic = detections_topic(device_id, config.name)
        self._device_id = device_id
        self._labels = frozenset(config.labels)
        self._min_interval = 1.0 / config.fps if config.fps > 0 else 0.0
        self._stop = threading.Event()
        self._pending: Detector | None = None
        self._swapped = threading.Condition()
        self._shadow: ShadowRunner | None = None
        self._shadow_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"infer-{self.name}", daemon=True)
        self._refused = RefusedLog(f"stream {self.name}")
        self.skipped_fps = 0
        """Frames skipped by the fps cap."""
        self.skipped_motion = 0
        """Frames skipped by the motion gate."""
        self._gate = MotionGate(config.motion) if config.motion.enabled else None
        self._repeat = config.motion.on_skip == "repeat"
        self._last: tuple[Detector, float, list[Detection], tuple[int, int]] | None = None
        """The last inferred frame's detector, infer_ms, detections and (height, width)."""
        self._batcher: Batcher | None = None
        self.finished = threading.Event()
        """Set when the loop ends (stop() or a finite source ran out)."""
        source.set_transform(_tagging(detector, self._gate))
        self._next_due = 0.0
        """With an fps cap: when (``time.monotonic()``) the next frame is due."""
        self._early_s = min(self._min_interval / 4, FPS_EARLY_MAX_S)
        check = _checking(self._gate)
        source.set_retrieve(self._capped(check) if self._min_interval else check)

    def _capped(self, check: Retrieve | None) -> Retrieve:
        """``check`` (None: every frame), and only frames the fps cap lets through: a frame
        the cap will skip is only grabbed, never converted to an image nor preprocessed."""

        def wanted(index: int) -> bool:
            if time.monotonic() < self._next_due - self._early_s:
                return False
            return check is None or check(index)

        return wanted

    @property
    def detector(self) -> Detector:
        return self._detector

    @property
    def frames_skipped(self) -> int:
        """Frames not inferred by choice: the fps cap and the motion gate."""
        return self.skipped_fps + self.skipped_motion

    def set_batcher(self, batcher: Batcher | None) -> None:
        """Infer through ``batcher`` from the next frame on (None: alone)."""
        self._batcher = batcher

    def start(self) -> None:
        if self.snapshots is not None:
            self.snapshots.start()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self.snapshots is not None:
            self.snapshots.stop()

    def swap_detector(self, new: Detector, timeout: float = 10.0) -> Detector:
        """Switch to ``new`` between two frames; return the old detector (caller closes it).

        The camera thread starts preprocessing for the new model at once; a frame already
        prepared for the old model is prepared again, so no frame is dropped.
        """
        with self._swapped:
            old = self._detector
            self._pending = new
            self._source.set_transform(_tagging(new, self._gate))
            if not self._thread.is_alive():
                self._detector, self._pending = new, None
            elif not self._swapped.wait_for(lambda: self._pending is None, timeout):
                self._pending = None
                self._source.set_transform(_tagging(old, self._gate))
                raise AgentError(
                    f"stream {self.name}: no frame boundary within {timeout:.0f} s, the current "
                    "detector seems stuck; the swap was cancelled"
                )
        return old

    def set_shadow(self, runner: ShadowRunner | None) -> None:
        """Pair sampled frames with ``runner``'s model (None: stop). Returns once the inference
        thread no longer uses the previous runner, so its model can be closed."""
        with self._shadow_lock:
            self._shadow = runner

    def _take_pending(self) -> None:
        with self._swapped:
            if self._pending is not None:
                self._detector, self._pending = self._pending, None
                self._swapped.notify_all()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._pending is not None:
                    self._take_pending()
                frame = self._source.get_any(timeout=0.25)
                if frame is None:
                    if self._source.ended:
                        break
                    if self._batcher is not None:  # a camera that is down: batches go on
                        self._batcher.leave(self.name)
                    continue
                if self._min_interval:
                    if frame.mono < self._next_due - self._early_s or (
                        isinstance(frame, Grabbed) and self._gate is None
                    ):  # only the cap has frames grabbed without a gate
                        self.skipped_fps += 1
                        continue
                    if isinstance(frame, Frame):  # a grab leaves the slot to the next check
                        # On the schedule while frames come on time; one interval from now
                        # after a late frame (no burst to catch up), and after the first.
                        self._next_due = max(
                            self._next_due + self._min_interval,
                            frame.mono + self._min_interval - self._early_s,
                        )
                if isinstance(frame, Grabbed) or (
                    self._gate is not None and not self._gated_in(frame)
                ):
                    self._skip(frame)
                    continue
                self._process(frame)
        finally:
            batcher = self._batcher
            if batcher is not None:
                batcher.leave(self.name)
            self.finished.set()

    def _skip(self, frame: Frame | Grabbed) -> None:
        """A frame the motion gate skipped, or did not check (only grabbed)."""
        self.skipped_motion += 1
        if self._batcher is not None:
            self._batcher.leave(self.name)
        if self._repeat and self._last is not None:
            self._emit(frame, *self._last, repeat=True)

    def _gated_in(self, frame: Frame) -> bool:
        """Whether the motion gate lets ``frame`` be inferred (moving its reference if so)."""
        gate = self._gate
        assert gate is not None
        tagged = frame.prepared
        thumb = tagged.thumb if isinstance(tagged, _Tagged) and tagged.thumb is not None else None
        if thumb is None:
            thumb = gate.thumbnail(frame.image)
        if not gate.should_infer(thumb, frame.mono):
            return False
        gate.inferred(thumb, frame.mono)
        return True

    def _process(self, frame: Frame) -> None:
        if self._shadow is not None:
            with self._shadow_lock:  # set_shadow waits for a paired frame to finish
                shadow = self._shadow
                if shadow is not None and shadow.due():
                    self._infer(frame, shadow)
                    return
        self._infer(frame, None)

    def _infer(self, frame: Frame, shadow: ShadowRunner | None) -> None:
        detector = self._detector
        tagged = frame.prepared
        ahead: ShadowOutcome | None = None
        try:
            if (
                isinstance(tagged, _Tagged)
                and tagged.detector is detector
                and tagged.prepared is not None
            ):
                prepared = tagged.prepared
            else:
                prepared = detector.preprocess(frame.image)
            if shadow is not None and shadow.leads():
                ahead = shadow.run(frame.image, detector, prepared)
            result = self._invoke(detector, prepared)
        except Exception:
            self.stats.record_error()
            if self._observer is not None:
                self._observer.error(detector.ref)
            log.exception("stream %s: inference failed on frame %d", self.name, frame.index)
            return
        detections = result.detections
        if self._labels:
            detections = [d for d in detections if d.label in self._labels]
        if len(detections) > MAX_DETECTIONS:  # best first: keep the best
            detections = detections[:MAX_DETECTIONS]
        height, width = frame.image.shape[:2]
        self._emit(frame, detector, result.infer_ms, detections, (int(height), int(width)))
        if self._repeat:
            self._last = (detector, result.infer_ms, detections, (int(height), int(width)))
        self.stats.record(
            infer_ms=result.infer_ms,
            latency_ms=(time.monotonic() - frame.mono) * 1000.0,
            detections=len(detections),
        )
        if self._observer is not None:
            self._observer.frame(detector.ref, result.infer_ms, [d.score for d in detections])
        if shadow is not None:
            if ahead is None:
                ahead = shadow.run(frame.image, detector, prepared)
            shadow.record(result, ahead)

    def _invoke(self, detector: Detector, prepared: Prepared) -> InferenceResult:
        batcher = self._batcher
        if batcher is not None:
            result = batcher.infer(self.name, detector, prepared)
            if result is not None:
                return result
        return detector.infer(prepared)

    def _emit(
        self,
        frame: Frame | Grabbed,
        detector: Detector,
        infer_ms: float,
        detections: list[Detection],
        size: tuple[int, int],
        *,
        repeat: bool = False,
    ) -> None:
        """Publish the frame's detections message (``size``: the inferred frame's height and
        width); offer the frame as a snapshot. ``repeat``: a motion-skipped frame carrying
        the last inferred result (``infer_ms`` 0)."""
        if detections or self._config.publish_empty:
            payload = self._encode(frame, detector, 0.0 if repeat else infer_ms, detections, size)
            if payload is not None:
                self._publish(self._topic, payload)
        if self.snapshots is not None and detections and isinstance(frame, Frame) and not repeat:
            self.snapshots.offer(frame.image, frame.ts, detector.ref, detections)

    @property
    def refused(self) -> int:
        """Detections messages dropped because they could not be brought within the
        protocol's bounds (logged at most once a minute)."""
        return self._refused.total

    def _encode(
        self,
        frame: Frame | Grabbed,
        detector: Detector,
        infer_ms: float,
        detections: list[Detection],
        size: tuple[int, int],
    ) -> bytes | None:
        """The checked payload (fitted to the bounds if needed), or None: logged, dropped.

        Never raises: a message that cannot be published must not stop the stream."""
        height, width = size
        try:
            message = Detections(
                schema=SCHEMA_VERSION,
                device_id=self._device_id,
                stream=self.name,
                seq=self._next_seq(),
                frame_ts=frame.ts,
                frame_index=frame.index,
                model=detector.ref,
                infer_ms=round(infer_ms, 3),
                width=width,
                height=height,
                detections=detections,
            )
            return encode_checked(message, fit=True)
        except (ProtocolError, TypeError, ValueError, OverflowError) as err:
            self._refused.refused("detections", err)
            return None
