"""Inference for the local HTTP endpoint: a bounded queue and its own model copies.

Design (why HTTP requests can never starve the camera streams):

- **A separate interpreter per model and HTTP thread**, not a lock shared with the stream.
  ``Detector.infer`` (a LiteRT interpreter, an ONNX session's bound buffers) is not
  thread-safe. Sharing the stream's detector behind a lock would make every camera frame
  wait behind the HTTP request that holds it (a 4K image's request holds it for its whole
  invoke), so a burst of requests would cut the stream's frame rate; a fair lock would
  still halve it under load. With its own copy an HTTP request never blocks the stream's
  thread: the only contention left is for CPU time, and that is settled by the next point.
  The cost is one more interpreter (activation arena; the weights are memory-mapped) per
  active model and HTTP thread, loaded on the first request and closed when no stream runs
  that model any more.
- **Low priority threads**: each HTTP inference thread lowers its own scheduling priority
  (``nice`` +10, Linux per-thread), so on a busy core the kernel prefers the camera
  capture and stream inference threads; HTTP requests get the idle CPU time. The Python
  parts of a request hold the GIL briefly; decoding, resizing and ``invoke()`` release it
  (measured: two LiteRT interpreters on two threads run 2.0x one).
- **Bounded work**: at most ``max_concurrency`` inference threads and ``max_queue``
  requests waiting; a request beyond that is refused before its body is read (503 with
  ``Retry-After``). Image decoding runs on the inference threads too, so its CPU time is
  bounded the same way.
- **Hot swaps**: the model is looked up per request from what the stream runs *now*
  (``StreamPipeline.detector``), so the request after an OTA swap uses the new model.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.http_images import BadImage, ImageKind, decode_image
from agent.stream import StreamHandle
from inference.detector import Detector, load_detector, read_manifest
from inference.errors import InferenceError, ModelError
from protocol import SCHEMA_VERSION, Detections, encode_checked
from protocol.limits import MAX_DETECTIONS

log = logging.getLogger(__name__)

HTTP_NICENESS = 10
"""How much the HTTP inference threads lower their own priority (Linux ``nice``)."""


class RequestFailed(Exception):
    """A request that ends with an HTTP error status and a ``detail`` sentence."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model a stream runs now, as the HTTP endpoint serves it."""

    stream: str
    ref: str
    manifest_path: Path
    backend: str
    min_score: float
    labels: frozenset[str]
    """The stream's label filter (empty: all), applied to ``?stream=`` answers."""
    model_labels: tuple[str, ...]
    input_size: tuple[int, int]
    store_dir: Path | None = None
    """The stream's folder in the OTA model store: an update is loaded from its staging
    folder, which is renamed when it is activated, so the HTTP copy looks for it there."""

    @property
    def key(self) -> tuple[str, Path, str]:
        """What one loaded HTTP copy stands for."""
        return (self.ref, self.manifest_path, self.backend)


def served_models(
    streams: Sequence[StreamHandle], models_dir: Path | None = None
) -> list[ServedModel]:
    """What each running stream's pipeline runs now (a swapped-in model at once);
    ``models_dir``: the OTA model store's root."""
    served = []
    for handle in streams:
        if handle.pipeline is None:
            continue
        detector = handle.pipeline.detector
        manifest = detector.manifest
        served.append(
            ServedModel(
                stream=handle.name,
                ref=detector.ref,
                manifest_path=detector.manifest_path,
                backend=detector.backend_name,
                min_score=detector.min_score,
                labels=frozenset(handle.config.labels),
                model_labels=tuple(manifest.labels),
                input_size=(manifest.input.width, manifest.input.height),
                store_dir=models_dir / handle.name if models_dir is not None else None,
            )
        )
    return served


def lower_thread_priority(niceness: int | None = None) -> None:
    """Lower the calling thread's priority by ``niceness`` (default :data:`HTTP_NICENESS`;
    Linux: per thread); elsewhere nothing."""
    if niceness is None:
        niceness = HTTP_NICENESS
    if niceness <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except (AttributeError, OSError) as err:  # not Linux, or a seccomp profile refuses it
        log.debug("http: cannot lower the inference thread's priority: %s", err)


@dataclass(slots=True)
class Job:
    """One admitted request: an image body for ``model``."""

    body: bytes
    kind: ImageKind
    model: ServedModel
    by_stream: bool
    received_ts: float
    done: threading.Event = field(default_factory=threading.Event)
    payload: bytes | None = None
    error: RequestFailed | None = None


