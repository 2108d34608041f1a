"""Plausible health-gate evidence for simulated devices (:mod:`tools.simulator`).

A passing gate agrees on 95-99% of boxes at about the same latency; a failing one
(``reason`` set) shows the problem its reason names: a latency ratio far above the limit
for a ``*_latency*`` reason, else an agreement of about 61%.
"""

from __future__ import annotations

import random
from typing import Literal, get_args, get_type_hints

from protocol import GateEvidence

GATE_STAGES: tuple[str, ...] = get_args(get_type_hints(GateEvidence)["stage"])
"""Deployment phases in which the device compares the candidate with the current model
(the protocol's ``GateEvidence.stage``: shadow, probation)."""
CONFIDENCE = 0.95


def summary(agreement: float, low: float, high: float, pairs: int, latency: float) -> str:
    """The evidence in words, as the agent says it."""
    return (
        f"agrees with the current model on {agreement * 100:.1f}% of boxes "
        f"({CONFIDENCE * 100:.0f}% CI {low * 100:.1f}–{high * 100:.1f}%) over {pairs} paired "
        f"frames; median latency {latency:.2f}x"
    )


def evidence(
    stage: Literal["shadow", "probation"], rng: random.Random, *, reason: str | None = None
) -> GateEvidence:
    """Evidence with verdict ``pass``, or ``fail`` with ``reason``."""
    pairs = rng.randint(100, 140) if stage == "shadow" else rng.randint(180, 240)
    informative = round(pairs * rng.uniform(0.7, 0.9))
    agreement = rng.uniform(0.95, 0.99)
    latency = rng.uniform(0.95, 1.08)
    if reason is not None and "latency" in reason:
        latency = rng.uniform(2.3, 2.6)
    elif reason is not None:
        agreement = rng.uniform(0.6, 0.62)
    margin = 0.6 * (1 - agreement) + 0.01
    low, high = max(0.0, agreement - margin), min(1.0, agreement + margin * 0.8)
    return GateEvidence(
        stage=stage,
        pairs=pairs,
        informative_pairs=informative,
        agreement=round(agreement, 4),
        agreement_low=round(low, 4),
        agreement_high=round(high, 4),
        precision=round(min(1.0, agreement + 0.01), 4),
        recall=round(max(0.0, agreement - 0.01), 4),
        latency_ratio=round(latency, 3),
        latency_ratio_low=round(latency * 0.96, 3),
        latency_ratio_high=round(latency * 1.04, 3),
        score_shift=round(rng.uniform(-0.02, 0.02), 4),
        errors=0,
        confidence=CONFIDENCE,
        verdict="pass" if reason is None else "fail",
        reason=reason,
        summary=summary(agreement, low, high, pairs, latency),
    )
