"""The shipped test video's frames, and short videos written from frames (mp4v), for tests
that need a scene of their own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tests.agent_proc import VIDEO


def shipped_frames(count: int | None = None) -> list[np.ndarray[Any, Any]]:
    """The shipped video's first ``count`` frames (None: all 150), as BGR images."""
    cap = cv2.VideoCapture(str(VIDEO))
    frames: list[np.ndarray[Any, Any]] = []
    while count is None or len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def write_video(path: Path, frames: Sequence[np.ndarray[Any, Any]], fps: float = 15.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    assert path.stat().st_size > 0
    return path
