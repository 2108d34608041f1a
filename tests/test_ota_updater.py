"""agent.ota.updater + manager in one process: real bundles, HTTP, store, detectors, golden.

The stream side is the rig of tests/ota_rig.py: a simulated 30 fps stream of real frames on a
fake clock, so probation sees real detections in fake time and each test takes well under a
second of probation. Crashes are simulated with the fault hook: it blocks the worker for good
(like a process frozen before ``kill -9``) and a fresh manager is built on the same state
folder, as a restarted agent would.
"""

from __future__ import annotations

import threading
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
from protocol import ModelRef, Reported, decode, encode
from tests.bundle_factory import write_public_key
from tests.ota_rig import (
    BASELINE,
    FRAMES,
    Rig,
    SimStream,
    make_rig,
    rig_services,
    stream_io,
)
from tests.ota_support import (
    BASELINE_REF,
    UPDATE_PHASES,
    VIDEO,
    FakeClock,
    desired,
)
from tests.waiting import wait_for


@pytest.fixture
def rig(tmp_path: Path, key: Ed25519PrivateKey) -> Rig:
    """A manager on ``tmp_path`` that trusts ``key``, started on the baseline model."""
    return make_rig(tmp_path, key)


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


# --- rejected before load ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason", "fetched"),
    [
        ("tampered", "file_hash_mismatch", True),
        ("wrong_key", "bad_signature", True),
        ("truncated", "size_mismatch", True),
        ("wrong_sha", "sha256_mismatch", True),
        ("no_keys", "no_trusted_keys", False),
        ("http_404", "http_404", True),
    ],
)
def test_bad_bundles_fail_before_anything_is_loaded(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any, kind: str, reason: str, fetched: bool
) -> None:
    trusted = None
    if kind == "wrong_key":
        trusted = [Ed25519PrivateKey.generate()]
    elif kind == "no_keys":
        trusted = []
    rig = make_rig(tmp_path, key, trusted=trusted)
    bundle, ref, server = served(kind="tampered" if kind == "tampered" else "good")
    if kind == "truncated":
        server.body = server.body[: len(server.body) // 2]
    elif kind == "wrong_sha":
        ref = ModelRef(**{**_fields(ref), "sha256": "0" * 64})
    elif kind == "http_404":
        server.status = 404
    old = rig.sim.detector
    rig.apply(desired(1, {"front": ref}))
    front = rig.last.streams["front"]
    assert (front.phase, front.reason, front.target) == ("failed", reason, bundle.name)
    assert front.active == BASELINE_REF and rig.sim.detector is old and rig.sim.swaps == []
    assert (server.requests > 0) == fetched
    failed = rig.events[-1]
    assert (failed.code, failed.level, failed.details["reason"]) == ("ota.failed", "error", reason)
    assert "ota.staging" not in rig.codes()
    if kind == "no_keys":
        assert "trusted_keys" in failed.message
    assert rig.store.slots("front") == (None, None)
    assert list((tmp_path / "state" / "models" / "front").glob("staging-*")) == []


def _fields(ref: ModelRef) -> dict[str, Any]:
    return {f: getattr(ref, f) for f in ref.__struct_fields__}


# --- rejected in staging -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "load_failed"),
        ("nan", "nan_output"),
        ("slow", "over_latency_budget"),
        ("blind", "golden_mismatch"),
    ],
)
def test_models_that_fail_staging_never_go_live(
    rig: Rig, served: Any, kind: str, reason: str
) -> None:
    _, ref, _ = served(kind=kind)
    rig.apply(desired(1, {"front": ref}))
    front = rig.last.streams["front"]
    assert (front.phase, front.reason, front.active) == ("failed", reason, BASELINE_REF)
    assert rig.codes()[-2:] == ["ota.staging", "ota.failed"]
    assert rig.sim.swaps == []
    assert rig.store.slots("front") == (None, None)
    assert not list((rig.state_dir / "models" / "front").glob("staging-*"))
    assert not list((rig.state_dir / "ota" / "work").iterdir())


def test_a_failed_bundle_is_not_retried_by_a_later_rev_but_a_download_failure_is(
    rig: Rig, served: Any
) -> None:
    _, blind, blind_server = served(kind="blind")
    rig.apply(desired(1, {"front": blind}))
    rig.apply(desired(2, {"front": blind}))
    assert blind_server.requests == 1 and rig.last.streams["front"].reason == "golden_mismatch"
    _, good, server = served(version="3.0.0")
    server.status = 503
    rig.apply(desired(3, {"front": good}))
    assert rig.last.streams["front"].reason == "download_failed"
    server.status = None
    rig.apply(desired(4, {"front": good}))
    front = rig.last.streams["front"]
    assert (front.phase, front.active) == ("committed", "blazeface-short-int8@3.0.0")


