"""Snapshot cost on the device: draw + JPEG encode against one inference, and the bytes.

On the shipped video (640x480) and the shipped INT8 BlazeFace, in one process with the
agent's settings (``tune_process``: OpenCV on one thread): for every frame with a face, one
inference (preprocess + invoke + decode) and one snapshot (boxes and labels drawn on a
copy, JPEG encoded within ``max_bytes`` as ``agent.snapshots`` does) are timed in CPU time
of the calling thread (``time.thread_time``; the detector runs one thread, in the caller).
Printed: the mean and p95 of each, their ratio, and the JPEG bytes (mean / max) for the
default ``[snapshots]`` (quality 80, max_bytes 100000) and two other qualities. With the
default ``interval_s = 30`` one snapshot per stream costs that ratio / (30 s x fps) of the
inference thread's CPU. Run: ``.venv/bin/python -m bench.snapshots``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.app import tune_process
from agent.config import SnapshotsConfig
from agent.snapshots import draw, encode_jpeg
from inference import ASSETS_DIR
from inference.detector import load_detector
from tests.agent_proc import VIDEO

MODEL = ASSETS_DIR / "blazeface-short-int8.json"


@dataclass(frozen=True, slots=True)
class Row:
    quality: int
    snapshot_ms: list[float]
    infer_ms: list[float]
    sizes: list[int]
    widths: list[int]


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def _frames() -> list[np.ndarray[Any, Any]]:
    cap = cv2.VideoCapture(str(VIDEO))
    frames: list[np.ndarray[Any, Any]] = []
    while True:
        ok, image = cap.read()
        if not ok:
            return frames
        frames.append(image)


def measure(quality: int, max_bytes: int, rounds: int) -> Row:
    detector = load_detector(MODEL)
    frames = _frames()
    snapshot_ms: list[float] = []
    infer_ms: list[float] = []
    sizes: list[int] = []
    widths: list[int] = []
    try:
        detector.infer(detector.preprocess(frames[0]))  # warm-up
        encode_jpeg(draw(frames[0], []), quality=quality, max_bytes=max_bytes)
        for _ in range(rounds):
            for image in frames:
                t0 = time.thread_time()
                result = detector.infer(detector.preprocess(image))
                t1 = time.thread_time()
                if not result.detections:
                    continue
                encoded = encode_jpeg(
                    draw(image, result.detections), quality=quality, max_bytes=max_bytes
                )
                t2 = time.thread_time()
                infer_ms.append((t1 - t0) * 1000)
                snapshot_ms.append((t2 - t1) * 1000)
                if encoded is not None:
                    sizes.append(len(encoded.jpeg))
                    widths.append(encoded.width)
    finally:
        detector.close()
    return Row(quality, snapshot_ms, infer_ms, sizes, widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the video")
    args = parser.parse_args()
    tune_process()
    default = SnapshotsConfig()
    print(
        f"snapshot cost on {VIDEO.name} (640x480), {MODEL.stem}, CPU time of one thread, "
        f"frames with a face only; max_bytes {default.max_bytes}"
    )
    print(
        f"{'quality':>8} {'n':>5} {'snapshot ms':>12} {'p95':>7} {'infer ms':>9} {'p95':>7} "
        f"{'ratio':>6} {'bytes mean':>11} {'max':>7} {'halved':>7}"
    )
    for quality in (default.quality, 60, 95):
        row = measure(quality, default.max_bytes, args.rounds)
        snap, infer = statistics.fmean(row.snapshot_ms), statistics.fmean(row.infer_ms)
        halved = sum(w < 640 for w in row.widths)
        mark = " (default)" if quality == default.quality else ""
        print(
            f"{quality:>8} {len(row.snapshot_ms):>5} {snap:>12.2f} {_p95(row.snapshot_ms):>7.2f} "
            f"{infer:>9.2f} {_p95(row.infer_ms):>7.2f} {snap / infer:>6.1f} "
            f"{statistics.fmean(row.sizes):>11.0f} {max(row.sizes):>7} {halved:>7}{mark}"
        )
    print(
        "ratio: one snapshot's draw + encode CPU time / one inference's; the agent takes at "
        f"most one per stream per interval_s ({default.interval_s:.0f} s by default), off "
        "the inference thread at a lower priority"
    )


if __name__ == "__main__":
    main()
