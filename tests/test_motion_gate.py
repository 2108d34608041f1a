"""Motion gating on the real daemon (real Mosquitto, real LiteRT on the shipped model/video).

A static scene is inferred on at most 20% of its frames, and only every ``check_every``-th of
its frames is converted to an image (the others are only grabbed); a face that walks in is
inferred at the next check; on the shipped video the gated stream reports the faces the
ungated one does."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from agent.config import StreamConfig
from agent.motion import MotionConfig
from inference.detector import load_detector
from inference.models import resolve_model
from protocol import Detections, Telemetry, decode
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Received, Subscriber
from tests.pipeline_run import run_to_end
from tests.video_files import shipped_frames, write_video

pytestmark = pytest.mark.slow

FACE_FRAMES = set(range(30)) | set(range(60, 90)) | set(range(120, 150))
STATIC_FRAME = 45
"""A frame of the shipped video without a face (frames 30-59 show the empty scene)."""
GATED = '[streams.motion]\nenabled = true\nmax_skip_s = 2\non_skip = "{}"\n'


def _detections(messages: list[Received], stream: str) -> list[Detections]:
    return [decode(m.payload, Detections) for m in messages if m.topic.endswith(f"/{stream}")]


def _has_face(message: Detections) -> bool:
    return any(d.label == "face" and d.score >= 0.5 for d in message.detections)


def test_gating_skips_a_static_scene_and_infers_when_a_face_appears(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    shipped = shipped_frames()
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
    # Frame 60 is a check frame of the default check_every = 3: inferred at once.
    assert faces and faces[0].frame_index <= 61, "the face's first frame is inferred at once"
    assert _has_face(faces[0])
    with_face = {f.frame_index for f in faces if _has_face(f)}
    assert len(with_face) >= 27, f"face frames reported: {sorted(with_face)}"
    assert all(f.infer_ms > 0 for f in frames), "on_skip = nothing: only inferred frames"


def _metric(body: str, name: str, labels: str = "") -> float:
    start = f"edgefleet_stream_{name}_total{{{labels}"
    line = next(x for x in body.splitlines() if x.startswith(start) and 'stream="door"' in x)
    return float(line.split()[-1])


def test_a_still_scene_converts_only_every_check_every_th_frame_to_an_image(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    video = write_video(tmp_path / "static.mp4", [shipped_frames()[STATIC_FRAME]] * 60)
    metrics_port = free_port()
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/telemetry"])
    extra = "[streams.motion]\nenabled = true\nmax_skip_s = 2\ncheck_every = 4\n"
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=stream_block("door", source=str(video), realtime=True, loop=True, extra=extra),
        extra=f"[metrics]\nenabled = true\nport = {metrics_port}\n",
    )
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        sub.wait_for(
            lambda ms: any(
                s.frames_captured >= 75 for m in ms for s in decode(m.payload, Telemetry).streams
            ),
            timeout=30,
        )
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        stop_agent(proc)
        sub.close()
    captured = _metric(body, "frames_captured")
    grabbed = _metric(body, "frames_grab_only")
    converted = captured - grabbed
    # Every 4th frame, plus a frame or two a max_skip_s (2 s) and the first few (no
    # inferred frame yet).
    assert captured / 4 <= converted <= captured / 4 + captured / 15 + 6, (captured, grabbed)
    skipped = _metric(body, "frames_skipped", 'reason="motion"')
    processed = _metric(body, "frames_processed")
    dropped = _metric(body, "frames_dropped")
    assert skipped >= grabbed, "a grabbed frame is a skipped one (or dropped)"
    assert captured - 2 <= processed + skipped + dropped <= captured, body
    assert processed <= captured / 15 + 3, "inferred once a max_skip_s (and the first)"


def test_grabbed_frames_are_skipped_repeated_and_a_face_is_inferred_at_the_next_check(
    tmp_path: Path,
) -> None:
    """In process with the real parts, a file read without drops: exact counts."""
    shipped = shipped_frames()
    video = write_video(
        tmp_path / "still-then-face.mp4", [shipped[STATIC_FRAME]] * 90 + shipped[:30]
    )
    model = resolve_model("builtin:blazeface-short-int8", tmp_path)
    motion = MotionConfig(enabled=True, max_skip_s=2.0, on_skip="repeat", check_every=4)
    config = StreamConfig(name="door", source=str(video), model=str(model), motion=motion)
    run = run_to_end(config, load_detector(model), realtime=False)
    stats, pipeline, payloads, processed = run.source, run.pipeline, run.payloads, run.processed
    assert (stats.frames_captured, stats.frames_dropped) == (120, 0)
    assert processed + pipeline.skipped_motion == 120 and pipeline.skipped_fps == 0
    assert 64 <= stats.frames_grab_only <= 120 - processed
    messages = [decode(p, Detections) for p in payloads]
    assert [m.frame_index for m in messages] == list(range(120)), "repeat: one message a frame"
    assert all((m.width, m.height) == (640, 480) for m in messages)
    inferred = [m.frame_index for m in messages if m.infer_ms > 0]
    assert len(inferred) == processed
    still = [i for i in inferred if i < 90]
    assert still and all(i % 4 == 0 or i < 4 for i in still), f"inferred: {still}"
    first_face = next(m for m in messages if m.infer_ms > 0 and m.frame_index >= 90)
    assert first_face.frame_index <= 93, "motion on a grabbed frame is seen at the next check"
    assert _has_face(first_face)
    assert not any(_has_face(m) for m in messages if m.frame_index < first_face.frame_index)
    moving = [i for i in inferred if i > first_face.frame_index]
    assert len(moving) >= 15, f"a moving scene is checked frame by frame: {moving}"


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