def test_a_retried_bundle_is_reported_as_taken_up_not_with_its_old_failure(
    rig: Rig, served: Any
) -> None:
    _, good, server = served(version="3.0.0")
    server.status = 503
    rig.apply(desired(1, {"front": good}))
    assert rig.last.streams["front"].reason == "download_failed"
    server.status = None
    seen = len(rig.reports)
    rig.apply(desired(2, {"front": good}))
    at_rev_2 = [r.streams["front"] for r in rig.reports[seen:] if r.desired_rev == 2]
    # The controller reads the first report of rev 2 as this rev's progress, not as a failure.
    assert (at_rev_2[0].phase, at_rev_2[0].reason) == ("idle", None)
    assert at_rev_2[0].target == "blazeface-short-int8@3.0.0"
    assert all(r.phase != "failed" for r in at_rev_2)
    assert (at_rev_2[-1].phase, at_rev_2[-1].active) == ("committed", "blazeface-short-int8@3.0.0")


def test_a_job_the_worker_has_taken_is_reported_idle_until_its_first_phase(
    rig: Rig, served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report right after a desired state must not show the previous outcome, even
    when the worker thread takes the job before the report is built (a race seen in CI)."""
    _, good, server = served(version="3.0.0")
    server.status = 503
    rig.apply(desired(1, {"front": good}))
    assert rig.last.streams["front"].reason == "download_failed"
    server.status = None
    updater = rig.manager.updaters["front"]
    deployment = updater._deployment
    taken, release = threading.Event(), threading.Event()
    real_run = deployment.run

    def held_run(job: Any) -> None:
        taken.set()
        assert release.wait(30), "the test never released the worker"
        real_run(job)

    monkeypatch.setattr(deployment, "run", held_run)
    seen = len(rig.reports)
    rig.send(desired(2, {"front": good}))
    assert taken.wait(10), "the worker did not take the job"
    assert updater.queued is not None and updater.queued.rev == 2  # running, no phase yet
    now = rig.manager.report().streams["front"]
    assert (now.phase, now.reason, now.target) == ("idle", None, "blazeface-short-int8@3.0.0")
    release.set()
    rig.settle()
    at_rev_2 = [r.streams["front"] for r in rig.reports[seen:] if r.desired_rev == 2]
    assert all(r.phase != "failed" for r in at_rev_2)
    assert at_rev_2[-1].phase == "committed"


# --- probation -----------------------------------------------------------------------------


def test_model_blind_on_live_video_is_refused_in_the_shadow_before_it_goes_live(
    rig: Rig, served: Any
) -> None:
    bundle, ref, _ = served(kind="live_blind")
    old = rig.sim.detector
    start = rig.sim.clock.t
    rig.apply(desired(1, {"front": ref}))
    front = rig.last.streams["front"]
    assert (front.phase, front.reason, front.target) == ("failed", "shadow_agreement", bundle.name)
    assert front.active == BASELINE_REF and rig.sim.detector is old
    assert rig.sim.swaps == []  # never published a single detection
    assert rig.sim.clock.t - start < 30.0  # decided within 30 s of (simulated) video
    gate = front.gate
    assert gate is not None and (gate.verdict, gate.reason) == ("fail", "shadow_agreement")
    assert gate.agreement == 0.0 and gate.agreement_high is not None and gate.agreement_high < 0.8
    event = rig.events[-1]
    assert (event.code, event.level) == ("ota.failed", "error")
    assert event.details["gate_agreement"] == 0.0
    assert "refused by the health gate" in event.message and "0.0% of boxes" in event.message
    assert rig.store.slots("front")[0] is None  # nothing was activated
    assert old is not None and old.detect(FRAMES[0]).detections  # the old one still works


def test_inference_errors_roll_back_at_once(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    rig = make_rig(tmp_path, key, probation_s=30.0)
    bundle, ref, _ = served()
    rig.sim.failing.add(bundle.name)
    start = rig.sim.clock.t
    rig.apply(desired(1, {"front": ref}))
    assert rig.last.streams["front"].reason == "probation_errors"
    probation = next(e for e in rig.events if e.code == "ota.probation")
    assert rig.sim.clock.t - start < 45.0  # shadow, then far less than the 30 s of probation
    assert probation.ts > 0 and rig.sim.active() == BASELINE_REF


def test_new_desired_during_probation_supersedes_the_candidate(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def fault(point: str) -> None:
        if point == "probation" and not release.is_set():
            entered.set()
            release.wait(10)

    rig = make_rig(tmp_path, key, fault=fault)
    first, ref1, _ = served()
    second, ref2, _ = served(version="3.0.0")
    rig.send(desired(1, {"front": ref1}))
    assert entered.wait(10)
    rig.send(desired(2, {"front": ref2}))
    release.set()
    rig.settle()
    outcomes = [(e.code, e.details["target"], e.details["reason"]) for e in rig.events]
    assert ("ota.rolled_back", first.name, "superseded") in outcomes
    assert outcomes[-1] == ("ota.committed", second.name, None)
    assert rig.sim.swaps == [first.name, BASELINE_REF, second.name]
    front = rig.last.streams["front"]
    assert front.active == second.name and front.previous == BASELINE_REF


# --- download resume and restarts ------------------------------------------------------------


def test_cut_download_resumes_from_the_byte_it_reached(rig: Rig, served: Any) -> None:
    _, ref, server = served()
    cut = len(server.body) // 3
    server.cut_after = [cut]
    rig.apply(desired(1, {"front": ref}))
    assert rig.last.streams["front"].phase == "committed"
    assert server.ranges[0] is None and len(server.ranges) == 2
    resumed_at = int(str(server.ranges[1]).removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut
    # Only the missing tail was sent again, not the whole file.
    assert server.bytes_served == cut + len(server.body) - resumed_at


class Frozen:
    """A fault hook that freezes the worker at ``point`` for good (a process about to die)."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.reached = threading.Event()
        self._never = threading.Event()

    def __call__(self, point: str) -> None:
        if point == self.point:
            self.reached.set()
            self._never.wait()


@pytest.mark.parametrize(
    ("point", "outcome", "reason"),
    [
        ("downloading", "committed", None),
        ("verifying", "committed", None),
        ("staging", "committed", None),
        ("switching", "rolled_back", "crashed_in_probation"),
        ("activated", "rolled_back", "crashed_in_probation"),
        ("probation", "rolled_back", "crashed_in_probation"),
    ],
)
def test_restart_in_each_phase_resumes_or_rolls_back(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any, point: str, outcome: str, reason: str
) -> None:
    # First a committed 2.0.0, so "previous" is a real installed model, not the baseline.
    rig = make_rig(tmp_path, key)
    v2, ref2, _ = served()
    rig.apply(desired(1, {"front": ref2}))
    frozen = Frozen(point)
    crashed = make_rig(tmp_path, key, fault=frozen)
    v3, ref3, _ = served(version="3.0.0")
    crashed.send(desired(2, {"front": ref3}))
    assert frozen.reached.wait(30)
    expected_phase = "switching" if point == "activated" else point
    assert crashed.phase() == expected_phase
    # "kill -9": the frozen process is abandoned; a new one starts on the same state folder.
    restarted = make_rig(tmp_path, key)
    restarted.settle()
    front = restarted.last.streams["front"]
    assert (front.phase, front.reason, front.target) == (outcome, reason, v3.name)
    if outcome == "committed":
        assert front.active == v3.name
        assert front.previous == v2.name
    else:
        # Starts on the previous, verified model; the candidate is only "previous" now.
        assert restarted.sim.active() == v2.name
        assert front.active == v2.name
        assert restarted.codes()[0] == "ota.rolled_back"
        current = restarted.store.current("front")
        assert current is not None and '"version": "2.0.0"' in current.read_text()
    assert restarted.last.desired_rev == 2


def test_restart_rolls_back_to_the_baseline_when_the_first_candidate_was_in_probation(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    frozen = Frozen("probation")
    rig = make_rig(tmp_path, key, fault=frozen)
    _, ref, _ = served()
    rig.send(desired(1, {"front": ref}))
    assert frozen.reached.wait(30)
    assert rig.store.slots("front")[0] is not None  # the candidate was current in the store
    restarted = make_rig(tmp_path, key)
    front = restarted.last.streams["front"]
    assert (front.phase, front.reason, front.active) == (
        "rolled_back",
        "crashed_in_probation",
        BASELINE_REF,
    )
    assert restarted.store.slots("front")[0] is None


def test_restart_refuses_an_installed_model_whose_files_changed(rig: Rig, served: Any) -> None:
    bundle, ref, _ = served()
    rig.apply(desired(1, {"front": ref}))
    current = rig.store.current("front")
    assert current is not None
    model = current.parent / "blazeface-short-int8.tflite"
    model.write_bytes(model.read_bytes()[:-10])
    restarted = rig.restart()
    front = restarted.last.streams["front"]
    assert restarted.sim.active() == BASELINE_REF
    assert (front.phase, front.reason, front.target) == ("failed", "install_invalid", bundle.name)


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
