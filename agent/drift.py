"""Detection-score drift: histograms of scores and their population stability index (PSI).

The inference thread feeds the scores of every frame (``DriftMonitor.observe``: a lock
and one list update per detection); readers (telemetry, /metrics) call ``psi()``.

PSI compares two histograms over the same bins::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with ``e_i``/``a_i`` the expected (baseline) and actual (recent) bin proportions. By the
usual rule of thumb PSI < 0.1 means no change, 0.1-0.25 a moderate one and > 0.25 a
significant shift of the score distribution: the scene or the model changed.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent.atomic import StateFileError, atomic_write_json, read_json_state
from agent.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_BINS = 10
SIGNIFICANT_PSI = 0.25
"""The conventional threshold of a significant distribution shift."""


class DriftError(AgentError):
    """Histograms that cannot be compared (different bin counts, no samples)."""


def _bin_index(score: float, bins: int) -> int:
    """Bin of a score in [0, 1]; out-of-range scores land in the first or last bin."""
    if score <= 0.0 or math.isnan(score):  # NaN goes to the first bin, never raises
        return 0
    return min(int(score * bins), bins - 1)


class ScoreHistogram:
    """Counts of detection scores (0..1) in ``bins`` equal-width bins.

    Not thread-safe on its own; ``DriftMonitor`` adds the lock.
    """

    __slots__ = ("_counts", "bins")

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2:
            raise DriftError(f"a score histogram needs at least 2 bins, got {bins}")
        self.bins = bins
        self._counts = [0] * bins

    def add(self, score: float) -> int:
        """Count one score; return its bin index."""
        i = _bin_index(score, self.bins)
        self._counts[i] += 1
        return i

    def add_many(self, scores: Iterable[float]) -> None:
        counts, bins = self._counts, self.bins
        for score in scores:
            counts[_bin_index(score, bins)] += 1

    def remove_bin(self, index: int) -> None:
        """Uncount one sample of bin ``index`` (a sliding window evicting its oldest)."""
        self._counts[index] -= 1

    def set_counts(self, counts: Sequence[int]) -> None:
        """Replace every count (a stored baseline)."""
        if len(counts) != self.bins:
            raise DriftError(f"expected {self.bins} counts, got {len(counts)}")
        if any(n < 0 for n in counts):
            raise DriftError("histogram counts cannot be negative")
        self._counts = [int(n) for n in counts]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts)

    def clear(self) -> None:
        self._counts = [0] * self.bins


def psi(
    expected_counts: Sequence[float], actual_counts: Sequence[float], eps: float = 1e-4
) -> float:
    """Population stability index of ``actual_counts`` against ``expected_counts``.

    Counts become proportions; a proportion below ``eps`` is raised to ``eps`` so an empty
    bin adds a large but finite term instead of an infinite one.
    """
    if len(expected_counts) != len(actual_counts):
        raise DriftError(
            f"cannot compare histograms of {len(expected_counts)} and {len(actual_counts)} "
            "bins: build both with the same number of bins"
        )
    e_total = float(sum(expected_counts))
    a_total = float(sum(actual_counts))
    if e_total <= 0 or a_total <= 0:
        raise DriftError(
            "cannot compute PSI of an empty histogram: collect some detections in both first"
        )
    result = 0.0
    for e, a in zip(expected_counts, actual_counts, strict=True):
        pe = max(e / e_total, eps)
        pa = max(a / a_total, eps)
        result += (pa - pe) * math.log(pa / pe)
    return result


class DriftMonitor:
    """Baseline vs. recent score histogram of one stream.

    ``baseline`` None: the first ``baseline_size`` detections observed become the baseline
    (call ``reset()`` when a new model becomes active). The recent histogram covers the
    last ``window`` detections (a sliding window). ``psi()`` is None until the baseline is
    complete and the window holds at least ``min_samples`` detections.
    """

    def __init__(
        self,
        baseline: Sequence[int] | None = None,
        *,
        window: int,
        bins: int = DEFAULT_BINS,
        baseline_size: int | None = None,
        min_samples: int | None = None,
    ) -> None:
        if window < 1:
            raise DriftError(f"drift window must be at least 1 detection, got {window}")
        if baseline is not None and len(baseline) != bins:
            raise DriftError(
                f"baseline has {len(baseline)} bins but the monitor uses {bins}: pass "
                "bins=len(baseline)"
            )
        self.bins = bins
        self.window = window
        self.baseline_size = baseline_size if baseline_size is not None else window
        if self.baseline_size < 1:
            raise DriftError(f"baseline_size must be at least 1, got {self.baseline_size}")
        self.min_samples = min(min_samples if min_samples is not None else window, window)
        self._lock = threading.Lock()
        self._baseline = ScoreHistogram(bins)
        self._fixed_baseline = tuple(baseline) if baseline is not None else None
        self._recent = ScoreHistogram(bins)
        self._recent_bins: deque[int] = deque()
        self._init_baseline()

    def _init_baseline(self) -> None:
        self._baseline.clear()
        if self._fixed_baseline is not None:
            self._baseline.set_counts(self._fixed_baseline)
            self._baseline_done = True
        else:
            self._baseline_done = False
        self._recent.clear()
        self._recent_bins.clear()

    def observe(self, scores: Iterable[float]) -> None:
        """Record the scores of one frame's detections (called by the inference thread)."""
        with self._lock:
            for score in scores:
                if not self._baseline_done:
                    self._baseline.add(score)
                    if self._baseline.total >= self.baseline_size:
                        self._baseline_done = True
                    continue
                if len(self._recent_bins) >= self.window:
                    self._recent.remove_bin(self._recent_bins.popleft())
                self._recent_bins.append(self._recent.add(score))

    def reset(self, baseline: Sequence[int] | None = None) -> None:
        """Start over (a new model became active): learn a new baseline, or use ``baseline``."""
        if baseline is not None and len(baseline) != self.bins:
            raise DriftError(f"baseline has {len(baseline)} bins but the monitor uses {self.bins}")
        with self._lock:
            self._fixed_baseline = tuple(baseline) if baseline is not None else None
            self._init_baseline()

    @property
    def baseline_counts(self) -> tuple[int, ...] | None:
        """The baseline histogram once complete (store it to reuse after a restart)."""
        with self._lock:
            return self._baseline.counts if self._baseline_done else None

    @property
    def recent_counts(self) -> tuple[int, ...]:
        with self._lock:
            return self._recent.counts

    def psi(self) -> float | None:
        """PSI of the recent window against the baseline; None while either is too small."""
        with self._lock:
            if not self._baseline_done or len(self._recent_bins) < self.min_samples:
                return None
            expected, actual = self._baseline.counts, self._recent.counts
        if sum(expected) == 0:
            return None
        return psi(expected, actual)


