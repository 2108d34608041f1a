"""The health gate's policy around the statistics: effective rules, failure sentences."""

from __future__ import annotations

import dataclasses

import msgspec

from agent.ota import OtaError
from agent.ota.gate import GateResult, GateRules
from agent.ota.services import Details
from protocol import GateEvidence, ModelRef

__all__ = ["GateFailed", "evidence_details", "gate_message", "rules_for"]


def rules_for(ref: ModelRef, defaults: GateRules, undecided: str) -> tuple[GateRules, str]:
    """The device's gate defaults with the desired state's overrides (``ModelRef.gate``)."""
    gate = ref.gate
    if gate is None:
        return defaults, undecided
    changes: dict[str, object] = {"compare": gate.compare}
    for name in ("min_agreement", "max_latency_ratio", "max_errors"):
        value = getattr(gate, name)
        if value is not None:
            changes[name] = value
    return dataclasses.replace(defaults, **changes), gate.undecided or undecided  # type: ignore[arg-type]


class GateFailed(OtaError):
    """The health gate refused the candidate; its evidence is in the stream's state."""


def evidence_details(evidence: GateEvidence) -> Details:
    """The evidence as flat event details (``gate_*``)."""
    return {
        f"gate_{key}": value
        for key, value in msgspec.structs.asdict(evidence).items()
        if isinstance(value, (str, int, float, bool)) or value is None
    }


def gate_message(model: str, result: GateResult, rules: GateRules, max_s: float | None) -> str:
    summary = result.summary(rules)
    if result.reason == "errors":
        why = "it raised inference errors (exceptions or NaN/infinite outputs)"
    elif result.reason == "agreement":
        why = f"it agrees with the current model on fewer than {rules.min_agreement:.0%} of boxes"
    elif result.reason == "latency":
        why = f"it is more than {rules.max_latency_ratio:g}x slower on the same frames"
    else:
        why = f"after {max_s:g} s there was not enough evidence either way"
    fix = (
        "check the model on this camera's footage, or roll out with other tolerances "
        "(--min-agreement, --max-latency-ratio; --replace for a deliberately different model)"
        if result.reason
        else "retry when the camera shows activity, or roll out with --undecided commit"
    )
    return f"{model} was refused by the health gate: {why} ({summary}); {fix}"
