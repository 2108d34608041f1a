"""The canary health comparison (docs/ota.md, "Rollouts", "Health comparison"): pure functions.

Difference in differences. Each updated device (canary) is compared with itself: its
telemetry after its change point (since its execution succeeded) against a window before
it was assigned. The devices not yet updated (controls) get the same before/after
comparison over the same calendar time (the canaries' median change point). The canaries'
median change divided by the controls' (a difference, for the error rate) is what the
"clearly worse" thresholds apply to, so anything that hits the whole fleet at once (a CPU
spike, a hot afternoon) cancels out.

The engine (``RolloutEngine._health_check``) reads the rows; everything here is pure.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Samples = Sequence[tuple[float, Sequence[Mapping[str, Any]]]]
"""One device's raw telemetry: (ts, streams), oldest first."""


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When updated devices count as "clearly worse" than devices not yet updated."""

    window_s: float = 300.0
    """Length of each window: before = the ``window_s`` before the assignment; after = since
    the device succeeded, at most the last ``window_s``."""
    min_samples: int = 3
    """Samples a device needs in *each* window (before and after) to count as evidence."""
    min_updated: int = 1
    min_control: int = 2
    """Devices with enough samples each side needs; fewer: not enough evidence (no abort)."""
    latency_ratio: float = 1.5
    latency_margin_ms: float = 1.0
    """Inference p95: worse when the canaries' change is at least ``latency_ratio`` times the
    controls' and that excess is at least ``latency_margin_ms`` (on the canaries' level before)."""
    fps_ratio: float = 0.67
    min_fps: float = 1.0
    """fps: worse when the canaries' change is at most ``fps_ratio`` times the controls'
    (fps compared only on devices that ran at least ``min_fps`` before)."""
    error_ratio: float = 2.0
    error_margin: float = 0.02
    """Errors per frame: worse when the canaries' rate after is at least ``error_ratio`` times
    and ``error_margin`` above their rate before moved by the controls' change (in points)."""
    max_devices: int = 200
    """Devices compared per side (the first by id), to bound the cost."""
    every_s: float = 5.0
    """How often a rollout is checked (and always before a stage advances)."""


@dataclass(frozen=True, slots=True)
class StreamHealth:
    latency_ms: float | None
    fps: float | None
    error_rate: float | None
    samples: int


def stream_health(
    samples: Samples,
    stream: str,
    *,
    since: float,
    until: float | None = None,
    min_samples: int,
) -> StreamHealth | None:
    """One device's health on one stream from its samples in ``[since, until)`` (None: open);
    None with fewer than ``min_samples`` samples there."""
    entries = [
        e
        for ts, streams in samples
        if ts >= since and (until is None or ts < until)
        for e in (streams if isinstance(streams, list) else ())
        if isinstance(e, Mapping) and e.get("name") == stream
    ]
    if len(entries) < min_samples:
        return None
    latencies = [v for e in entries if (v := _number(e, "infer_ms_p95")) is not None]
    fps = [v for e in entries if (v := _number(e, "fps")) is not None]
    errors = frames = 0.0
    for a, b in itertools.pairwise(entries):
        de = (_number(b, "errors") or 0.0) - (_number(a, "errors") or 0.0)
        df = (_number(b, "frames_processed") or 0.0) - (_number(a, "frames_processed") or 0.0)
        if de < 0 or df < 0:  # the agent restarted: its counters started again from zero
            de, df = _number(b, "errors") or 0.0, _number(b, "frames_processed") or 0.0
        errors += de
        frames += df
    return StreamHealth(
        latency_ms=statistics.median(latencies) if latencies else None,
        fps=statistics.median(fps) if fps else None,
        error_rate=errors / (frames + errors) if frames + errors > 0 else None,
        samples=len(entries),
    )


