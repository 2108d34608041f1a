"""The rollout engine's pure decisions (docs/ota.md, "Rollouts"): an execution's status from
what its device reports, the abort criteria, and the ``ModelRef`` a rollout writes. No I/O;
``controller.rollouts.engine`` applies them and the tests call them directly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.fleet.registry import ModelInfo
from controller.rollouts.executions import Execution
from controller.rollouts.records import FINISHED, TIMEOUT_REASON, RolloutInfo, failures
from protocol.messages import DEPLOYING_PHASES, FAILED_PHASES

IN_FLIGHT = ("pending", "queued", "in_progress")
_DEPLOYING = DEPLOYING_PHASES


def derive_status(e: Execution, model: str) -> tuple[str, str | None, str | None]:
    """(status, phase, reason) of an execution from the device's reported state (docs/ota.md).

    ``desired_rev`` below the execution's rev → queued; ``failed``/``rolled_back`` with the
    rollout's model as ``target`` → failed, unless it is the very failure the stream reported
    before the assignment (the agent reports the new ``desired_rev`` before the stream's phase
    changes: no outcome yet); ``committed`` (or idle/no phase, for a device that already ran
    the model) with the model active → succeeded; anything else → in progress.
    """
    if e.reported_rev is None or e.reported_rev < e.rev:
        return "queued", None, None
    if not e.has_report:
        return "in_progress", None, None
    phase = e.report_phase
    if phase in FAILED_PHASES and e.report_target == model:
        if e.report_is_stale():
            return "in_progress", phase, None
        return "failed", phase, e.report_reason or phase
    if e.report_active == model and phase not in _DEPLOYING and phase not in FAILED_PHASES:
        return "succeeded", phase, None
    return "in_progress", phase, None


def next_status(
    e: Execution, model: str, *, now: float, timeout_s: float
) -> tuple[str, str | None, str | None]:
    """The execution's status after this tick: derived, then timeouts; only a failure can
    follow a success (the device later reporting the model failed or rolled back)."""
    status, phase, reason = derive_status(e, model)
    if e.status == "succeeded" and status != "failed":
        return "succeeded", phase if phase is not None else e.phase, None
    if status in ("queued", "in_progress") and now - e.assigned_at >= timeout_s:
        if status == "in_progress" and e.report_is_stale():
            return (
                "timed_out",
                phase,
                f"{TIMEOUT_REASON}the device still reports its earlier {phase} of this model "
                f"({e.report_reason}) and did not deploy it again within {timeout_s:.0f}s",
            )
        where = (
            f"still {phase}"
            if phase
            else (
                "never took up the desired state" if status == "queued" else "no progress reported"
            )
        )
        return "timed_out", phase, f"{TIMEOUT_REASON}{where} after {timeout_s:.0f}s"
    return status, phase, reason


def _share(n: int, of: int) -> str:
    return f"{100 * n / of:.0f}%" if of else "0%"


def abort_reason(r: RolloutInfo, counts: Mapping[int, Mapping[str, int]]) -> tuple[str, str] | None:
    """The abort criteria on the executions' statuses: ``(reason, detail)`` or None.

    - ``stage_failed``: a finished stage (every execution done) whose own failure share is
      above ``max_failures`` (so a failed canary aborts even below ``min_executed``);
    - ``failure_threshold``: failures / finished above ``max_failures`` once at least
      ``min_executed`` executions finished.
    """
    limit = f"--max-failures {r.max_failures * 100:g}%"
    finished = failed = 0
    for stage in sorted(counts):
        c = counts[stage]
        size = sum(c.values())
        stage_failed = failures(c)
        finished += sum(c.get(s, 0) for s in FINISHED)
        failed += stage_failed
        unfinished = sum(c.get(s, 0) for s in IN_FLIGHT)
        if (
            stage <= r.current_stage
            and size
            and not unfinished
            and stage_failed / size > r.max_failures
        ):
            return (
                "stage_failed",
                f"stage {stage + 1}: {stage_failed} of {size} executions failed "
                f"({_share(stage_failed, size)}), above {limit}",
            )
    if finished and finished >= r.min_executed and failed / finished > r.max_failures:
        return (
            "failure_threshold",
            f"{failed} of {finished} finished executions failed ({_share(failed, finished)}), "
            f"above {limit} (after --min-executed {r.min_executed})",
        )
    return None


def bundle_url(base_url: str, m: ModelInfo) -> str:
    """The device download URL of a model (same path as ``controller.api.routes.bundle_path``)."""
    return f"{base_url.rstrip('/')}/api/v1/models/{m.name}/{m.version}/bundle?key={m.download_key}"


def model_ref(m: ModelInfo, base_url: str, gate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``protocol.ModelRef`` (as a JSON object) of a registry model, with a rollout's
    health-gate overrides (``gate`` left out when there are none, as older agents expect)."""
    ref: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "url": bundle_url(base_url, m),
        "sha256": m.sha256,
        "size": m.size,
        "signature": m.signature,
    }
    if gate:
        ref["gate"] = dict(gate)
    return ref


def ref_name(ref: Mapping[str, Any] | None) -> str | None:
    return None if not ref else f"{ref['name']}@{ref['version']}"
