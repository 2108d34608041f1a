"""The health gate's statistics: two models on the same frames, decided with confidence (pure).

Each *pair* is one frame both models inferred back to back (:mod:`agent.ota.shadow` records
them): how many boxes each found, how many of them match (same label, IoU >= 0.5), and both
inference times. :func:`evaluate` turns the pairs into a :class:`GateResult` with three
possible verdicts per check and overall: ``pass``, ``fail`` and ``undecided`` (not enough
evidence yet). A check fails only when its whole confidence interval lies beyond the
tolerance, and passes only when it lies within.

- **Agreement** is the F1 (Dice) of the candidate's boxes against the current model's,
  pooled over the pairs: ``2 * matched / (boxes_current + boxes_candidate)``. Frames where
  neither model sees anything agree trivially but carry no evidence: they add nothing to
  the ratio, and the check needs ``min_informative`` pairs with a box and ``min_blocks``
  such blocks before it can pass or fail (an empty room cannot prove a detector).
- **Latency ratio** is candidate / current inference time of the same frame, so host load
  hits both alike; its centre is the median of per-block medians of the log ratios.
- Consecutive frames are not independent samples (a missed face stays missed while the
  person stands still), so both intervals treat time *blocks* (``block_s``) as the unit of
  independence. Agreement: a Wilson score interval whose sample size is the number of boxes
  divided by the design effect (Kish) that the spread between blocks shows, the largest over
  doubling block lengths (the blocking method), with Student's t for the few blocks; when
  every box agrees or none does the spread shows nothing, and the sample size is the number
  of informative blocks. Latency: the distribution-free order-statistic interval of the
  median over the block medians. ``tests/test_gate_stats.py`` measures their coverage on recorded pairs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from inference.decoders.nms import iou
from protocol import Detection, GateEvidence
from protocol.messages import GateVerdict

__all__ = [
    "GateResult",
    "GateRules",
    "Pair",
    "evaluate",
    "match_boxes",
    "median_interval",
    "wilson",
]

MATCH_IOU = 0.5
"""Two boxes of the same label are the same object at this IoU or more (the usual detection
benchmark threshold; a box shifted by half its width has IoU 1/3)."""


@dataclass(frozen=True, slots=True)
class Pair:
    """One frame inferred by both models (candidate = the model being deployed)."""

    t: float
    """Monotonic seconds."""
    current_boxes: int
    candidate_boxes: int
    matched: int
    current_ms: float
    candidate_ms: float | None
    """None: the candidate raised or gave NaN/infinite outputs on this frame (an error)."""
    score_shift: tuple[float, ...] = ()
    """Candidate minus current score of each matched box."""
    current_cpu_ms: float | None = None
    candidate_cpu_ms: float | None = None
    """The inference thread's CPU time of each invoke, where the backend computes on that
    thread (``InferenceResult.cpu_ms``): the latency check compares these when both are
    known, the wall-clock times otherwise."""

    @property
    def log_ratio(self) -> float | None:
        """log(candidate / current inference time): CPU times where both are known (a busy
        host or interpreter lock does not stretch them), else wall-clock times; None for an
        error or a zero time."""
        if self.candidate_ms is None:
            return None
        cand, cur = self.candidate_cpu_ms, self.current_cpu_ms
        if cand is None or cur is None or cand <= 0 or cur <= 0:
            cand, cur = self.candidate_ms, self.current_ms
        if cand <= 0 or cur <= 0:
            return None
        return math.log(cand / cur)

    @property
    def error(self) -> bool:
        return self.candidate_ms is None

    @property
    def informative(self) -> bool:
        return self.current_boxes + self.candidate_boxes > 0


@dataclass(frozen=True, slots=True)
class GateRules:
    """Tolerances (``[ota]`` defaults, overridden per rollout by ``ModelRef.gate``)."""

    min_agreement: float = 0.8
    max_latency_ratio: float = 2.0
    max_errors: int = 0
    confidence: float = 0.95
    compare: bool = True
    block_s: float = 1.0
    """Pairs within one block of time count as one unit of independent evidence."""
    min_informative: int = 20
    """Paired frames with a box (from either model) before agreement can be decided."""
    min_blocks: int = 6
    """Blocks of time (with a box, for agreement) before a check can be decided; at 95 % the
    median's order-statistic interval needs 6."""


