"""agent.ota.updater + manager in one process: the bundles and models refused before they go
live (a bad bundle before anything is loaded, a model failing staging, one failing its
shadow run or probation) and which refusals a later rev retries.

The stream side is the rig of tests/ota_rig.py (the ``rig`` fixture of tests/conftest.py):
a simulated 30 fps stream of real frames on a fake clock, so probation sees real detections
in fake time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import ModelRef
from tests.ota_rig import FRAMES, Rig, make_rig
from tests.ota_support import BASELINE_REF, desired

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
