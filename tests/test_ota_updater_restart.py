"""agent.ota.updater + manager in one process: a cut download resumes, and an agent
restarted in each phase of a deployment resumes it or rolls it back.

Crashes are simulated with the fault hook: it blocks the worker for good (like a process
frozen before ``kill -9``) and a fresh manager is built on the same state folder, as a
restarted agent would (tests/ota_rig.py's ``make_rig``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.ota_rig import Rig, make_rig
from tests.ota_support import BASELINE_REF, desired

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
