"""Exponential backoff with jitter for reconnect loops (cameras, brokers, downloads)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that grow ``min_s, min_s·factor, min_s·factor², …`` up to ``max_s``, with jitter.

    The n-th delay (0-based, counted since the last :meth:`reset`) is drawn uniformly from
    ``[d·(1 − jitter), d]`` where ``d = min(max_s, min_s·factorⁿ)``: ``jitter=0`` gives the plain
    exponential sequence, ``jitter=1`` "full jitter" (anywhere in ``[0, d]``), the default 0.5 keeps
    at least half of ``d`` so a dead camera is not hammered while a fleet of agents still spreads
    out its retries. Pure: pass a seeded ``random.Random`` for reproducible delays.
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"need 0 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        self.min_s = min_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempts = 0
        self._ceiling = min_s

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempts

    def next(self) -> float:
        """The next delay in seconds; each call grows the ceiling until ``max_s``."""
        ceiling = self._ceiling
        self._attempts += 1
        # Grow by multiplication (not factor**n) so the ceiling never overflows.
        self._ceiling = min(self.max_s, ceiling * self.factor)
        return ceiling * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again at ``min_s`` (after a success)."""
        self._attempts = 0
        self._ceiling = self.min_s