@dataclass(frozen=True, slots=True)
class GateResult:
    verdict: GateVerdict
    reason: str | None
    """``agreement``, ``latency`` or ``errors`` for a fail (prefixed by the caller)."""
    pairs: int
    informative_pairs: int
    agreement: float | None
    agreement_interval: tuple[float, float] | None
    precision: float | None
    recall: float | None
    latency_ratio: float | None
    latency_interval: tuple[float, float] | None
    score_shift: float | None
    errors: int
    confidence: float
    agreement_verdict: GateVerdict
    latency_verdict: GateVerdict

    def summary(self, rules: GateRules) -> str:
        """The evidence in an operator's words."""
        pct = round(self.confidence * 100)
        parts = []
        if self.agreement is not None and self.agreement_interval is not None:
            lo, hi = self.agreement_interval
            parts.append(
                f"agrees with the current model on {self.agreement:.1%} of boxes ({pct}% CI "
                f"{lo:.1%}-{hi:.1%}) over {self.pairs} paired frames"
            )
        else:
            parts.append(
                f"{self.informative_pairs} of {self.pairs} paired frames showed anything, too "
                "few to judge agreement"
            )
        if self.latency_ratio is not None:
            text = f"median latency {self.latency_ratio:.2f}x"
            if self.latency_interval is not None:
                lo, hi = self.latency_interval
                text += f" ({pct}% CI {lo:.2f}-{hi:.2f}x)"
            parts.append(text)
        if self.errors:
            parts.append(f"{self.errors} inference error(s) (at most {rules.max_errors} allowed)")
        return "; ".join(parts)

    def evidence(self, stage: str, rules: GateRules, *, reason: str | None) -> GateEvidence:
        def r(value: float | None, digits: int = 4) -> float | None:
            return round(value, digits) if value is not None else None

        a_lo, a_hi = self.agreement_interval or (None, None)
        l_lo, l_hi = self.latency_interval or (None, None)
        return GateEvidence(
            stage="probation" if stage == "probation" else "shadow",
            pairs=self.pairs,
            informative_pairs=self.informative_pairs,
            agreement=r(self.agreement),
            agreement_low=r(a_lo),
            agreement_high=r(a_hi),
            precision=r(self.precision),
            recall=r(self.recall),
            latency_ratio=r(self.latency_ratio, 3),
            latency_ratio_low=r(l_lo, 3),
            latency_ratio_high=r(l_hi, 3),
            score_shift=r(self.score_shift),
            errors=self.errors,
            confidence=self.confidence,
            verdict=self.verdict,
            reason=reason,
            summary=self.summary(rules),
        )


