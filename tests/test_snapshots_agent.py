"""Camera snapshots of the agent (``[snapshots]``): the real daemon on the shipped video and
model against a real Mosquitto, plus the worker, encoder and config on their own."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest

from agent.config import SnapshotsConfig, parse_config
from agent.errors import ConfigError
from agent.homeassistant import discovery_messages, removal_messages
from agent.snapshots import BOX_BGR, SnapshotWorker, encode_jpeg, qualities
from protocol import Detection, Snapshot, decode
from protocol.limits import MAX_SNAPSHOT_DETECTIONS
from tests.agent_proc import REPO, VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Received, Subscriber
from tests.waiting import wait_for

SCHEMA = json.loads((REPO / "docs" / "protocol" / "snapshot.schema.json").read_text("utf-8"))
TOPIC = "edgefleet/v1/{device}/snapshot/front"


def _log(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-4000:]


def _start(
    tmp: Path, broker: Mosquitto, *, device: str = "cam-01", snapshots: str = "", extra: str = ""
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """The agent on the looping video at camera speed, with /metrics on a free port."""
    work = tmp / device
    work.mkdir()
    port = free_port()
    config = write_config(
        work,
        port=broker.port,
        device_id=device,
        streams=stream_block("front", source=str(VIDEO), realtime=True, loop=True),
        extra=f"{extra}\n[metrics]\nenabled = true\nport = {port}\n{snapshots}",
    )
    log = work / "agent.log"
    return start_agent(config, log), port, log


def _counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(
        r'^edgefleet_agent_snapshots_total\{result="(\w+)",stream="front"\} (\S+)$', text, re.M
    )
    return {result: float(n) for result, n in found}


def _dropped_twice(port: int) -> bool:
    """Whether the agent on ``port`` counted two snapshots too large; False while its /metrics
    does not answer yet (CI found the second agent of a test still starting when the first
    had published two snapshots)."""
    try:
        return _counts(port).get("too_large", 0) >= 2
    except OSError:  # URLError is one: connection refused while the agent starts
        return False


def _snapshots(messages: list[Received], device: str = "cam-01") -> list[Snapshot]:
    topic = TOPIC.format(device=device)
    return [decode(m.payload, Snapshot) for m in messages if m.topic == topic]


def _green(pixel: np.ndarray[Any, Any]) -> bool:
    b, g, r = (int(v) for v in pixel)
    return g >= 150 and r <= 120 and b <= 120


def _outline_is_box_colour(image: np.ndarray[Any, Any], box: tuple[float, ...]) -> float:
    """Share of points on the box's outline (where the agent draws it) that are green."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (round(v * (s - 1)) for v, s in zip(box, (w, h, w, h), strict=True))
    points = [(x, y) for x in np.linspace(x0, x1, 12).round().astype(int) for y in (y0, y1)]
    points += [(x, y) for y in np.linspace(y0, y1, 12).round().astype(int)[2:] for x in (x0, x1)]
    return sum(_green(image[y, x]) for x, y in points) / len(points)


# --- the real agent ---------------------------------------------------------------------------


def test_the_agent_publishes_a_retained_snapshot_with_the_face_box_drawn_at_most_once_per_interval(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/snapshot/#"])
    started = time.monotonic()
    proc, port, log = _start(
        tmp_path, mosquitto, snapshots="[snapshots]\nenabled = true\ninterval_s = 2\n"
    )
    try:
        sub.wait_for(lambda ms: len(_snapshots(ms)) >= 1, timeout=30)
        time.sleep(6)
        counts = _counts(port)
        code, _ = stop_agent(proc)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.close()
    assert code == 0, _log(log)
    raw = [m for m in sub.messages if m.topic == TOPIC.format(device="cam-01")]
    shots = _snapshots(sub.messages)
    assert 2 <= len(shots) <= math.ceil(elapsed / 2.0) + 1, f"{len(shots)} in {elapsed:.1f}s"
    assert counts["published"] >= len(shots) and counts["too_large"] == 0
    assert not [m for m in sub.messages if m.topic.endswith("/jpeg")], "no HA: no raw JPEG"
    for m, shot in zip(raw, shots, strict=True):
        jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(m.payload))
        assert shot.model == "blazeface-short-int8@1.0.0" and shot.stream == "front"
        assert shot.detections and shot.detections[0].label == "face"
        jpeg = base64.b64decode(shot.jpeg)
        assert len(jpeg) <= 100_000
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (shot.height, shot.width) == (480, 640)
        share = _outline_is_box_colour(image, shot.detections[0].box)
        assert share >= 0.8, f"only {share:.0%} of the first box's outline is the box colour"
    # Retained: a subscriber arriving now gets the latest one at once.
    late = Subscriber(mosquitto.port, [TOPIC.format(device="cam-01")], persistent=False)
    try:
        got = late.wait_for(lambda ms: len(ms) > 0, timeout=10)
    finally:
        late.close()
    assert got[0].retain and got[0].payload == raw[-1].payload


