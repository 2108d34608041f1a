"""How a simulated device handles desired states (docs/ota.md): :class:`OtaBehaviour` says what
to do (fail, be slow, download), :class:`DeviceOta` holds one device's deployment state and
turns each new desired rev into phase steps, its reported state and its telemetry."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from protocol import (
    Desired,
    ModelRef,
    ProtocolError,
    Reported,
    StreamReport,
    StreamTelemetry,
    Telemetry,
    decode,
)
from protocol.messages import DEPLOYING_PHASES, OUTCOME_PHASES, DeploymentPhase
from tools.simulator.download import fetch_bundle
from tools.simulator.gate import GATE_STAGES
from tools.simulator.gate import evidence as gate_evidence

log = logging.getLogger(__name__)

DEPLOY_PHASES: tuple[str, ...] = (
    *(p for p in get_args(DeploymentPhase) if p in DEPLOYING_PHASES),
    "committed",
)
"""The phases a deployment passes through, in order (the protocol's), ending committed."""
FAILED_PHASES = OUTCOME_PHASES - {"committed"}
"""The outcomes of a deployment that did not go through (``failed``, ``rolled_back``)."""

Step = tuple[int, str, str, str | None]
"""(rev, stream, phase, reason) of one deployment step; phase ``download`` fetches the bundle."""


@dataclass(frozen=True)
class OtaBehaviour:
    """How simulated devices handle desired states."""

    fail: dict[str, str] = field(default_factory=dict)
    """Model (``name@version``) → failure reason, e.g. ``{"m@2": "golden_mismatch"}``."""
    fail_phase: str = "staging"
    """Where a failing model fails; ``probation`` reports ``rolled_back`` instead of ``failed``."""
    fail_devices: frozenset[str] | None = None
    """Only these devices fail (None: every device)."""
    slow: frozenset[str] = frozenset()
    """Models with clearly worse telemetry: 3x inference p95, half the fps."""
    load: Callable[[float], float] | None = None
    """Machine-wide load: telemetry ``ts`` → factor on every device's inference p95, updated
    or not (a CPU spike that hits the whole fleet at one moment); None: 1."""
    phase_delay_s: float = 0.05
    download: bool = False
    """Fetch the bundle over HTTP and check its size and sha256 (``download_failed``,
    ``http_<status>``, ``size_mismatch``, ``sha256_mismatch`` otherwise); connection errors
    and 5xx are retried with backoff for ``download_retry_s``."""
    download_retry_s: float = 20.0

    def failure(self, device_id: str, model: str) -> str | None:
        if model not in self.fail:
            return None
        if self.fail_devices is not None and device_id not in self.fail_devices:
            return None
        return self.fail[model]


def _ref(ref: ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


class DeviceOta:
    """One device's OTA state: what it runs per stream, the desired revs it received and
    handled; ``on_desired`` returns the phase steps to apply (``apply``), one per delay."""

    def __init__(
        self,
        device_id: str,
        *,
        streams: Sequence[str],
        baseline: str | None,
        behaviour: OtaBehaviour,
        seed: int = 0,
    ) -> None:
        self.device_id = device_id
        self.baseline = baseline
        self.behaviour = behaviour
        self.handled_rev: int | None = None
        self.received: list[Desired] = []
        """Every desired message that arrived (retained redeliveries too)."""
        self.deployments: list[tuple[int, str, str]] = []
        """(rev, stream, model) of every deployment started."""
        self.streams: dict[str, dict[str, Any]] = {
            s: {
                "active": baseline,
                "previous": None,
                "installed": [baseline] if baseline else [],
                "phase": "idle",
                "target": None,
                "reason": None,
                "gate": None,
                "compare": True,
            }
            for s in streams
        }
        rng = random.Random(seed)
        self._fps = {s: rng.uniform(24, 26) for s in streams}
        self._infer = {s: rng.uniform(2.8, 3.2) for s in streams}
        self._frames = dict.fromkeys(streams, 0)
        self._rng = rng
        self._refs: dict[tuple[int, str], ModelRef] = {}
        self.lock = threading.Lock()

    def on_desired(self, desired: Desired) -> list[Step]:
        """Steps (rev, stream, phase, reason) for a new rev; none for an old or repeated one."""
        with self.lock:
            self.received.append(desired)
            if self.handled_rev is not None and desired.rev <= self.handled_rev:
                return []
            self.handled_rev = desired.rev
            steps: list[Step] = []
            for stream, st in self.streams.items():
                ref = desired.models.get(stream)
                target = _ref(ref) if ref is not None else self.baseline
                if target is None or (
                    target == st["active"] and st["phase"] not in DEPLOY_PHASES[:-1]
                ):
                    st.update(phase="committed" if target else "idle", target=target, reason=None)
                    continue
                self.deployments.append((desired.rev, stream, target))
                reason = self.behaviour.failure(self.device_id, target) if ref is not None else None
                compare = ref is not None and (ref.gate is None or ref.gate.compare)
                st.update(
                    phase="downloading", target=target, reason=None, gate=None, compare=compare
                )
                if self.behaviour.download and ref is not None:
                    self._refs[(desired.rev, stream)] = ref
                    steps.append((desired.rev, stream, "download", None))
                for phase in DEPLOY_PHASES[1:]:
                    if phase == "shadow" and not compare:  # a replacement: nothing to compare
                        continue
                    if reason is not None and phase == self.behaviour.fail_phase:
                        failed = "rolled_back" if phase == "probation" else "failed"
                        steps.append((desired.rev, stream, failed, reason))
                        break
                    steps.append((desired.rev, stream, phase, None))
            return steps

    def apply(self, step: Step) -> bool:
        """Apply one step; False if a newer rev superseded it (nothing to report)."""
        rev, stream, phase, reason = step
        with self.lock:
            st = self.streams[stream]
            if rev != self.handled_rev or st["phase"] in FAILED_PHASES:
                return False
        if phase == "download":
            ref = self._refs.pop((rev, stream))
            problem = fetch_bundle(
                ref.url, ref.sha256, ref.size, retry_s=self.behaviour.download_retry_s
            )
            with self.lock:
                if problem is not None and rev == self.handled_rev:
                    st.update(phase="failed", reason=problem)
                return problem is not None
        with self.lock:
            if rev != self.handled_rev:
                return False
            if phase == "committed":
                old = st["active"]
                installed = [m for m in st["installed"] if m not in (st["target"], old)]
                st.update(
                    active=st["target"],
                    previous=old,
                    installed=[st["target"], *([old] if old else []), *installed][:3],
                    phase="committed",
                    reason=None,
                )
            else:
                st.update(phase=phase, reason=reason)
            stage = phase if reason is None else self.behaviour.fail_phase
            if st["compare"] and stage in GATE_STAGES:
                st["gate"] = gate_evidence(stage, self._rng, reason=reason)  # type: ignore[arg-type]
            return True

    def reported(self, ts: float) -> Reported:
        with self.lock:
            return Reported(
                schema=1,
                device_id=self.device_id,
                ts=ts,
                desired_rev=self.handled_rev,
                streams={
                    s: StreamReport(
                        active=st["active"],
                        previous=st["previous"],
                        installed=list(st["installed"]),
                        phase=st["phase"],
                        target=st["target"],
                        reason=st["reason"],
                        gate=st["gate"],
                    )
                    for s, st in self.streams.items()
                },
            )

    def telemetry(self, ts: float, interval_s: float) -> Telemetry:
        with self.lock:
            streams = []
            for s, st in self.streams.items():
                slow = st["active"] in self.behaviour.slow
                fps = self._fps[s] * (0.5 if slow else 1.0) * self._rng.uniform(0.98, 1.02)
                infer = self._infer[s] * (3.0 if slow else 1.0) * self._rng.uniform(0.97, 1.03)
                if self.behaviour.load is not None:
                    infer *= self.behaviour.load(ts)
                self._frames[s] += round(fps * interval_s)
                streams.append(
                    StreamTelemetry(
                        name=s,
                        source_state="running",
                        fps=round(fps, 2),
                        frames_captured=self._frames[s],
                        frames_processed=self._frames[s],
                        frames_dropped=0,
                        infer_ms_p50=round(infer * 0.6, 3),
                        infer_ms_p95=round(infer, 3),
                        latency_ms_p50=round(infer * 0.6 + 8, 3),
                        latency_ms_p95=round(infer + 12, 3),
                    )
                )
        return Telemetry(
            schema=1,
            device_id=self.device_id,
            ts=ts,
            interval_s=interval_s,
            cpu_percent=30.0,
            mem_percent=40.0,
            mem_used_bytes=400 * 1024 * 1024,
            temp_c=50.0,
            disk_percent=30.0,
            disk_free_bytes=10 * 1024**3,
            spool_depth=0,
            spool_dropped=0,
            streams=streams,
        )

    def revs_with(self, model: str) -> set[int]:
        """Distinct desired revs received that carry ``model`` on some stream."""
        with self.lock:
            return {
                d.rev for d in self.received if any(_ref(r) == model for r in d.models.values())
            }


def decode_desired(device_id: str, payload: bytes) -> Desired | None:
    if not payload:
        return None
    try:
        return decode(payload, Desired)
    except ProtocolError as err:
        log.warning("%s: ignoring a malformed desired state: %s", device_id, err)
        return None