BASELINE_SCHEMA = 1


class StreamDrift:
    """The drift KPI of one stream, as a pipeline frame observer.

    Follows the active model: when frames come from another ``name@version`` the monitor
    starts over with that model's baseline — the one stored in ``baseline_path`` for it, or a
    new one learned from its first ``baseline_size`` detections and then stored (temp file +
    fsync + rename, by the inference thread once per learned baseline). A restart with the
    same model therefore keeps comparing against the same baseline.
    """

    def __init__(self, *, baseline_path: Path, window: int, baseline_size: int) -> None:
        self._path = baseline_path
        self._window = window
        self._baseline_size = baseline_size
        self._model: str | None = None
        self._stored = False
        self._monitor = DriftMonitor(window=window, baseline_size=baseline_size)

    # -- FrameObserver (inference thread) ------------------------------------------------

    def frame(self, model: str, infer_ms: float, scores: Sequence[float]) -> None:
        if model != self._model:
            self._switch(model)
        self._monitor.observe(scores)
        if not self._stored:
            counts = self._monitor.baseline_counts
            if counts is not None:
                self._store(model, counts)

    def error(self, model: str) -> None:
        pass

    # -- readers -------------------------------------------------------------------------

    def psi(self) -> float | None:
        value = self._monitor.psi()
        return None if value is None else round(value, 4)

    # -- internals -----------------------------------------------------------------------

    def _switch(self, model: str) -> None:
        self._model = model
        baseline = self._load(model)
        self._stored = baseline is not None
        self._monitor.reset(baseline)

    def _load(self, model: str) -> tuple[int, ...] | None:
        try:
            raw = read_json_state(
                self._path,
                schema=BASELINE_SCHEMA,
                what="drift baseline",
                fix=f"delete {self._path}; the agent learns a new baseline",
            )
        except StateFileError as err:
            log.warning("%s; learning a new baseline", err)
            return None
        if raw is None or raw.get("model") != model:
            return None
        counts = raw.get("counts")
        if (
            not isinstance(counts, list)
            or len(counts) != self._monitor.bins
            or not all(isinstance(c, int) and c >= 0 for c in counts)
            or sum(counts) == 0
        ):
            log.warning("drift baseline %s is malformed; learning a new one", self._path)
            return None
        return tuple(counts)

    def _store(self, model: str, counts: tuple[int, ...]) -> None:
        self._stored = True
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                self._path, schema=BASELINE_SCHEMA, data={"model": model, "counts": list(counts)}
            )
        except OSError as err:
            log.warning("cannot store the drift baseline in %s: %s", self._path, err)
