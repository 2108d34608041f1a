"""The OTA updater's test rig: a real OtaManager on a simulated stream in fake time.

:class:`SimStream` keeps the live detector and, on a fake clock, runs it on real frames of
the shipped video at 30 fps whenever the updater waits, feeding a real HealthRecorder: so
probation sees real detections in fake time. :func:`make_rig` builds (or, after a simulated
crash, rebuilds) the manager on a state folder, as the agent does.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.ota.bundle import VerifiedBundle, open_bundle
from agent.ota.download import download
from agent.ota.health import HealthRecorder
from agent.ota.manager import OtaManager
from agent.ota.model_store import ModelStore
from agent.ota.services import Services, StreamIO
from agent.ota.shadow import ShadowRunner
from agent.ota.state import load_stream_state
from agent.ota.wiring import NO_KEYS
from common.backoff import Backoff
from inference.detector import Detector, load_detector
from inference.golden import check_golden
from protocol import Desired, Event, ModelRef, Reported, decode, encode
from tests.bundle_factory import ASSETS
from tests.ota_support import BASELINE_REF, FakeClock
from tests.video_files import shipped_frames

BASELINE = ASSETS / "blazeface-short-int8.json"
FPS = 30.0


FRAMES = shipped_frames()[::5]  # 30 frames, 18 with a face


class SimStream:
    """The live side of one stream: current detector, frames at 30 fps on a fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.health = HealthRecorder(clock=clock)
        self.detector: Detector | None = None
        self.failing: set[str] = set()
        """Models whose every inference raises (an injected fault)."""
        self.swaps: list[str] = []
        self.shadow: ShadowRunner | None = None
        self.scene: Callable[[int], npt.NDArray[Any]] = lambda n: FRAMES[n % len(FRAMES)]
        """Frame ``n`` of the live scene (tests change it)."""
        self.faults: dict[str, Callable[[Detector], None]] = {}
        """``name@version`` to a fault applied to that model when it is loaded."""
        self.shadow_from: int | None = None
        """Frame number at which a shadow model was first attached."""
        self._n = 0

    def load(self, manifest: Path) -> Detector:
        detector = load_detector(manifest)
        fault = self.faults.get(detector.ref)
        if fault is not None:
            fault(detector)
        return detector

    def set_shadow(self, runner: ShadowRunner | None) -> None:
        if runner is not None and self.shadow_from is None:
            self.shadow_from = self._n
        self.shadow = runner

    @property
    def frames(self) -> int:
        return self._n

    def swap(self, new: Detector) -> Detector:
        assert self.detector is not None
        old, self.detector = self.detector, new
        self.swaps.append(new.ref)
        return old

    def active(self) -> str | None:
        return self.detector.ref if self.detector else None

    def run(self, seconds: float) -> None:
        for _ in range(max(1, round(seconds * FPS))):
            self.clock.advance(1 / FPS)
            detector = self.detector
            assert detector is not None
            if detector.ref in self.failing:
                self.health.error(detector.ref)
                continue
            image = self.scene(self._n)
            prepared = detector.preprocess(image)
            result = detector.infer(prepared)
            self._n += 1
            self.health.frame(detector.ref, result.infer_ms, [d.score for d in result.detections])
            if self.shadow is not None and self.shadow.due():
                self.shadow.pair(image, detector, prepared, result)

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        if not stop.is_set():
            self.run(seconds)
        return stop.is_set()


@dataclass
class Rig:
    """A manager on ``root`` with one stream ``front`` and what it published."""

    root: Path
    key: Ed25519PrivateKey
    sim: SimStream
    manager: OtaManager
    store: ModelStore
    reports: list[Reported] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def send(self, message: Desired) -> None:
        self.manager.handle_desired(encode(message))

    def apply(self, message: Desired, timeout: float = 30.0) -> None:
        """Send ``message`` and wait until the updater has done what it asks."""
        self.send(message)
        self.settle(timeout)

    def settle(self, timeout: float = 30.0) -> None:
        time.sleep(0.05)
        assert self.manager.wait_idle(timeout), "the updater did not finish"

    def restart(self) -> Rig:
        """A new manager on the same state folder, as after a crash (this one is abandoned)."""
        return make_rig(self.root, self.key)

    @property
    def last(self) -> Reported:
        return self.reports[-1]

    def codes(self) -> list[str]:
        return [e.code for e in self.events]

    def phase(self) -> str:
        return load_stream_state(self.state_dir / "ota", "front").phase


def rig_services(
    root: Path,
    key: Ed25519PrivateKey,
    sim: SimStream,
    *,
    trusted: list[Ed25519PrivateKey] | None,
    fault: Callable[[str], None],
    probation_s: float,
) -> Services:
    keys = [k.public_key() for k in (trusted if trusted is not None else [key])]

    def fetch(ref: ModelRef, dest: Path, stop: threading.Event) -> Path:
        return download(
            ref.url,
            dest,
            sha256=ref.sha256,
            size=ref.size,
            retries=3,
            backoff=Backoff(0.01, 0.02, jitter=0),
            stop=stop,
        )

    def verify(path: Path) -> VerifiedBundle:
        return open_bundle(
            path,
            trusted_keys=keys,
            agent_version=__version__,
            runtimes={"litert"},
            arch=platform.machine(),
        )

    return Services(
        ota_dir=root / "state" / "ota",
        store=ModelStore(root / "state" / "models"),
        download=fetch,
        verify=verify,
        golden=lambda det, folder, manifest: check_golden(det, folder, manifest, latency_runs=3),
        probation_s=probation_s,
        keys_problem=NO_KEYS if not keys else None,
        monotonic=sim.clock,
        wait=sim.wait,
        fault=fault,
    )


def stream_io(sim: SimStream) -> StreamIO:
    """The stream "front" of the simulated pipeline, on the baseline model."""
    return StreamIO(
        name="front",
        baseline_manifest=BASELINE,
        baseline_ref=BASELINE_REF,
        load=sim.load,
        swap=sim.swap,
        active=sim.active,
        health=sim.health,
        shadow=sim.set_shadow,
    )


def make_rig(
    root: Path,
    key: Ed25519PrivateKey,
    *,
    trusted: list[Ed25519PrivateKey] | None = None,
    fault: Callable[[str], None] = lambda point: None,
    probation_s: float = 2.0,
    warm_s: float = 3.0,
) -> Rig:
    """Build (or rebuild after a 'crash') the manager on ``root`` and start it like the app."""
    clock = FakeClock()
    sim = SimStream(clock)
    services = rig_services(root, key, sim, trusted=trusted, fault=fault, probation_s=probation_s)
    reports: list[Reported] = []
    events: list[Event] = []
    manager = OtaManager(
        device_id="cam-01",
        services=services,
        streams=[stream_io(sim)],
        publish_reported=lambda payload: reports.append(decode(payload, Reported)),
        publish_event=lambda payload: events.append(decode(payload, Event)),
    )
    installed = manager.recover()["front"]
    sim.detector = load_detector(installed or BASELINE)
    sim.run(warm_s)  # the old model's baseline; from here on only the worker runs models
    manager.start()
    return Rig(root, key, sim, manager, services.store, reports, events)
