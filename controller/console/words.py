"""Rollout and health-gate facts in words, for the console's pages."""

from __future__ import annotations

from typing import Any

REASONS = {
    "stage_failed": "a stage failed",
    "failure_threshold": "too many devices failed",
    "health_regression": "the health gate saw the new model do worse",
    "operator": "stopped by an operator",
}


def abort_words(reason: str | None, detail: str | None) -> str | None:
    """Why a rollout ended early, in words (None when it did not): the reason's title and
    the engine's or operator's detail (an operator's detail says who, so it stands alone)."""
    if reason is None and not detail:
        return None
    title = REASONS.get(reason or "", reason or "")
    if not detail:
        return title
    if reason == "operator" or not title:
        return detail
    return f"{title}: {detail}"


def gate_words(evidence: dict[str, Any] | None) -> str:
    """The health gate's evidence (``protocol.GateEvidence`` as JSON) in words: verdict,
    stage, the agent's own summary and the reason of a failure."""
    if not evidence:
        return ""
    head = " ".join(str(evidence[k]) for k in ("verdict", "stage") if evidence.get(k))
    text = f"{head}: {evidence['summary']}" if evidence.get("summary") else head
    if evidence.get("reason"):
        text += f" (reason: {evidence['reason']})"
    return text