def test_snapshots_are_off_by_default(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"])
    config = write_config(tmp_path, port=mosquitto.port)  # the whole video, then exit
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        assert proc.wait(60) == 0, _log(tmp_path / "agent.log")
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.wait_for(lambda ms: any(b'"offline"' in m.payload for m in ms))
    sub.close()
    faces = [m for m in sub.messages if "/detections/" in m.topic and b'"face"' in m.payload]
    assert len(faces) >= 60, "frames with faces were inferred"
    assert not [m for m in sub.messages if "/snapshot/" in m.topic]
    late = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"], persistent=False)
    try:
        late.wait_for(lambda ms: any(m.topic.endswith("/status") for m in ms), timeout=10)
        time.sleep(0.5)
    finally:
        late.close()
    assert not [m for m in late.messages if "/snapshot/" in m.topic], "nothing retained"


def test_a_small_max_bytes_downscales_a_tiny_one_drops_and_counts(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/+/snapshot/#"])
    snap = "[snapshots]\nenabled = true\ninterval_s = 1\nquality = 95\nmax_bytes = {}\n"
    small, small_port, small_log = _start(
        tmp_path, mosquitto, device="cam-small", snapshots=snap.format(12_000)
    )
    tiny, tiny_port, tiny_log = _start(
        tmp_path, mosquitto, device="cam-tiny", snapshots=snap.format(5_000)
    )
    try:
        sub.wait_for(lambda ms: len(_snapshots(ms, "cam-small")) >= 2, timeout=30)
        wait_for(
            lambda: _dropped_twice(tiny_port),
            timeout=30,
            what=lambda: f"the tiny cap to drop two snapshots; its log:\n{_log(tiny_log)}",
        )
        tiny_counts, small_counts = _counts(tiny_port), _counts(small_port)
        assert stop_agent(small)[0] == 0, _log(small_log)
        assert stop_agent(tiny)[0] == 0, _log(tiny_log)
    finally:
        for proc in (small, tiny):
            if proc.poll() is None:
                proc.kill()
    sub.close()
    for shot in _snapshots(sub.messages, "cam-small"):
        jpeg = base64.b64decode(shot.jpeg)
        assert len(jpeg) <= 12_000
        assert (shot.width, shot.height) == (320, 240), "over the cap at 640x480: half size"
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (240, 320)
    assert small_counts["published"] >= 2 and small_counts["too_large"] == 0
    assert tiny_counts["published"] == 0
    assert not _snapshots(sub.messages, "cam-tiny"), "a dropped snapshot is not published"


def test_home_assistant_gets_a_camera_entity_and_the_raw_jpeg(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["homeassistant/#", "edgefleet/v1/cam-01/snapshot/#"])
    proc, _, log = _start(
        tmp_path,
        mosquitto,
        snapshots="[snapshots]\nenabled = true\ninterval_s = 1\n",
        extra="[homeassistant]\nenabled = true\n",
    )
    jpeg_topic = TOPIC.format(device="cam-01") + "/jpeg"
    try:
        sub.wait_for(lambda ms: sum(m.topic == jpeg_topic for m in ms) >= 2, timeout=30)
        assert stop_agent(proc)[0] == 0, _log(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.close()
    configs = {m.topic: json.loads(m.payload) for m in sub.messages if m.topic.endswith("/config")}
    camera = configs["homeassistant/camera/cam-01/front_snapshot/config"]
    assert camera["topic"] == jpeg_topic
    assert camera["unique_id"] == "edgefleet_cam_01_front_snapshot"
    assert camera["availability"][0]["topic"] == "edgefleet/v1/cam-01/status"
    raw = [m.payload for m in sub.messages if m.topic == jpeg_topic]
    decoded = {base64.b64decode(s.jpeg) for s in _snapshots(sub.messages)}
    assert raw and set(raw) <= decoded, "the raw JPEG is the snapshot's image"
    image = cv2.imdecode(np.frombuffer(raw[-1], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (480, 640)


# --- worker, encoder and config on their own --------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _frame() -> np.ndarray[Any, Any]:
    cap = cv2.VideoCapture(str(VIDEO))
    ok, image = cap.read()
    cap.release()
    assert ok
    return image


FACE = [Detection(label="face", score=0.8, box=(0.02, 0.4, 0.2, 0.58))]


def test_a_slow_publish_never_blocks_offer_and_a_pending_frame_is_replaced() -> None:
    release, entered = threading.Event(), threading.Event()
    published: list[tuple[str, bytes]] = []

    def slow_publish(topic: str, payload: bytes) -> None:
        entered.set()
        release.wait(20)
        published.append((topic, payload))

    clock = _Clock()
    worker = SnapshotWorker(
        device_id="cam-01",
        stream="front",
        config=SnapshotsConfig(enabled=True, interval_s=5.0),
        publish_retained=slow_publish,
        monotonic=clock,
    )
    worker.start()
    image = _frame()
    try:
        assert worker.offer(image, 1.0, "m@1", FACE)
        assert not worker.offer(image, 1.1, "m@1", FACE), "within the interval: not taken"
        assert not worker.offer(image, 9.0, "m@1", []), "a frame without detections is not"
        assert entered.wait(20), "the worker took the first frame"
        for ts in (2.0, 3.0):  # the worker is stuck publishing the first one
            clock.now += 5.0
            assert worker.offer(image, ts, "m@1", FACE)
        assert worker.counts()["skipped"] == 1, "the pending frame was replaced by the newer"
        release.set()
        wait_for(lambda: worker.counts()["published"] == 2, timeout=20, what="two published")
    finally:
        release.set()
        worker.stop()
    shots = [decode(p, Snapshot) for t, p in published]
    assert [s.ts for s in shots] == [1.0, 3.0]
    assert {t for t, _ in published} == {"edgefleet/v1/cam-01/snapshot/front"}


def test_detections_beyond_the_bound_are_cut_best_first() -> None:
    published: list[bytes] = []
    worker = SnapshotWorker(
        device_id="cam-01",
        stream="front",
        config=SnapshotsConfig(enabled=True),
        publish_retained=lambda _t, p: published.append(p),
    )
    worker.start()
    many = [
        Detection(label="face", score=1.0 - i / 1000, box=(0.1, 0.1, 0.2, 0.2))
        for i in range(MAX_SNAPSHOT_DETECTIONS + 20)
    ]
    try:
        worker.offer(_frame(), 1.0, None, many)
        wait_for(lambda: bool(published), timeout=20, what="a snapshot")
    finally:
        worker.stop()
    shot = decode(published[0], Snapshot)
    assert shot.detections == many[:MAX_SNAPSHOT_DETECTIONS] and shot.model is None


def test_the_encoder_lowers_quality_then_halves_the_size_then_gives_up() -> None:
    image = _frame()
    assert qualities(80) == [80, 65, 50, 35, 30] and qualities(30) == [30]
    full = encode_jpeg(image, quality=80, max_bytes=180_000)
    assert full is not None and (full.width, full.quality) == (640, 80)
    lower = encode_jpeg(image, quality=80, max_bytes=len(full.jpeg) - 1)
    assert lower is not None and lower.width == 640 and lower.quality < 80
    half = encode_jpeg(image, quality=80, max_bytes=12_000)
    assert half is not None and (half.width, half.height) == (320, 240)
    assert len(half.jpeg) <= 12_000 and half.jpeg.startswith(b"\xff\xd8\xff")
    assert encode_jpeg(image, quality=80, max_bytes=2_000) is None


def test_the_box_colour_is_green() -> None:
    assert BOX_BGR == (0, 255, 0), "the tests and the console look for this colour"


def _config(table: str) -> str:
    return (
        'device_id = "cam-01"\n'
        f"{table}\n"
        '[[streams]]\nname = "front"\nsource = "v.mp4"\nmodel = "builtin:blazeface-short-int8"\n'
    )


def test_snapshot_defaults() -> None:
    cfg = parse_config(_config("")).snapshots
    assert (cfg.enabled, cfg.interval_s, cfg.max_bytes, cfg.quality) == (False, 30.0, 100_000, 80)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("interval_s = 0.5", r"agent.toml:3: snapshots.interval_s must be in 1..86400"),
        ("interval_s = 86401", r"snapshots.interval_s must be in 1..86400"),
        ("max_bytes = 4999", r"agent.toml:3: snapshots.max_bytes must be in 5000-180000"),
        ("max_bytes = 180001", r"snapshots.max_bytes must be in 5000-180000"),
        ("quality = 29", r"snapshots.quality must be in 30-95"),
        ("quality = 96", r"snapshots.quality must be in 30-95"),
        ("enabled = 1", r"snapshots.enabled"),
        ("interval = 5", r"agent.toml:3: unknown key 'interval' in snapshots"),
    ],
)
def test_snapshot_config_is_bounded_and_refuses_unknown_keys(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(f"[snapshots]\n{table}"), source="agent.toml")


# https://www.home-assistant.io/integrations/camera.mqtt/ ("Configuration Variables"), plus the
# `origin` map every discovery payload may carry.
CAMERA_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "icon", "image_encoding", "json_attributes_template",
    "json_attributes_topic", "name", "object_id", "origin", "platform", "topic", "unique_id",
}  # fmt: skip


def test_the_camera_discovery_config_uses_only_documented_keys_and_only_when_asked() -> None:
    without = discovery_messages(device_id="cam-01", streams=["front"], agent_version="1")
    assert not [m for m in without if "/camera/" in m.topic], "[snapshots] off: no camera"
    with_cameras = discovery_messages(
        device_id="cam-01", streams=["front", "back"], agent_version="1", cameras=True
    )
    cameras = {m.topic: json.loads(m.payload) for m in with_cameras if "/camera/" in m.topic}
    assert set(cameras) == {
        "homeassistant/camera/cam-01/front_snapshot/config",
        "homeassistant/camera/cam-01/back_snapshot/config",
    }
    for config in cameras.values():
        assert set(config) <= CAMERA_KEYS and "image_encoding" not in config, "raw bytes"
        assert config["topic"].startswith("edgefleet/v1/cam-01/snapshot/")
        assert config["topic"].endswith("/jpeg")
    removal = removal_messages(device_id="cam-01", streams=["front", "back"], cameras=True)
    assert {m.topic for m in removal} == {m.topic for m in with_cameras}
