"""Several frames of one model in one ``invoke``: the batch API and its start-up measurement.

A backend that can batch (:meth:`Backend.batched`: LiteRT ``resize_tensor_input``, ONNX
models with a dynamic first dimension; TensorRT would need an optimization profile per
batch size and is not batched) gives a second instance of the model taking N frames. Where
each frame's rows land in the batched outputs is not promised: a model whose head reshapes
to ``[1, -1, C]`` (BlazeFace) puts its feature maps one after the other, each batch-major
(``[1, N*512 + N*384, 16]``). :class:`BatchedModel` finds that layout once per batch size by
running distinct random inputs both ways, keeps it as a gather index per output, and refuses
the batch size unless every output of the batch equals the separate calls bit for bit. So a
batched frame yields exactly the detections a separate call would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.backends.base import Backend, TensorInfo
from inference.detector import Detector, InferenceResult, Prepared

__all__ = ["BatchTiming", "BatchedModel", "batch_sizes", "find_layout"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Per-frame cost of ``size`` frames as separate calls and as one batch (medians, ms)."""

    size: int
    separate_ms: float
    batch_ms: float

    @property
    def faster(self) -> bool:
        return self.batch_ms < self.separate_ms


def _random_input(info: TensorInfo, shape: Sequence[int], rng: np.random.Generator) -> Any:
    if np.issubdtype(info.dtype, np.integer):
        bounds = np.iinfo(info.dtype)
        return rng.integers(bounds.min, bounds.max, size=tuple(shape), endpoint=True).astype(
            info.dtype
        )
    return rng.uniform(-1.0, 1.0, size=tuple(shape)).astype(info.dtype)


def find_layout(
    single: Sequence[npt.NDArray[Any]], batched: npt.NDArray[Any]
) -> npt.NDArray[np.intp] | None:
    """Row gather index ``(n, rows)`` into ``batched`` flattened to rows, so that
    ``rows_of(batched)[index[i]]`` equals ``single[i]`` (each ``[1, rows, ...]``); None when the
    batch is not a stack of batch-major segments of the single outputs.

    Rows are axis 1 of a ``[1, n*rows, ...]`` output, or the flattened first two axes of an
    ``[n, rows, ...]`` one (the plain batch dimension: the identity layout)."""
    n = len(single)
    one = single[0]
    if n < 2 or one.ndim < 2 or one.shape[0] != 1 or batched.size != n * one.size:
        return None
    rows = one.shape[1]
    flat = batched.reshape((n * rows, -1))
    items = [s.reshape((rows, -1)) for s in single]
    index = np.empty((n, rows), dtype=np.intp)
    start = 0  # first row of the current segment in a single output
    while start < rows:
        size = _segment_size(items, flat, start, rows)
        if size is None:
            return None
        for i in range(n):
            index[i, start : start + size] = np.arange(size) + n * start + i * size
        start += size
    return index