def _number(entry: Mapping[str, Any], key: str) -> float | None:
    """A finite number of a telemetry entry; None when absent or not one (a malformed
    sample in the database is no evidence, and one device's must not stop the check)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


# --- windows ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float | None
    """Exclusive; None: up to now."""


@dataclass(frozen=True, slots=True)
class ChangeWindows:
    """Before and after one change point (the deployment itself, assigned → succeeded, is in
    neither)."""

    before: Window
    after: Window


def change_windows(
    policy: HealthPolicy, *, assigned_at: float, done_at: float, now: float
) -> ChangeWindows:
    """A device assigned at ``assigned_at`` that succeeded at ``done_at``: before =
    ``[assigned_at - window_s, assigned_at)``, after = ``[max(done_at, now - window_s), now]``."""
    return ChangeWindows(
        before=Window(assigned_at - policy.window_s, assigned_at),
        after=Window(max(done_at, assigned_at, now - policy.window_s), None),
    )


def control_windows(
    policy: HealthPolicy, canaries: Sequence[tuple[float, float]], *, now: float
) -> ChangeWindows:
    """The controls' windows: those of the canaries' median change point, from their
    (assigned_at, done_at) pairs, so both sides are compared over the same calendar time."""
    return change_windows(
        policy,
        assigned_at=statistics.median(a for a, _ in canaries),
        done_at=statistics.median(d for _, d in canaries),
        now=now,
    )


def telemetry_queries(
    wanted: Iterable[tuple[str, ChangeWindows]],
) -> list[tuple[list[str], float, float | None]]:
    """What to read for these devices' windows: (device ids, since, until) per group of devices
    sharing a before window (one stage's assignment), so that a rollout whose first stage is
    long past does not read all the telemetry since then."""
    groups: dict[Window, dict[str, float]] = defaultdict(dict)
    for device_id, w in wanted:
        group = groups[w.before]
        group[device_id] = min(group.get(device_id, w.after.start), w.after.start)
    out: list[tuple[list[str], float, float | None]] = []
    for before, after in groups.items():
        ids = sorted(after)
        out.append((ids, before.start, before.end))
        out.append((ids, min(after.values()), None))
    return out


# --- the comparison -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """One device's stream before and after a change point."""

    before: StreamHealth
    after: StreamHealth


def device_change(
    samples: Samples, stream: str, windows: ChangeWindows, *, min_samples: int
) -> DeviceChange | None:
    """None unless the stream has ``min_samples`` samples in both windows."""
    before = stream_health(
        samples,
        stream,
        since=windows.before.start,
        until=windows.before.end,
        min_samples=min_samples,
    )
    after = stream_health(
        samples, stream, since=windows.after.start, until=windows.after.end, min_samples=min_samples
    )
    if before is None or after is None:
        return None
    return DeviceChange(before=before, after=after)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Literal["healthy", "regression", "insufficient"]
    """``insufficient``: not enough evidence yet; no abort, checked again later."""
    detail: str


def _ratios(
    changes: Sequence[DeviceChange], metric: Callable[[StreamHealth], float | None], floor: float
) -> list[tuple[float, float, float]]:
    """(before, after, after / before) of the devices that have the metric, before ≥ floor."""
    out = []
    for c in changes:
        b, a = metric(c.before), metric(c.after)
        if b is not None and a is not None and b > 0 and b >= floor:
            out.append((b, a, a / b))
    return out


def _medians(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Medians across devices of (before, after, after / before)."""
    before, after, ratio = zip(*rows, strict=True)
    return statistics.median(before), statistics.median(after), statistics.median(ratio)


def _devices(n: int) -> str:
    return "the device not updated" if n == 1 else f"the {n} devices not updated"


def judge(
    policy: HealthPolicy, canaries: Sequence[DeviceChange], controls: Sequence[DeviceChange]
) -> Verdict:
    """Difference in differences of the canaries' changes against the controls' (module doc)."""
    if len(canaries) < policy.min_updated or len(controls) < policy.min_control:
        return Verdict(
            "insufficient",
            f"not enough evidence: {len(canaries)} updated and {len(controls)} not updated "
            f"devices have {policy.min_samples} samples before and after the change "
            f"(need {policy.min_updated} and {policy.min_control})",
        )
    who = "canary" if len(canaries) == 1 else f"the {len(canaries)} updated devices'"
    same = "over the same window"
    worse = []
    lat_c = _ratios(canaries, lambda h: h.latency_ms, 0.0)
    lat_k = _ratios(controls, lambda h: h.latency_ms, 0.0)
    if lat_c and lat_k:
        (before, after, r_c), r_k = _medians(lat_c), _medians(lat_k)[2]
        if r_c >= r_k * policy.latency_ratio and before * (r_c - r_k) >= policy.latency_margin_ms:
            worse.append(
                f"{who} inference p95 rose {r_c:.1f}x after the update ({before:.1f} -> "
                f"{after:.1f} ms) while {_devices(len(lat_k))} changed {r_k:.1f}x {same}"
            )
    fps_c = _ratios(canaries, lambda h: h.fps, policy.min_fps)
    fps_k = _ratios(controls, lambda h: h.fps, policy.min_fps)
    if fps_c and fps_k:
        (before, after, r_c), r_k = _medians(fps_c), _medians(fps_k)[2]
        if r_c <= r_k * policy.fps_ratio:
            worse.append(
                f"{who} fps fell to {r_c:.2f}x after the update ({before:.1f} -> {after:.1f} "
                f"fps) while {_devices(len(fps_k))} changed {r_k:.2f}x {same}"
            )
    err_c = [
        (c.before.error_rate, c.after.error_rate)
        for c in canaries
        if c.before.error_rate is not None and c.after.error_rate is not None
    ]
    err_k = [
        c.after.error_rate - c.before.error_rate
        for c in controls
        if c.before.error_rate is not None and c.after.error_rate is not None
    ]
    if err_c and err_k:
        before = statistics.median(b for b, _ in err_c)
        d_c, d_k = statistics.median(a - b for b, a in err_c), statistics.median(err_k)
        expected, observed = max(0.0, before + d_k), before + d_c
        if observed >= expected * policy.error_ratio and observed - expected >= policy.error_margin:
            worse.append(
                f"{who} errors rose from {before * 100:.1f}% to {observed * 100:.1f}% of "
                f"frames after the update while {_devices(len(err_k))} changed "
                f"{d_k * 100:+.1f} points {same}"
            )
    if not worse:
        return Verdict(
            "healthy",
            f"{len(canaries)} updated against {len(controls)} not updated devices: no clear change",
        )
    return Verdict("regression", "; ".join(worse))