def match_boxes(
    current: Sequence[Detection], candidate: Sequence[Detection], *, min_iou: float = MATCH_IOU
) -> list[tuple[Detection, Detection]]:
    """Greedy one-to-one matching of boxes with the same label, best IoU first."""
    scored = []
    for i, a in enumerate(current):
        for j, b in enumerate(candidate):
            if a.label == b.label:
                overlap = iou(a.box, b.box)
                if overlap >= min_iou:
                    scored.append((overlap, i, j))
    scored.sort(reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    matches = []
    for _, i, j in scored:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matches.append((current[i], candidate[j]))
    return matches


_MIN_VARIANCE_BLOCKS = 8
"""Blocks (with a box) a variance estimate at a block length needs to be used."""


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _t_quantile(z: float, df: int) -> float:
    """Student's t quantile from the normal one (Cornish-Fisher; within 1 % for df >= 4)."""
    if df <= 0:
        return z * 4.0
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (effective) trials."""
    if n <= 0:
        return (0.0, 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_interval(values: Sequence[float], confidence: float) -> tuple[float, float] | None:
    """Distribution-free interval of the median of independent ``values`` (order statistics);
    None when there are too few for ``confidence``."""
    n = len(values)
    alpha = 1.0 - confidence
    ordered = sorted(values)
    k = 0  # the largest k with P(Binom(n, 1/2) < k) <= alpha / 2
    cumulative = 0.0
    for i in range(n):
        cumulative += math.comb(n, i) / 2.0**n
        if cumulative > alpha / 2:
            break
        k = i + 1
    if k == 0:
        return None
    return (ordered[k - 1], ordered[n - k])


def _blocks(pairs: Sequence[Pair], block_s: float) -> list[list[Pair]]:
    groups: dict[int, list[Pair]] = {}
    if not pairs:
        return []
    t0 = pairs[0].t
    for pair in pairs:
        groups.setdefault(math.floor((pair.t - t0) / block_s), []).append(pair)
    return [groups[k] for k in sorted(groups)]


def _block_sums(blocks: list[list[Pair]]) -> tuple[list[tuple[int, int]], int]:
    """Per block with a box: (2 * matched, boxes); and the informative pairs."""
    sums = []
    informative = 0
    for block in blocks:
        agree = boxes = 0
        for p in block:
            if p.error:
                continue
            agree += 2 * p.matched
            boxes += p.current_boxes + p.candidate_boxes
            informative += p.informative
        if boxes:
            sums.append((agree, boxes))
    return sums, informative


def _between_variance(sums: list[tuple[int, int]], ratio: float) -> float:
    """Cluster-robust (linearised) variance of the pooled ratio, blocks as clusters."""
    k = len(sums)
    total = sum(b for _, b in sums)
    return k / (k - 1) * sum((a - ratio * b) ** 2 for a, b in sums) / total**2


def _agreement(
    pairs: Sequence[Pair], blocks: list[list[Pair]], rules: GateRules, z: float
) -> tuple[float | None, tuple[float, float] | None, GateVerdict]:
    """``blocks``: ``pairs`` grouped by ``rules.block_s`` (longer blocks are made here)."""
    sums, informative = _block_sums(blocks)
    total = sum(b for _, b in sums)
    if not total:
        return None, None, "undecided"
    ratio = sum(a for a, _ in sums) / total
    k = len(sums)
    n_eff = float(k)  # when every box agrees (or none does) the spread shows nothing
    if 0.0 < ratio < 1.0 and k > 1:
        # Blocking method: the variance estimate grows with the block length while blocks
        # are shorter than the correlation time; take the largest over doubling lengths
        # that still leave enough blocks to estimate it.
        variance, clusters = _between_variance(sums, ratio), k
        length = rules.block_s * 2
        while True:
            coarse, _ = _block_sums(_blocks(pairs, length))
            if len(coarse) < _MIN_VARIANCE_BLOCKS:
                break
            wider = _between_variance(coarse, ratio)
            if wider > variance:
                variance, clusters = wider, len(coarse)
            length *= 2
        binomial = ratio * (1 - ratio) / total
        design_effect = max(variance / binomial, 1.0) if variance > 0 else 1.0
        n_eff = min(float(total), total / design_effect)
        # The variance is estimated from few blocks: Student's t instead of the normal z.
        z = _t_quantile(z, clusters - 1)
    interval = wilson(ratio, n_eff, z)
    if informative < rules.min_informative or k < rules.min_blocks:
        return ratio, interval, "undecided"
    if interval[1] < rules.min_agreement:
        return ratio, interval, "fail"
    if interval[0] >= rules.min_agreement:
        return ratio, interval, "pass"
    return ratio, interval, "undecided"


def _latency(
    blocks: list[list[Pair]], rules: GateRules
) -> tuple[float | None, tuple[float, float] | None, GateVerdict]:
    medians = []
    for block in blocks:
        logs = [r for r in (p.log_ratio for p in block) if r is not None]
        if logs:
            medians.append(statistics.median(logs))
    if not medians:
        return None, None, "undecided"
    centre = math.exp(statistics.median(medians))
    found = median_interval(medians, rules.confidence) if len(medians) >= rules.min_blocks else None
    if found is None:
        return centre, None, "undecided"
    interval = (math.exp(found[0]), math.exp(found[1]))
    if interval[0] > rules.max_latency_ratio:
        return centre, interval, "fail"
    if interval[1] <= rules.max_latency_ratio:
        return centre, interval, "pass"
    return centre, interval, "undecided"


def evaluate(pairs: Sequence[Pair], rules: GateRules) -> GateResult:
    """The gate's verdict on ``pairs`` (oldest first)."""
    z = _z(rules.confidence)
    blocks = _blocks(pairs, rules.block_s)
    errors = sum(p.error for p in pairs)
    ok = [p for p in pairs if not p.error]
    matched = sum(p.matched for p in ok)
    current = sum(p.current_boxes for p in ok)
    candidate = sum(p.candidate_boxes for p in ok)
    shifts = [s for p in ok for s in p.score_shift]
    agreement, a_interval, a_verdict = _agreement(pairs, blocks, rules, z)
    latency, l_interval, l_verdict = _latency(blocks, rules)
    if not rules.compare:
        a_verdict = "pass"
    reason: str | None = None
    verdict: GateVerdict
    if errors > rules.max_errors:
        verdict, reason = "fail", "errors"
    elif a_verdict == "fail":
        verdict, reason = "fail", "agreement"
    elif l_verdict == "fail":
        verdict, reason = "fail", "latency"
    elif a_verdict == "pass" and l_verdict == "pass":
        verdict = "pass"
    else:
        verdict = "undecided"
    return GateResult(
        verdict=verdict,
        reason=reason,
        pairs=len(pairs),
        informative_pairs=sum(p.informative for p in ok),
        agreement=agreement,
        agreement_interval=a_interval,
        precision=matched / candidate if candidate else None,
        recall=matched / current if current else None,
        latency_ratio=latency,
        latency_interval=l_interval,
        score_shift=statistics.median(shifts) if shifts else None,
        errors=errors,
        confidence=rules.confidence,
        agreement_verdict=a_verdict,
        latency_verdict=l_verdict,
    )
