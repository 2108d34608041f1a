"""The fps cap (``streams[].fps``) in process, with the real parts (a paced file source,
LiteRT on the shipped model): frames the cap skips are only grabbed by the camera thread
(decoded, never converted to an image nor preprocessed), and the kept ones are inferred."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import StreamConfig
from inference.detector import load_detector
from inference.models import resolve_model
from inference.preprocess import Prepared
from protocol import Detections, decode
from tests.pipeline_run import run_to_end
from tests.video_files import shipped_frames, write_video

CLIP_FRAMES = 45
"""3 s of the shipped 15 fps video."""


def test_frames_the_fps_cap_skips_are_only_grabbed(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", shipped_frames(CLIP_FRAMES))
    model = resolve_model("builtin:blazeface-short-int8", tmp_path)
    config = StreamConfig(name="door", source=str(clip), model=str(model), fps=5)
    detector = load_detector(model)
    prepared: list[int] = []
    preprocess = detector.preprocess

    def counting(image: np.ndarray[Any, Any]) -> Prepared:
        prepared.append(1)
        return preprocess(image)

    detector.preprocess = counting  # type: ignore[method-assign,assignment]
    run = run_to_end(config, detector, realtime=True, timeout=30)
    stats, pipeline, processed = run.source, run.pipeline, run.processed
    assert stats.frames_captured == CLIP_FRAMES
    assert processed + pipeline.skipped_fps + stats.frames_dropped == CLIP_FRAMES
    assert pipeline.skipped_motion == 0
    assert 12 <= processed <= 18, f"5 fps of a 3 s clip: {processed} frames inferred"
    assert len(prepared) <= processed + 2, "only frames the cap keeps are preprocessed"
    assert stats.frames_grab_only >= CLIP_FRAMES - processed - 2
    indexes = [decode(p, Detections).frame_index for p in run.payloads]
    assert len(indexes) == processed and indexes == sorted(indexes)
    gaps = [b - a for a, b in itertools.pairwise(indexes)]
    assert sum(g == 3 for g in gaps) >= len(gaps) - 2, f"every third frame at 15 fps: {indexes}"
