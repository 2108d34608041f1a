"""One stream of the agent's real pieces with its OTA manager, for the OTA benchmarks.

A FrameSource on the shipped video, the stream pipeline, and an OtaManager built with the
daemon's own ``build_services`` (download, bundle check, golden check, the health gate),
wired like ``agent.app`` wires a stream. Used by bench/swap.py and bench/gate.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import OtaConfig, StreamConfig
from agent.ota.health import HealthRecorder
from agent.ota.manager import OtaManager
from agent.ota.model_store import ModelStore
from agent.ota.services import StreamIO
from agent.ota.wiring import build_services
from agent.pipeline import PublishFn, StreamPipeline
from agent.sources import FrameSource
from inference import ASSETS_DIR
from inference.detector import Detector, load_detector
from tests.bundle_factory import write_public_key

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"


@contextmanager
def ota_stream(
    tmp: Path,
    key: Ed25519PrivateKey,
    *,
    name: str,
    baseline: Path,
    realtime: bool,
    config: OtaConfig,
    publish: PublishFn,
    publish_event: Callable[[bytes], None] = lambda payload: None,
    load: Callable[[Path], Detector] = load_detector,
) -> Iterator[tuple[StreamPipeline, FrameSource, OtaManager]]:
    """Build the stream and its manager under ``tmp``, start them, stop them on exit."""
    health = HealthRecorder()
    counter = iter(range(1 << 62))
    source = FrameSource(name=name, uri=str(VIDEO), loop=True, realtime=realtime)
    pipeline = StreamPipeline(
        device_id="bench",
        config=StreamConfig(name=name, source=str(VIDEO), model=str(baseline)),
        source=source,
        detector=load_detector(baseline),
        publish=publish,
        next_seq=lambda: next(counter),
        observer=health,
    )
    services = build_services(
        config,
        ota_dir=tmp / "ota",
        store=ModelStore(tmp / "models"),
        key_paths=[write_public_key(key, tmp / "signing.pub")],
        runtimes={"litert"},
        fault=lambda point: None,
    )
    manager = OtaManager(
        device_id="bench",
        services=services,
        streams=[
            StreamIO(
                name=name,
                baseline_manifest=baseline,
                baseline_ref=pipeline.detector.ref,
                load=load,
                swap=pipeline.swap_detector,
                active=lambda: pipeline.detector.ref,
                health=health,
                shadow=pipeline.set_shadow,
            )
        ],
        publish_reported=lambda payload: None,
        publish_event=publish_event,
    )
    manager.recover()
    pipeline.start()
    source.start()
    manager.start()
    try:
        yield pipeline, source, manager
    finally:
        manager.stop()
        source.stop()
        pipeline.stop()