class InferencePool:
    """``max_concurrency`` low-priority threads serving at most ``max_queue`` waiting jobs."""

    def __init__(
        self,
        *,
        device_id: str,
        catalog: Callable[[], list[ServedModel]],
        max_queue: int,
        max_concurrency: int,
        load: Callable[[ServedModel], Detector] | None = None,
        niceness: int | None = None,
    ) -> None:
        self._device_id = device_id
        self._catalog = catalog
        self._load = load or _load_copy
        self._niceness = niceness
        self.capacity = max_queue + max_concurrency
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"http-infer-{i}", daemon=True)
            for i in range(max_concurrency)
        ]
        self.busy = 0
        self._busy_lock = threading.Lock()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads after their current job; they close their model copies."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def admit(self) -> bool:
        """Take a place in the queue; False when ``max_queue`` requests already wait."""
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        """Give back a place taken by :meth:`admit` that is not submitted after all."""
        self._slots.release()

    def submit(self, job: Job) -> None:
        """Queue an admitted job; its place is given back when it is done."""
        self._jobs.put(job)

    def _work(self) -> None:
        lower_thread_priority(self._niceness)
        copies: dict[tuple[str, Path, str], Detector] = {}
        try:
            for model in self._catalog():  # the first request need not wait for a load
                with contextlib.suppress(RequestFailed):  # logged; a request tries again
                    self._copy(copies, model)
            while (job := self._jobs.get()) is not None:
                with self._busy_lock:
                    self.busy += 1
                try:
                    job.payload = self._run(copies, job)
                except RequestFailed as err:
                    job.error = err
                except Exception as err:  # a request must never end the thread
                    log.exception("http: inference failed with %s", job.model.ref)
                    job.error = RequestFailed(500, f"inference with {job.model.ref} failed: {err}")
                finally:
                    with self._busy_lock:
                        self.busy -= 1
                    self._slots.release()
                    job.done.set()
                self._evict(copies)
        except Exception:
            log.exception("http: inference thread failed")
        finally:
            for detector in copies.values():
                detector.close()

    def _copy(self, copies: dict[tuple[str, Path, str], Detector], model: ServedModel) -> Detector:
        detector = copies.get(model.key)
        if detector is None:
            try:
                detector = self._load(model)
            except Exception as err:
                log.warning("http: cannot load %s: %s", model.ref, err)
                raise RequestFailed(
                    503,
                    f"model {model.ref} could not be loaded for HTTP requests ({err}); the "
                    "agent log has the details",
                ) from err
            copies[model.key] = detector
        return detector

    def _evict(self, copies: dict[tuple[str, Path, str], Detector]) -> None:
        """Close the copies of models no stream runs any more (after an OTA swap)."""
        active = {m.key for m in self._catalog()}
        for key in [k for k in copies if k not in active]:
            copies.pop(key).close()
            log.info("http: closed its copy of %s (no stream runs it now)", key[0])

    def _run(self, copies: dict[tuple[str, Path, str], Detector], job: Job) -> bytes:
        try:
            image = decode_image(job.body, job.kind)
        except BadImage as err:
            raise RequestFailed(400, str(err)) from err
        model = job.model
        detector = self._copy(copies, model)
        result = detector.infer(detector.preprocess(image), min_score=model.min_score)
        detections = result.detections
        if job.by_stream and model.labels:
            detections = [d for d in detections if d.label in model.labels]
        with self._seq_lock:
            seq = next(self._seq)
        height, width = image.shape[:2]
        message = Detections(
            schema=SCHEMA_VERSION,
            device_id=self._device_id,
            stream=model.stream,
            seq=seq,
            frame_ts=job.received_ts,
            frame_index=seq,
            model=detector.ref,
            infer_ms=round(result.infer_ms, 3),
            width=int(width),
            height=int(height),
            detections=detections[:MAX_DETECTIONS],
        )
        return encode_checked(message, fit=True)


def _load_copy(model: ServedModel) -> Detector:
    """The HTTP threads' own copy of ``model``: one inference thread, the stream's backend."""
    return load_detector(
        find_manifest(model), backend=model.backend, threads=1, min_score=model.min_score
    )


def find_manifest(model: ServedModel, *, tries: int = 3) -> Path:
    """Where ``model``'s manifest is now: where the stream loaded it from, or, for an OTA
    update whose staging folder was renamed when it was activated, its slot in the store."""
    for attempt in range(tries):
        if model.manifest_path.is_file():
            return model.manifest_path
        if model.store_dir is not None:
            for candidate in sorted(model.store_dir.glob("*/manifest.json")):
                with contextlib.suppress(InferenceError):
                    if read_manifest(candidate).ref == model.ref:
                        return candidate
        if attempt + 1 < tries:
            time.sleep(0.05)  # a folder being renamed right now
    raise ModelError(
        f"the manifest of {model.ref} is no longer at {model.manifest_path} and no installed "
        f"copy is in {model.store_dir}"
    )
