"""One stream of the real agent pipeline in process, run to the end of a video file (a real
FrameSource and StreamPipeline, LiteRT on the given detector; messages collected, not
published)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config import StreamConfig
from agent.pipeline import StreamPipeline
from agent.sources import FrameSource, SourceStats
from inference.detector import Detector


@dataclass(frozen=True, slots=True)
class FileRun:
    source: SourceStats
    pipeline: StreamPipeline
    payloads: list[bytes]
    """The detections messages, in publishing order."""

    @property
    def processed(self) -> int:
        return self.pipeline.stats.snapshot().frames_processed


def run_to_end(
    config: StreamConfig, detector: Detector, *, realtime: bool, timeout: float = 60.0
) -> FileRun:
    """Run ``config``'s stream (its ``source``: a video file, not looped) to the end of the
    file with ``detector``, which is closed afterwards."""
    payloads: list[bytes] = []
    counter = iter(range(1 << 30))
    source = FrameSource(name=config.name, uri=config.source, loop=False, realtime=realtime)
    pipeline = StreamPipeline(
        device_id="cam-01",
        config=config,
        source=source,
        detector=detector,
        publish=lambda _topic, payload: payloads.append(payload),
        next_seq=lambda: next(counter),
    )
    pipeline.start()
    source.start()
    try:
        assert pipeline.finished.wait(timeout), f"{Path(config.source).name} runs to its end"
    finally:
        source.stop()
        pipeline.stop()
        detector.close()
    return FileRun(source.stats(), pipeline, payloads)
