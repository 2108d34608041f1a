"""agent.ota.updater + manager in one process: real bundles, HTTP, store, detectors, golden.
A deployment that succeeds, from the signed bundle to the committed model, also in a real
pipeline; the baseline; OTA disabled.

The stream side is the rig of tests/ota_rig.py (the ``rig`` fixture of tests/conftest.py):
a simulated 30 fps stream of real frames on a fake clock, so probation sees real detections
in fake time and each test takes well under a second of probation. Refusals are
tests/test_ota_updater_refused.py, crashes and restarts tests/test_ota_updater_restart.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import OtaConfig
from agent.ota.health import HealthRecorder
from agent.ota.manager import OtaManager
from agent.ota.model_store import ModelStore
from agent.ota.services import StreamIO
from agent.ota.wiring import build_services
from inference.detector import load_detector
from protocol import Reported, decode, encode
from tests.bundle_factory import write_public_key
from tests.ota_rig import BASELINE, Rig, SimStream, rig_services, stream_io
from tests.ota_support import BASELINE_REF, UPDATE_PHASES, VIDEO, FakeClock, desired
from tests.waiting import wait_for


def _fronts(rig: Rig) -> list[tuple[str, str | None, str | None]]:
    return [
        (r.streams["front"].phase, r.streams["front"].active, r.streams["front"].reason)
        for r in rig.reports
    ]


# --- happy path and the baseline ------------------------------------------------------------


def test_signed_bundle_goes_through_every_phase_and_is_committed(rig: Rig, served: Any) -> None:
    bundle, ref, _ = served()
    assert rig.last.streams["front"].active == BASELINE_REF and rig.last.desired_rev is None
    old = rig.sim.detector
    rig.apply(desired(1, {"front": ref}))
    assert rig.codes() == [f"ota.{phase}" for phase in UPDATE_PHASES]
    phases = [p for p, _, _ in _fronts(rig)]
    changes = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert tuple(changes[-7:]) == UPDATE_PHASES
    report = rig.last
    front = report.streams["front"]
    assert report.desired_rev == 1
    assert (front.active, front.target, front.phase, front.reason) == (
        bundle.name,
        bundle.name,
        "committed",
        None,
    )
    assert front.previous == BASELINE_REF
    assert set(front.installed) == {BASELINE_REF, bundle.name}
    # The candidate went live only at the switch, and the old detector was closed at commit.
    assert rig.sim.swaps == [bundle.name]
    assert rig.sim.detector is not old and old is not None
    committed = rig.events[-1]
    assert committed.level == "info" and committed.details["rev"] == 1
    assert committed.details["rollout_id"] == "r1"
    live_frames = committed.details["live_frames"]
    assert isinstance(live_frames, int) and live_frames >= 55  # ~2 s at 30 fps
    # The gate's evidence: the same weights agree on every box, paired on the same frames.
    gate = front.gate
    assert gate is not None and (gate.stage, gate.verdict) == ("probation", "pass")
    assert gate.agreement == 1.0 and gate.agreement_low is not None and gate.agreement_low >= 0.8
    assert gate.latency_ratio is not None and gate.errors == 0
    assert gate.informative_pairs >= 20 and gate.pairs > gate.informative_pairs
    assert "agrees with the current model on 100.0% of boxes" in gate.summary
    assert committed.details["gate_verdict"] == "pass"
    assert committed.details["gate_summary"] == gate.summary
    # Store: the new model is current, the baseline previous; the download is gone.
    current = rig.store.current("front")
    assert current is not None and '"version": "2.0.0"' in current.read_text()
    assert rig.store.slots("front")[1] is None
    assert list((rig.state_dir / "ota" / "downloads").iterdir()) == []


def test_same_or_lower_rev_is_ignored_and_the_rev_survives_a_restart(rig: Rig, served: Any) -> None:
    _, ref, server = served()
    rig.apply(desired(5, {"front": ref}))
    requests = server.requests
    n_events = len(rig.events)
    _, other, _ = served(version="3.0.0")
    rig.send(desired(5, {"front": other}))  # same rev, other model: ignored
    rig.send(desired(4, {}))  # lower rev: ignored
    rig.settle()
    assert len(rig.events) == n_events and server.requests == requests
    assert rig.last.desired_rev == 5
    again = rig.restart()  # a restart: rev 5 is remembered
    assert again.last.desired_rev == 5
    assert again.last.streams["front"].active == "blazeface-short-int8@2.0.0"
    again.apply(desired(5, {"front": other}))
    assert again.events == []


def test_stream_absent_from_desired_goes_back_to_the_baseline(rig: Rig, served: Any) -> None:
    bundle, ref, _ = served()
    rig.apply(desired(1, {"front": ref}))
    assert rig.sim.active() == bundle.name
    rig.apply(desired(2, {}, rollout_id=None))
    front = rig.last.streams["front"]
    assert (front.active, front.target, front.phase) == (BASELINE_REF, BASELINE_REF, "committed")
    assert front.previous == bundle.name
    assert rig.store.slots("front")[0] is None
    assert rig.codes()[-2:] == ["ota.switching", "ota.committed"]
    # And a restart stays on the baseline.
    assert rig.restart().sim.active() == BASELINE_REF


def test_desired_naming_the_active_model_is_committed_without_work(rig: Rig, served: Any) -> None:
    _, ref, server = served(version="1.0.0")  # the baseline's own name@version
    rig.apply(desired(1, {"front": ref}))
    assert server.requests == 0
    assert rig.last.streams["front"].phase == "committed"
    assert rig.codes() == ["ota.committed"]


def test_unknown_stream_and_garbage_desired_are_reported_not_fatal(rig: Rig, served: Any) -> None:
    _, ref, _ = served()
    rig.manager.handle_desired(b'{"schema": 1, "rev": "x"}')
    rig.apply(desired(1, {"back": ref}))
    assert rig.codes() == ["ota.bad_desired", "ota.unknown_stream"]
    assert rig.last.desired_rev == 1 and rig.last.streams["front"].phase == "idle"


# --- the real pipeline ------------------------------------------------------------------------


def test_hot_swap_in_a_real_pipeline_loses_no_frame(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    """A real FrameSource + StreamPipeline, real clock: the swap happens between two frames."""
    from agent.config import StreamConfig
    from agent.pipeline import StreamPipeline
    from agent.sources import FrameSource
    from protocol import Detections

    bundle, ref, _ = served()
    health = HealthRecorder()
    payloads: list[bytes] = []
    counter = iter(range(1 << 30))
    source = FrameSource(name="front", uri=str(VIDEO), loop=True, realtime=False)
    pipeline = StreamPipeline(
        device_id="cam-01",
        config=StreamConfig(name="front", source=str(VIDEO), model=str(BASELINE)),
        source=source,
        detector=load_detector(BASELINE),
        publish=lambda _topic, payload: payloads.append(payload),
        next_seq=lambda: next(counter),
        observer=health,
    )
    # The daemon's own assembly of download, bundle check and golden check.
    services = build_services(
        OtaConfig(probation_s=1.0, golden_latency_runs=3),
        ota_dir=tmp_path / "ota",
        store=ModelStore(tmp_path / "models"),
        key_paths=[write_public_key(key, tmp_path / "signing.pub")],
        runtimes={"litert"},
        fault=lambda point: None,
    )
    reports: list[Reported] = []
    manager = OtaManager(
        device_id="cam-01",
        services=services,
        streams=[
            StreamIO(
                name="front",
                baseline_manifest=BASELINE,
                baseline_ref=BASELINE_REF,
                load=load_detector,
                swap=pipeline.swap_detector,
                active=lambda: pipeline.detector.ref,
                health=health,
                shadow=pipeline.set_shadow,
            )
        ],
        publish_reported=lambda payload: reports.append(decode(payload, Reported)),
        publish_event=lambda payload: None,
    )
    manager.recover()
    pipeline.start()
    source.start()
    try:
        wait_for(
            lambda: pipeline.stats.frames_processed >= 200,
            timeout=60,
            interval=0.01,
            what="200 frames on the baseline model",
        )
        manager.start()
        manager.handle_desired(encode(desired(1, {"front": ref})))
        time.sleep(0.05)
        assert manager.wait_idle(90)
        done = pipeline.stats.frames_processed
        wait_for(
            lambda: pipeline.stats.frames_processed >= done + 100,
            timeout=60,
            interval=0.01,
            what="100 frames after the swap",
        )
    finally:
        manager.stop()
        source.stop()
        pipeline.stop()
    assert reports[-1].streams["front"].phase == "committed", reports[-1]
    frames = [decode(p, Detections) for p in payloads]
    indices = [f.frame_index for f in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "a frame was lost"
    models = [f.model for f in frames]
    switch = models.index(bundle.name)
    assert set(models[:switch]) == {BASELINE_REF} and set(models[switch:]) == {bundle.name}
    assert source.stats().frames_dropped == 0
    # Faces are still found after the swap (the same weights under a new version).
    assert any(f.detections for f in frames[switch:])


def test_disabled_ota_ignores_desired_and_the_store(rig: Rig, served: Any) -> None:
    _, ref, _ = served()
    rig.apply(desired(1, {"front": ref}))
    assert rig.store.current("front") is not None
    sim = SimStream(FakeClock())
    sim.detector = load_detector(BASELINE)
    reports: list[Reported] = []
    manager = OtaManager(
        device_id="cam-01",
        services=rig_services(
            rig.root, rig.key, sim, trusted=None, fault=lambda p: None, probation_s=1
        ),
        streams=[stream_io(sim)],
        publish_reported=lambda payload: reports.append(decode(payload, Reported)),
        publish_event=lambda payload: pytest.fail("no events when disabled"),
        enabled=False,
    )
    assert manager.recover() == {"front": None}  # runs the config's model
    manager.start()
    _, other, server = served(version="3.0.0")
    manager.handle_desired(encode(desired(2, {"front": other})))
    assert manager.wait_idle(5) and server.requests == 0
    front = reports[-1].streams["front"]
    assert (front.active, front.phase, reports[-1].desired_rev) == (BASELINE_REF, "idle", None)


def test_fault_hook_env_is_strict() -> None:
    from agent.errors import ConfigError
    from agent.ota.wiring import fault_hook_from_env

    fault_hook_from_env(None)("staging")  # unset: a no-op
    fault_hook_from_env("pause:probation")("staging")  # another point: no-op
    with pytest.raises(ConfigError, match="use pause:POINT with POINT one of"):
        fault_hook_from_env("pause:nowhere")
    with pytest.raises(ConfigError, match="use pause:POINT"):
        fault_hook_from_env("sleep:staging")
