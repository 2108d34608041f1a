"""Batch inference: images, folders and videos → one JSON line per frame; images → detections.

A reader thread decodes and preprocesses (OpenCV releases the GIL) while the main thread
runs the model, so both cores stay busy.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import msgspec
import numpy as np
from tqdm import tqdm

from inference.detector import Detector, Prepared, load_detector
from inference.errors import InputError
from inference.models import resolve_model
from protocol import Detection

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpg", ".mjpeg"})


class BatchRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the --jsonl output."""

    source: str
    frame: int
    width: int
    height: int
    model: str
    infer_ms: float
    detections: list[Detection]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Item:
    source: str
    frame: int
    image: np.ndarray[Any, Any] | None
    prepared: Prepared | None
    error: str | None = None


_END = object()


def default_threads() -> int:
    """Inference threads when none are asked for: every core but one for the reader."""
    return max(1, (os.cpu_count() or 2) - 1)


def expand_sources(sources: list[str]) -> list[Path]:
    """Files in the given order; folders expanded to their images and videos, sorted."""
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
            if not found:
                raise InputError(
                    f"folder {p} has no images or videos ({', '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})"
                )
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_EXTS | VIDEO_EXTS:
                raise InputError(f"{p} is neither an image nor a video (by its extension)")
            files.append(p)
        else:
            raise InputError(f"{p} does not exist: give image files, folders or videos")
    return files


def _count_frames(files: list[Path]) -> int:
    total = 0
    for f in files:
        if f.suffix.lower() in VIDEO_EXTS:
            cap = cv2.VideoCapture(str(f))
            total += max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
            cap.release()
        else:
            total += 1
    return total


def _read(files: list[Path], detector: Detector) -> Iterator[_Item]:
    for f in files:
        name = str(f)
        if f.suffix.lower() in IMAGE_EXTS:
            image = cv2.imread(name, cv2.IMREAD_COLOR)
            if image is None:
                yield _Item(name, 0, None, None, "cannot decode image")
            else:
                yield _Item(name, 0, image, detector.preprocess(image))
            continue
        cap = cv2.VideoCapture(name)
        if not cap.isOpened():
            yield _Item(name, 0, None, None, "cannot open video")
            continue
        index = 0
        try:
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                yield _Item(name, index, image, detector.preprocess(image))
                index += 1
        finally:
            cap.release()


def _reader(
    files: list[Path], detector: Detector, out: queue.Queue[object], stop: threading.Event
) -> None:
    try:
        for item in _read(files, detector):
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    finally:
        while not stop.is_set():
            try:
                out.put(_END, timeout=0.2)
                break
            except queue.Full:
                continue


def run_batch(
    *,
    model: str,
    sources: list[str],
    out: Path,
    backend: str | None = None,
    threads: int | None = None,
    min_score: float | None = None,
    progress: bool = True,
) -> str:
    """Run ``model`` over ``sources`` and write JSON lines to ``out``; return a summary line."""
    files = expand_sources(sources)
    detector = load_detector(
        resolve_model(model, Path.cwd()),
        backend=backend,
        threads=threads or default_threads(),
        min_score=min_score,
    )
    encoder = msgspec.json.Encoder()
    items: queue.Queue[object] = queue.Queue(maxsize=8)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(files, detector, items, stop), daemon=True)
    frames = errors = found = 0
    started = time.perf_counter()
    stream: IO[bytes] = sys.stdout.buffer if str(out) == "-" else out.open("wb")
    bar = tqdm(total=_count_frames(files), unit="frame", disable=not progress, file=sys.stderr)
    reader.start()
    try:
        while (item := items.get()) is not _END:
            assert isinstance(item, _Item)
            if item.image is None or item.prepared is None:
                errors += 1
                record = BatchRecord(
                    source=item.source,
                    frame=item.frame,
                    width=0,
                    height=0,
                    model=detector.ref,
                    infer_ms=0.0,
                    detections=[],
                    error=item.error,
                )
            else:
                result = detector.infer(item.prepared)
                found += len(result.detections)
                h, w = item.image.shape[:2]
                record = BatchRecord(
                    source=item.source,
                    frame=item.frame,
                    width=int(w),
                    height=int(h),
                    model=detector.ref,
                    infer_ms=round(result.infer_ms, 3),
                    detections=result.detections,
                )
            stream.write(encoder.encode(record) + b"\n")
            frames += 1
            bar.update(1)
    finally:
        stop.set()
        bar.close()
        if stream is not sys.stdout.buffer:
            stream.close()
        reader.join(5.0)
        detector.close()
    elapsed = time.perf_counter() - started
    return (
        f"{frames} frames from {len(files)} file(s) in {elapsed:.2f} s "
        f"({frames / elapsed if elapsed else 0:.0f} frames/s), {found} detections, {errors} unreadable"
    )


def detect_images(
    manifest: Path, images: Sequence[Path], *, threads: int | None = None
) -> list[list[Detection]]:
    """Run the model of ``manifest`` on each image; one detection list per image, in order.

    The controller's model tooling (golden outputs of a bundle, the quantization report)
    uses this, so a bundle's expected outputs come from the very code the agent runs.
    Raises :class:`InputError` for an image that cannot be decoded.
    """
    with load_detector(manifest, threads=threads or default_threads()) as detector:
        results: list[list[Detection]] = []
        for img in images:
            frame = cv2.imread(str(img), cv2.IMREAD_COLOR)
            if frame is None:
                raise InputError(f"cannot decode image {img}; give a PNG or JPEG file")
            results.append(list(detector.detect(frame).detections))
    return results
