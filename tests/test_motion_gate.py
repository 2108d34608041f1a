"""Motion gating on the real daemon (real Mosquitto, real LiteRT on the shipped model/video).

A static scene is inferred on at most 20% of its frames; a face that walks in is inferred at
once; on the shipped video the gated stream reports the faces the ungated one does."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from protocol import Detections, Telemetry, decode
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Received, Subscriber

pytestmark = pytest.mark.slow

FACE_FRAMES = set(range(30)) | set(range(60, 90)) | set(range(120, 150))
STATIC_FRAME = 45
"""A frame of the shipped video without a face (frames 30-59 show the empty scene)."""
GATED = '[streams.motion]\nenabled = true\nmax_skip_s = 2\non_skip = "{}"\n'


def _frames() -> list[np.ndarray[Any, Any]]:
    cap = cv2.VideoCapture(str(VIDEO))
    frames: list[np.ndarray[Any, Any]] = []
    while True:
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


def _detections(messages: list[Received], stream: str) -> list[Detections]:
    return [decode(m.payload, Detections) for m in messages if m.topic.endswith(f"/{stream}")]


def _has_face(message: Detections) -> bool:
    return any(d.label == "face" and d.score >= 0.5 for d in message.detections)


def test_gating_skips_a_static_scene_and_infers_when_a_face_appears(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    shipped = _frames()
    static = [shipped[STATIC_FRAME]] * 60
    video = write_video(tmp_path / "static-then-face.mp4", static + shipped[:30])
    metrics_port = free_port()
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"])
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=stream_block(
            "door", source=str(video), realtime=True, loop=False, extra=GATED.format("nothing")
        ),
        extra=f"[metrics]\nenabled = true\nport = {metrics_port}\n",
    )
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        telemetry = sub.wait_for(
            lambda ms: any(
                s.frames_skipped >= 40
                for m in ms
                if m.topic.endswith("/telemetry")
                for s in decode(m.payload, Telemetry).streams
            ),
            timeout=30,
        )
        assert telemetry
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        line = next(x for x in body.splitlines() if 'frames_skipped_total{reason="motion"' in x)
        assert float(line.split()[-1]) >= 40, line
        assert 'frames_skipped_total{reason="fps",stream="door"} 0.0' in body
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            stop_agent(proc)
    sub.wait_for(lambda ms: any(b'"offline"' in m.payload for m in ms))
    sub.close()
    frames = _detections(sub.messages, "door")
    static_inferred = [f.frame_index for f in frames if f.frame_index < 60]
    assert 1 <= len(static_inferred) <= 12, f"static frames inferred: {static_inferred}"
    assert not any(_has_face(f) for f in frames if f.frame_index < 60)
    faces = [f for f in frames if f.frame_index >= 60]
    assert faces and faces[0].frame_index <= 61, "the face's first frame is inferred at once"
    assert _has_face(faces[0])
    with_face = {f.frame_index for f in faces if _has_face(f)}
    assert len(with_face) >= 27, f"face frames reported: {sorted(with_face)}"
    assert all(f.infer_ms > 0 for f in frames), "on_skip = nothing: only inferred frames"


def test_gated_recall_matches_ungated_on_the_shipped_video(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"])
    streams = stream_block("plain", source=str(VIDEO), realtime=False, loop=False)
    streams += stream_block(
        "gated", source=str(VIDEO), realtime=False, loop=False, extra=GATED.format("repeat")
    )
    proc = start_agent(
        write_config(tmp_path, port=mosquitto.port, streams=streams), tmp_path / "a.log"
    )
    try:
        assert proc.wait(60) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.wait_for(lambda ms: any(b'"offline"' in m.payload for m in ms))
    sub.close()
    plain, gated = _detections(sub.messages, "plain"), _detections(sub.messages, "gated")
    assert [f.frame_index for f in gated] == list(range(150)), "repeat: a message per frame"
    inferred = [f for f in gated if f.infer_ms > 0]
    repeated = [f for f in gated if f.infer_ms == 0]
    assert 30 <= len(repeated) <= 120, "the empty scene's frames are skipped"
    assert len(inferred) + len(repeated) == 150

    def recall(frames: list[Detections]) -> float:
        return sum(1 for f in frames if f.frame_index in FACE_FRAMES and _has_face(f)) / 90

    assert recall(plain) >= 0.95
    assert recall(gated) >= 0.98 * recall(plain), (recall(gated), recall(plain))
    false_faces = [
        f.frame_index for f in gated if f.frame_index not in FACE_FRAMES and _has_face(f)
    ]
    assert len(false_faces) <= 2, f"a repeated face outlived its scene: {false_faces}"
