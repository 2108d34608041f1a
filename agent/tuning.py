"""Per-process settings of the daemon (and of the benchmarks that measure it)."""

from __future__ import annotations

__all__ = ["tune_process"]


def tune_process() -> None:
    """Per-process settings for the daemon: one core for inference, the others for capture.

    OpenCV's own thread pool would compete with the inference thread for the same cores
    (measured: the detector's invoke() got 1.5-2x slower); each capture thread already
    runs on its own core.
    """
    import cv2

    cv2.setNumThreads(1)