def _segment_size(
    items: Sequence[npt.NDArray[Any]], flat: npt.NDArray[Any], start: int, rows: int
) -> int | None:
    """Rows in the segment that begins at ``start``: the largest size for which every frame's
    rows sit one after the other in the batch (batch-major), checked on all frames."""
    n = len(items)
    base = n * start
    for size in range(rows - start, 0, -1):
        if base + size >= len(flat) or not np.array_equal(flat[base + size], items[1][start]):
            continue  # frame 1's segment does not begin where frame 0's would end
        if all(
            np.array_equal(
                flat[base + i * size : base + (i + 1) * size], items[i][start : start + size]
            )
            for i in range(n)
        ):
            return size
    return None


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a model is prepared for, largest first: ``max_batch`` and the powers
    of two below it. Every size costs an interpreter whose activations grow with it (about
    1 MB per frame for BlazeFace), so 8 streams keep 3 of them, not 7."""
    sizes = {max_batch} | {1 << i for i in range(1, max_batch.bit_length()) if 1 << i < max_batch}
    return tuple(sorted((s for s in sizes if s >= 2), reverse=True))


class BatchedModel:
    """Runs a detector's model on several prepared frames in one invoke.

    ``infer(prepared)`` decodes each frame with the detector's own decoder. N frames run as
    chunks of the prepared sizes (:func:`batch_sizes`, largest first: 7 of 8 streams = 4 +
    2 + 1); a chunk of one, or of a size the model cannot batch, runs as separate calls.
    One thread at a time."""

    def __init__(self, detector: Detector, *, max_batch: int, seed: int = 0) -> None:
        self.detector = detector
        self.max_batch = max_batch
        self._backends: dict[int, Backend] = {}
        self._layouts: dict[int, list[npt.NDArray[np.intp]]] = {}
        self._refused: set[int] = set()
        self._rng = np.random.default_rng(seed)
        self._input = detector.backend.inputs[0]
        self.sizes = batch_sizes(max_batch)

    def supports(self, size: int) -> bool:
        """Whether ``size`` frames run as one batch (probed once per size)."""
        if size not in self.sizes or size in self._refused:
            return False
        if size in self._layouts:
            return True
        backend = self.detector.backend.batched(size)
        layouts = self._probe(backend, size) if backend is not None else None
        if backend is None or layouts is None:
            if backend is not None:
                backend.close()
            self._refused.add(size)
            log.info("%s cannot run %d frames as one batch", self.detector.ref, size)
            return False
        self._backends[size], self._layouts[size] = backend, layouts
        return True

    def _probe(self, backend: Backend, size: int) -> list[npt.NDArray[np.intp]] | None:
        single_shape = self.detector.backend.inputs[0].shape
        shape = [1, *(d if d > 0 else 1 for d in single_shape[1:])]
        inputs = [_random_input(self._input, shape, self._rng) for _ in range(size)]
        singles = self._separate(inputs)
        backend.set_input(np.concatenate(inputs))
        backend.invoke()
        layouts = []
        for k in range(len(singles[0])):
            layout = find_layout([s[k] for s in singles], backend.output(k))
            if layout is None:
                return None
            layouts.append(layout)
        return layouts

    def _separate(self, inputs: Sequence[Any]) -> list[list[npt.NDArray[Any]]]:
        single = self.detector.backend
        outputs = []
        for array in inputs:
            single.set_input(array)
            single.invoke()
            outputs.append([np.array(single.output(k)) for k in range(len(single.outputs))])
        return outputs

    def infer(self, prepared: Sequence[Prepared]) -> list[InferenceResult]:
        results: list[InferenceResult] = []
        start = 0
        while start < len(prepared):
            left = len(prepared) - start
            size = next((s for s in self.sizes if s <= left and self.supports(s)), 1)
            chunk = prepared[start : start + size]
            if size == 1:
                results.append(self.detector.infer(chunk[0]))
            else:
                results.extend(self._batch(chunk))
            start += size
        return results

    def _batch(self, prepared: Sequence[Prepared]) -> list[InferenceResult]:
        size = len(prepared)
        backend = self._backends[size]
        backend.set_input(np.concatenate([p.tensor for p in prepared]))
        wall_ms, thread_ms = backend.timed_invoke()
        infer_ms = wall_ms / size
        cpu_ms = thread_ms / size if thread_ms is not None else None
        outputs = []
        for k, layout in enumerate(self._layouts[size]):
            array = backend.output(k)
            rows = array.reshape((size * layout.shape[1], *array.shape[2:]))
            outputs.append(rows[layout][:, None])  # frame i: [1, rows, ...] like a single call
        return [
            self.detector.decode([out[i] for out in outputs], p, infer_ms, cpu_ms=cpu_ms)
            for i, p in enumerate(prepared)
        ]

    def measure(self, size: int, *, runs: int = 20) -> BatchTiming | None:
        """Median per-frame cost of ``size`` frames separately and batched; None when the model
        cannot batch that many."""
        if not self.supports(size):
            return None
        shape = [1, *(d if d > 0 else 1 for d in self._input.shape[1:])]
        inputs = [_random_input(self._input, shape, self._rng) for _ in range(size)]
        batch = np.concatenate(inputs)
        single, batched = self.detector.backend, self._backends[size]
        separate_s, batch_s = [], []
        for _ in range(runs):
            start = time.perf_counter()
            for array in inputs:
                single.set_input(array)
                single.invoke()
            separate_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            batched.set_input(batch)
            batched.invoke()
            batch_s.append(time.perf_counter() - start)
        return BatchTiming(
            size=size,
            separate_ms=float(np.median(separate_s)) * 1000.0 / size,
            batch_ms=float(np.median(batch_s)) * 1000.0 / size,
        )

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        self._layouts.clear()
