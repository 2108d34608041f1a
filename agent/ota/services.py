"""The I/O an OTA updater is given (all injected, so the state machine is tested in-process).

:class:`Services` is shared by every stream (state folder, model store, download, bundle
check, golden check, probation policy, clocks, fault hook); :class:`StreamIO` is one stream's
side (load a model, swap it in, what is active, its health samples); :class:`Journal` is what
a deployment records its transitions through (the stream's updater).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from agent.ota.bundle import VerifiedBundle
from agent.ota.gate import GateRules
from agent.ota.health import HealthRecorder
from agent.ota.model_store import ModelStore
from agent.ota.probation import Thresholds
from agent.ota.shadow import ShadowRunner
from agent.ota.state import StreamState
from inference.detector import Detector
from inference.golden import GoldenReport
from protocol import EventLevel, GateEvidence, Manifest, ModelRef
from protocol.messages import DeploymentPhase

__all__ = [
    "Cancelled",
    "Details",
    "DownloadFn",
    "FaultHook",
    "GoldenFn",
    "Job",
    "Journal",
    "OtaEvent",
    "Outcome",
    "Services",
    "StreamIO",
    "VerifyFn",
    "WaitFn",
]

Details = dict[str, str | int | float | bool | None]


DownloadFn = Callable[[ModelRef, Path, threading.Event], Path]
"""(model, destination file, stop event) → the verified file (``agent.ota.download``)."""
VerifyFn = Callable[[Path], VerifiedBundle]
"""Bundle file → verified bundle (signature, hashes, compatibility) or BundleError."""
GoldenFn = Callable[[Detector, Path, Manifest], GoldenReport]
WaitFn = Callable[[float, threading.Event], bool]
"""Wait up to ``seconds`` or until the event is set; True when it was set."""
FaultHook = Callable[[str], None]
"""Called at each step (a phase name, or ``activated`` right after the store switched);
tests pause or raise there to simulate a crash at that point."""

"""An event's level (``protocol.Event.level``)."""
Outcome = Literal["committed", "failed", "rolled_back"]
"""The phases that end a deployment."""


@dataclass(frozen=True, slots=True)
class OtaEvent:
    """One ``ota.*`` event (the manager turns it into a ``protocol.Event``)."""

    code: str
    level: EventLevel
    message: str
    stream: str
    phase: DeploymentPhase
    details: Details


@dataclass(frozen=True, slots=True)
class Job:
    target: ModelRef | None
    """None: go back to the stream's baseline (the config's model)."""
    rev: int | None = None
    rollout_id: str | None = None
    resume: bool = False
    """Pick up an interrupted deployment at its persisted phase (restart recovery)."""


def _event_wait(seconds: float, stop: threading.Event) -> bool:
    return stop.wait(seconds)


def _no_fault(point: str) -> None:
    pass


@dataclass(frozen=True)
class Services:
    """What every stream's updater shares: file locations, store, verification, policy."""

    ota_dir: Path
    store: ModelStore
    download: DownloadFn
    verify: VerifyFn
    golden: GoldenFn
    thresholds: Thresholds = field(default_factory=Thresholds)
    probation_s: float = 60.0
    gate: GateRules = field(default_factory=GateRules)
    """The health gate's defaults (``[ota]``); a desired ``ModelRef.gate`` overrides them."""
    undecided: Literal["rollback", "commit"] = "rollback"
    shadow_max_s: float = 120.0
    shadow_interval_s: float = 0.2
    shadow_cpu_share: float = 0.25
    keys_problem: tuple[str, str] | None = None
    """(reason, message) when no update can be verified (no or unreadable trusted keys)."""
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    """Must be the clock of the streams' HealthRecorders."""
    wait: WaitFn = _event_wait
    fault: FaultHook = _no_fault

    @property
    def downloads(self) -> Path:
        return self.ota_dir / "downloads"

    @property
    def work(self) -> Path:
        return self.ota_dir / "work"

    def download_path(self, ref: ModelRef) -> Path:
        return self.downloads / f"{ref.sha256.lower()}.efb"


@dataclass(frozen=True)
class StreamIO:
    """The stream side an updater drives (built by the app)."""

    name: str
    baseline_manifest: Path
    baseline_ref: str | None
    load: Callable[[Path], Detector]
    """Load a model for this stream (its backend, threads, min_score)."""
    swap: Callable[[Detector], Detector]
    """Make the detector live between two frames; return the old one. AgentError on timeout."""
    active: Callable[[], str | None]
    """``name@version`` serving now."""
    health: HealthRecorder
    shadow: Callable[[ShadowRunner | None], None]
    """Attach a shadow model to the stream's inference loop (None detaches it; returns once
    the loop no longer uses the old runner). AgentError when the stream does not run."""


class Cancelled(Exception):
    """The running job was superseded or the updater is stopping."""


class Journal(Protocol):
    """Where a deployment records its transitions: persisted, reported, and cancellable."""

    @property
    def state(self) -> StreamState:
        """The stream's persisted deployment state."""
        ...

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the running job must stop (superseded, or the agent is stopping)."""
        ...

    @property
    def cancel_reason(self) -> str:
        """Why ``cancel_event`` was set: ``superseded`` or ``stopping``."""
        ...

    def enter(
        self,
        job: Job,
        phase: DeploymentPhase,
        message: str,
        *,
        from_slot: str | None = None,
        details: Details | None = None,
    ) -> None:
        """Persist and report ``phase`` before its step runs; raises Cancelled if cancelled."""
        ...

    def finish(
        self,
        job: Job,
        phase: Outcome,
        reason: str | None,
        message: str,
        details: Details | None = None,
    ) -> None:
        """Persist and report the job's outcome."""
        ...

    def show_evidence(self, evidence: GateEvidence) -> None:
        """Persist and report the health gate's evidence so far."""
        ...

    def check(self) -> None:
        """Raise Cancelled when the job was cancelled."""
        ...
