"""Shared pieces of the OTA updater tests: signed bundle variants, desired messages, a clock.

Bundles are built with tests/bundle_factory.py from the shipped models; golden images are
real pictures (scikit-image's astronaut has one face, its coffee cup none).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from protocol import SCHEMA_VERSION, Desired, Manifest, ModelRef, desired_topic, encode
from tests import images
from tests.bundle_factory import (
    ASSETS,
    blazeface_files,
    blazeface_manifest,
    build_bundle,
    sign,
    with_files,
)

FACE = ("face", 0.905, (0.348, 0.159, 0.536, 0.346))
"""What the shipped INT8 BlazeFace finds on the astronaut."""
VIDEO = ASSETS / "face-walk-640x480.mp4"
BASELINE_REF = "blazeface-short-int8@1.0.0"
UPDATE_PHASES = (
    "downloading", "verifying", "staging", "shadow", "switching", "probation", "committed",
)  # fmt: skip
"""The phases of an update that is committed, in order; each one's event is ``ota.<phase>``."""


def _png(image: npt.NDArray[Any]) -> bytes:
    rgb = np.ascontiguousarray(image[..., :3])
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return png.tobytes()


@functools.cache
def astronaut_png() -> bytes:
    return _png(images.astronaut())


@functools.cache
def coffee_png() -> bytes:
    return _png(images.coffee())


def face_golden() -> list[dict[str, object]]:
    return [{"image": "golden/astronaut.png", "expected": [FACE]}]


@dataclass(frozen=True)
class Bundle:
    path: Path
    ref: ModelRef
    manifest: Manifest

    @property
    def body(self) -> bytes:
        return self.path.read_bytes()

    @property
    def name(self) -> str:
        return f"{self.ref.name}@{self.ref.version}"

    def at(self, url: str, **changes: Any) -> ModelRef:
        return msgspec.structs.replace(self.ref, url=url, **changes)


def make_bundle(
    out: Path,
    key: Ed25519PrivateKey,
    *,
    version: str = "2.0.0",
    kind: str = "good",
    **changes: object,
) -> Bundle:
    """A signed bundle of the shipped INT8 BlazeFace (or a broken variant, ``kind``).

    good: golden astronaut with its face, latency budget 10 s.
    garbage: a .tflite that is not a model.  nan: the fp16 model with an input std that
    overflows float32 (NaN/inf outputs).  slow: latency budget a tenth of the measured invoke.
    blind: min_score 0.99 (the golden face is not found).  live_blind: min_score 0.99 with a
    golden sample that has no face, so it passes staging and detects nothing on the video.
    tampered: the model's bytes changed after signing.
    """
    files: dict[str, bytes] = {**blazeface_files(), "golden/astronaut.png": astronaut_png()}
    fields: dict[str, object] = {
        "version": version,
        "golden": face_golden(),
        "latency_budget_ms": 10_000.0,
    }
    replace: dict[str, bytes] | None = None
    if kind == "garbage":
        files["blazeface-short-int8.tflite"] = b"this is not a flatbuffer" * 1000
    elif kind == "nan":
        raw = json.loads((ASSETS / "blazeface-short-fp16.json").read_text())
        raw["input"]["std"] = 1e-45
        files = {
            "blazeface-short-fp16.tflite": (ASSETS / "blazeface-short-fp16.tflite").read_bytes(),
            "golden/astronaut.png": astronaut_png(),
        }
        manifest = msgspec.convert({**raw, **fields, **changes}, type=Manifest)
        return _finish(out, manifest, files, key, None)
    elif kind == "slow":
        fields["latency_budget_ms"] = measured_invoke_ms() / 10
    elif kind == "blind":
        fields["min_score"] = 0.99
    elif kind == "live_blind":
        fields["min_score"] = 0.99
        fields["golden"] = [{"image": "golden/coffee.png", "expected": []}]
        files = {**blazeface_files(), "golden/coffee.png": coffee_png()}
    elif kind == "tampered":
        original = files["blazeface-short-int8.tflite"]
        replace = {"blazeface-short-int8.tflite": original[:-1] + bytes([original[-1] ^ 1])}
    elif kind != "good":
        raise ValueError(kind)
    manifest = blazeface_manifest(**{**fields, **changes})
    return _finish(out, manifest, files, key, replace)


def _finish(
    out: Path,
    manifest: Manifest,
    files: dict[str, bytes],
    key: Ed25519PrivateKey,
    replace: dict[str, bytes] | None,
) -> Bundle:
    path = build_bundle(out, manifest, files, key=key, replace_content=replace)
    listed = with_files(manifest, files)
    data = path.read_bytes()
    ref = ModelRef(
        name=manifest.name,
        version=manifest.version,
        url="http://127.0.0.1:1/unset",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signature=sign(listed, key),
    )
    return Bundle(path=path, ref=ref, manifest=listed)


@functools.cache
def measured_invoke_ms() -> float:
    from inference.detector import load_detector

    with load_detector(ASSETS / "blazeface-short-int8.json") as detector:
        frame = cv2.imdecode(np.frombuffer(astronaut_png(), np.uint8), cv2.IMREAD_COLOR)
        assert frame is not None
        prepared = detector.preprocess(frame)
        times = sorted(detector.infer(prepared).infer_ms for _ in range(20))
    return times[len(times) // 2]


def desired(rev: int, models: dict[str, ModelRef], rollout_id: str | None = "r1") -> Desired:
    return Desired(schema=SCHEMA_VERSION, rev=rev, models=models, rollout_id=rollout_id)


def publish_desired(port: int, device_id: str, message: Desired) -> None:
    """Publish ``message`` retained (QoS 1) as the controller does, and wait for the ack."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(desired_topic(device_id), encode(message), qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
