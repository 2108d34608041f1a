"""Cross-stream batching: streams that share one model run their frames as one batch.

``[batching] mode = "auto"``: at start, the streams whose detectors are the same model
file on the same backend (threads, score threshold) form a group. The group loads its own
copy of the model, checks that the model takes a batch (inference.batching: the outputs
of a batch must equal separate calls bit for bit), times the group's size as one batch
against separate calls, logs both numbers and batches only where that was faster (``"always"``: wherever the model
can take the batch, whatever the numbers).

Per tick each stream's inference thread hands its prepared frame to the group and waits;
the frame that completes the batch (every member stream waiting), or the first whose
``max_wait_ms`` ran out, runs the batch for all of them. A stream that skips a frame
(motion gate, fps cap), has no frame (a camera that is down) or runs another model (after an
OTA swap) leaves the group until its next frame, so the others do not wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.config import BatchingConfig
from agent.stream import StreamHandle
from inference.batching import BatchedModel, BatchTiming
from inference.detector import Detector, InferenceResult, Prepared, load_detector
from inference.errors import InferenceError

__all__ = ["BatchGroup", "attach_batching", "close_batches"]

log = logging.getLogger(__name__)

Loader = Callable[[Detector], Detector]
"""Loads a second, independent copy of a stream's detector (same model, backend, threads)."""


@dataclass(slots=True)
class _Slot:
    stream: str
    prepared: Prepared
    taken: bool = False
    done: bool = False
    result: InferenceResult | None = None
    error: BaseException | None = field(default=None)


class BatchGroup:
    """The streams sharing one model: their frames inferred as one batch per tick."""

    def __init__(self, model: BatchedModel, streams: Sequence[str], *, max_wait_s: float) -> None:
        self.model = model
        self.ref = model.detector.ref
        self._path = model.detector.manifest_path
        self._backend = model.detector.backend_name
        self._members = frozenset(streams)
        self._active: set[str] = set(streams)
        self._pending: list[_Slot] = []
        self._max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._invoke = threading.Lock()
        self.batches = 0
        """Batched invokes so far (one per tick with two or more frames)."""

    def serves(self, stream: str, detector: Detector) -> bool:
        return (
            stream in self._members
            and detector.manifest_path == self._path
            and detector.backend_name == self._backend
        )

    def leave(self, stream: str) -> None:
        with self._cond:
            if stream in self._active:
                self._active.discard(stream)
                self._cond.notify_all()  # a waiting member may now complete the batch

    def infer(self, stream: str, detector: Detector, prepared: Prepared) -> InferenceResult | None:
        if not self.serves(stream, detector):
            self.leave(stream)
            return None
        slot = _Slot(stream, prepared)
        with self._cond:
            self._active.add(stream)
            self._pending.append(slot)
            take = self._take_if_full()
            deadline = time.monotonic() + self._max_wait_s
            while take is None and not slot.taken:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    take, self._pending = self._pending, []
                    break
                self._cond.wait(remaining)
                take = self._take_if_full() if not slot.taken else None
            if take is not None:
                for s in take:
                    s.taken = True
        if take is not None:
            self._run(take)
        with self._cond:
            while not slot.done:
                self._cond.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _take_if_full(self) -> list[_Slot] | None:
        """The pending frames when every active member has one waiting (lock held)."""
        waiting = {s.stream for s in self._pending}
        if self._pending and waiting >= self._active:
            take, self._pending = self._pending, []
            return take
        return None

    def _run(self, take: list[_Slot]) -> None:
        results: list[InferenceResult] = []
        error: BaseException | None = None
        with self._invoke:
            try:
                results = self.model.infer([s.prepared for s in take])
            except Exception as err:  # noqa: BLE001 - handed to every stream of the batch, which logs it
                error = err
        with self._cond:
            if len(take) > 1 and error is None:
                self.batches += 1
            for i, s in enumerate(take):
                s.error = error
                s.result = results[i] if error is None else None
                s.done = True
            self._cond.notify_all()

    def close(self) -> None:
        log.info("batching: %s ran %d batched invokes", self.ref, self.batches)
        with self._invoke:
            self.model.close()
            self.model.detector.close()


def _copy(detector: Detector) -> Detector:
    return load_detector(
        detector.manifest_path,
        backend=detector.backend_name,
        threads=detector.backend.threads,
        min_score=detector.min_score,
    )


def attach_batching(
    streams: Sequence[StreamHandle], config: BatchingConfig, *, load: Loader = _copy
) -> list[BatchGroup]:
    """Group the running streams by model and attach a batch group where batching measured
    faster than separate calls; returns the groups attached (the caller closes them)."""
    if config.mode == "off":
        return []
    by_model: dict[tuple[object, ...], list[StreamHandle]] = {}
    for handle in streams:
        det = handle.pipeline.detector if handle.pipeline is not None else None
        if det is not None:
            key = (det.manifest_path, det.backend_name, det.backend.threads, det.min_score)
            by_model.setdefault(key, []).append(handle)
    groups = []
    for members in by_model.values():
        if len(members) < 2:
            continue
        group = _measured_group(members, config, load)
        if group is not None:
            groups.append(group)
    return groups


def _measured_group(
    members: list[StreamHandle], config: BatchingConfig, load: Loader
) -> BatchGroup | None:
    names = [h.name for h in members]
    first = members[0].pipeline
    assert first is not None
    try:
        model = BatchedModel(load(first.detector), max_batch=len(members))
        timing = model.measure(len(members))
    except InferenceError as err:
        log.warning("batching: %s for streams %s not batched: %s", first.detector.ref, names, err)
        return None
    if timing is None or not (timing.faster or config.mode == "always"):
        log.info("batching: %s", _verdict(first.detector.ref, names, timing, used=False))
        model.close()
        model.detector.close()
        return None
    log.info("batching: %s", _verdict(first.detector.ref, names, timing, used=True))
    group = BatchGroup(model, names, max_wait_s=config.max_wait_ms / 1000.0)
    for handle in members:
        assert handle.pipeline is not None
        handle.pipeline.set_batcher(group)
    return group


def _verdict(ref: str, names: list[str], timing: BatchTiming | None, *, used: bool) -> str:
    if timing is None:
        return f"{ref} cannot take {len(names)} frames as one batch; streams {names} run alone"
    return (
        f"{ref} on streams {names}: {timing.batch_ms:.3f} ms per frame in a batch of "
        f"{timing.size} vs {timing.separate_ms:.3f} ms in separate calls; "
        + ("batched" if used else "separate calls")
    )


def close_batches(groups: Sequence[BatchGroup], streams: Sequence[StreamHandle]) -> None:
    """Close the groups' models once no inference thread can be inside a batch (a thread
    still running after the shutdown's join keeps them: closing under an invoke can crash)."""
    if all(h.pipeline is None or h.pipeline.finished.is_set() for h in streams):
        for group in groups:
            group.close()
