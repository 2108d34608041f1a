"""agent.ota.gate: paired statistics, verdicts, and the honesty of the stated confidence.

The coverage tests record real pairs (the shipped fp16 BlazeFace against the shipped INT8
one with a strict score threshold, which misses faces in runs of frames) on the shipped
video, then replay them as camera streams and count how often the interval holds the true
agreement of the recording.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import cv2
import pytest

from agent.ota.gate import (
    GateRules,
    Pair,
    evaluate,
    match_boxes,
    median_interval,
    wilson,
)
from inference.detector import load_detector
from protocol import Detection
from tests.bundle_factory import ASSETS

RULES = GateRules()


def face(x0: float, y0: float = 0.2, size: float = 0.3, score: float = 0.9) -> Detection:
    return Detection(label="face", score=score, box=(x0, y0, x0 + size, y0 + size))


def pairs_of(
    n: int,
    *,
    spacing_s: float = 0.2,
    current: int = 1,
    candidate: int = 1,
    matched: int = 1,
    current_ms: float = 1.0,
    candidate_ms: float | None = 1.0,
    every: int = 1,
) -> list[Pair]:
    """``n`` pairs; only every ``every``-th has boxes (the others: an empty scene)."""
    out = []
    for i in range(n):
        busy = i % every == 0
        out.append(
            Pair(
                t=i * spacing_s,
                current_boxes=current if busy else 0,
                candidate_boxes=candidate if busy else 0,
                matched=matched if busy else 0,
                current_ms=current_ms,
                candidate_ms=candidate_ms,
            )
        )
    return out


def test_boxes_match_one_to_one_by_label_and_iou() -> None:
    a = [face(0.1), face(0.6)]
    b = [face(0.12), face(0.6, score=0.5), Detection(label="cat", score=0.9, box=a[0].box)]
    matches = match_boxes(a, b)
    assert [(m[0].box[0], m[1].box[0]) for m in matches] == [(0.6, 0.6), (0.1, 0.12)]
    # Shifted by half a box: IoU 1/3, not the same object.
    assert match_boxes([face(0.1)], [face(0.25)]) == []


def test_wilson_and_median_intervals_match_textbook_values() -> None:
    lo, hi = wilson(0.5, 100, 1.96)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = wilson(1.0, 20, 1.96)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + 1.96**2))
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) is None  # 5 values: too few
    assert median_interval([float(i) for i in range(6)], 0.95) == (0.0, 5.0)
    assert median_interval([float(i) for i in range(20)], 0.95) == (5.0, 14.0)


def test_identical_models_pass_and_the_summary_says_it_in_words() -> None:
    result = evaluate(pairs_of(150), RULES)
    assert (result.verdict, result.reason) == ("pass", None)
    assert result.agreement == 1.0 and result.agreement_interval is not None
    assert result.agreement_interval[0] >= 0.8
    assert result.latency_ratio == pytest.approx(1.0)
    text = result.summary(RULES)
    assert text.startswith("agrees with the current model on 100.0% of boxes (95% CI ")
    assert "over 150 paired frames; median latency 1.00x" in text


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"candidate": 0, "matched": 0}, "agreement"),  # blind
        ({"matched": 0}, "agreement"),  # boxes elsewhere (shifted)
        ({"candidate_ms": 10.0}, "latency"),  # 10x slower
        ({"candidate_ms": None}, "errors"),  # NaN outputs or exceptions
    ],
)
def test_bad_candidates_fail_with_their_reason(kwargs: dict[str, object], reason: str) -> None:
    result = evaluate(pairs_of(150, **kwargs), RULES)  # type: ignore[arg-type]
    assert (result.verdict, result.reason) == ("fail", reason)


def test_an_empty_scene_proves_nothing_and_stays_undecided() -> None:
    empty = pairs_of(600, current=0, candidate=0, matched=0)
    result = evaluate(empty, RULES)
    assert result.verdict == "undecided" and result.agreement is None
    assert result.informative_pairs == 0
    assert "0 of 600 paired frames showed anything" in result.summary(RULES)
    # A few frames with a face are not enough either: they must reach min_informative.
    sparse = pairs_of(600, every=40)  # 15 informative pairs
    assert evaluate(sparse, RULES).agreement_verdict == "undecided"


def test_too_few_pairs_wait_instead_of_failing() -> None:
    assert evaluate(pairs_of(10, candidate=0, matched=0), RULES).verdict == "undecided"
    assert evaluate(pairs_of(10, candidate_ms=10.0), RULES).verdict == "undecided"


def test_borderline_agreement_is_undecided_not_failed() -> None:
    # Every second box matches: 50 % +- noise, against min_agreement 0.5.
    pairs = [
        Pair(
            t=i * 0.2,
            current_boxes=1,
            candidate_boxes=1,
            matched=i % 2,
            current_ms=1.0,
            candidate_ms=1.0,
        )
        for i in range(100)
    ]
    result = evaluate(pairs, GateRules(min_agreement=0.5))
    assert result.agreement == pytest.approx(0.5)
    assert result.agreement_verdict == "undecided"


def test_replace_without_compare_still_counts_errors_and_latency() -> None:
    rules = GateRules(compare=False)
    assert evaluate(pairs_of(150, candidate=0, matched=0), rules).verdict == "pass"
    assert evaluate(pairs_of(150, candidate_ms=None), rules).reason == "errors"


# --- coverage on recorded pairs -------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    current: int
    candidate: int
    matched: int
    current_ms: float
    candidate_ms: float


@functools.cache
def recording() -> tuple[Frame, ...]:
    """Every frame of the shipped video through fp16 and a strict INT8 (agreement ~0.7)."""
    current = load_detector(ASSETS / "blazeface-short-fp16.json")
    candidate = load_detector(ASSETS / "blazeface-short-int8.json", min_score=0.88)
    cap = cv2.VideoCapture(str(ASSETS / "face-walk-640x480.mp4"))
    frames = []
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                break
            a, b = current.detect(image), candidate.detect(image)
            frames.append(
                Frame(
                    len(a.detections),
                    len(b.detections),
                    len(match_boxes(a.detections, b.detections)),
                    a.infer_ms,
                    b.infer_ms,
                )
            )
    finally:
        cap.release()
        current.close()
        candidate.close()
    return tuple(frames)


def _truth(frames: tuple[Frame, ...]) -> float:
    return 2 * sum(f.matched for f in frames) / sum(f.current + f.candidate for f in frames)


def _stream(rng: random.Random, frames: tuple[Frame, ...], n: int, hold: bool) -> list[Frame]:
    """A camera stream: runs of the recording from random points (``hold``: one frame held
    still for 0.5-2 s, as when a person stands still)."""
    out: list[Frame] = []
    while len(out) < n:
        if hold:
            out.extend([frames[rng.randrange(len(frames))]] * rng.randint(8, 30))
        else:
            start, length = rng.randrange(len(frames)), rng.randint(15, 60)
            out.extend(frames[(start + i) % len(frames)] for i in range(length))
    return out[:n]


def _coverage(hold: bool, trials: int = 300) -> tuple[float, float]:
    """(our coverage, a naive Wilson interval's coverage) over 30 s windows at 15 fps with
    the default 0.2 s pair spacing."""
    frames = recording()
    truth = _truth(frames)
    rng = random.Random(7)
    ours = naive = counted = 0
    for _ in range(trials):
        stream = _stream(rng, frames, 450, hold)
        offset = rng.randrange(3)
        pairs = [
            Pair(i / 15, f.current, f.candidate, f.matched, f.current_ms, f.candidate_ms)
            for i, f in enumerate(stream)
            if i % 3 == offset
        ]
        result = evaluate(pairs, RULES)
        if result.agreement_interval is None or result.agreement is None:
            continue
        counted += 1
        lo, hi = result.agreement_interval
        ours += lo <= truth <= hi
        boxes = sum(p.current_boxes + p.candidate_boxes for p in pairs)
        n_lo, n_hi = wilson(result.agreement, boxes, 1.96)
        naive += n_lo <= truth <= n_hi
    assert counted >= trials * 0.9
    return ours / counted, naive / counted


def test_the_recording_has_the_disagreement_the_coverage_tests_need() -> None:
    frames = recording()
    assert len(frames) == 150
    assert 0.6 < _truth(frames) < 0.8
    assert sum(f.current for f in frames) == 90  # a face in frames 0-29, 60-89, 120-149


def test_the_interval_covers_the_true_agreement_at_its_stated_rate_on_moving_scenes() -> None:
    ours, _ = _coverage(hold=False)
    # 95 % stated; 300 trials give a standard error of about 1.3 points.
    assert ours >= 0.92, ours


def test_the_interval_stays_honest_when_people_stand_still_where_a_naive_one_does_not() -> None:
    ours, naive = _coverage(hold=True)
    assert ours >= 0.88, ours  # measured 0.93; frames held 0.5-2 s
    assert naive < 0.7, naive  # counting every paired frame as independent: measured 0.45
    assert math.isfinite(ours)
