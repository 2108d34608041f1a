"""Hot-swap benchmark: frames dropped/lost and end-to-end latency during an OTA update.

One process runs the agent's real pieces: a FrameSource on the shipped video, the stream
pipeline with the INT8 BlazeFace, and the OTA manager deploying signed bundles (served over
HTTP on loopback) with a 1 s probation and the default health gate. Each round measures a
steady window, then a full update (download, verify, staging next to the live model, the
shadow phase where the candidate runs beside it on sampled frames, swap, probation) and the
frames right around the swap; it prints the numbers and the ratios against steady state,
and the shadow phase's own cost: frames dropped, the active stream's p99 against steady
state, and the process CPU (cores) during the shadow against steady state.

Two modes: ``camera`` (the file paced at its 15 fps, newest frame wins: a slow frame drops
the next one) and ``max-rate`` (as fast as possible through a lossless queue: a lost frame
would be a gap in ``frame_index``). Latency is capture → published (the detections message
handed to the publisher). Run: `make bench` or `.venv/bin/python -m bench.swap`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.app import tune_process
from agent.config import OtaConfig
from agent.ota.manager import OtaManager
from agent.pipeline import StreamPipeline
from agent.sources import FrameSource
from bench.ota_rig import VIDEO, ota_stream
from inference import ASSETS_DIR
from inference.detector import load_detector
from protocol import SCHEMA_VERSION, Desired, Detections, Event, ModelRef, decode, encode
from tests.bundle_factory import (
    blazeface_files,
    blazeface_manifest,
    build_bundle,
    sign,
    with_files,
)
from tests.range_server import RangeServerState, range_server

BASELINE = ASSETS_DIR / "blazeface-short-int8.json"


@dataclass(frozen=True)
class Published:
    at: float
    frame: Detections


@dataclass(frozen=True)
class Window:
    frames: int
    dropped: int
    lost: int
    """Gaps in frame_index among the published frames."""
    p50: float
    p99: float
    seconds: float
    cpu: float = 0.0
    """Process CPU seconds used in the window."""


def golden_frame() -> tuple[bytes, list[object]]:
    """A video frame with a face as the golden sample, with what the model finds on it."""
    cap = cv2.VideoCapture(str(VIDEO))
    for _ in range(10):
        ok, image = cap.read()
    cap.release()
    assert ok
    with load_detector(BASELINE) as detector:
        found = detector.detect(image).detections
    ok, png = cv2.imencode(".png", image)
    assert ok
    expected = [[d.label, d.score, list(d.box)] for d in found]
    return png.tobytes(), [{"image": "golden/frame.png", "expected": expected}]


def make_ref(
    tmp: Path, key: Ed25519PrivateKey, version: str, url: str, png: bytes, golden: list[object]
) -> tuple[ModelRef, bytes]:
    files = {**blazeface_files(), "golden/frame.png": png}
    manifest = blazeface_manifest(version=version, golden=golden, latency_budget_ms=10_000.0)
    path = build_bundle(tmp / f"{version}.efb", manifest, files, key=key)
    data = path.read_bytes()
    ref = ModelRef(
        name=manifest.name,
        version=version,
        url=url,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signature=sign(with_files(manifest, files), key),
    )
    return ref, data


Marks = list[tuple[str, float, float]]
"""(event code, wall time, process CPU time) of each OTA event."""


@contextmanager
def running(
    realtime: bool, tmp: Path, key: Ed25519PrivateKey, marks: Marks
) -> Iterator[tuple[StreamPipeline, FrameSource, OtaManager, list[Published]]]:
    published: list[Published] = []
    lock = threading.Lock()

    def event(payload: bytes) -> None:
        marks.append((decode(payload, Event).code, time.time(), time.process_time()))

    def publish(_topic: str, payload: bytes) -> None:
        now = time.time()
        with lock:
            published.append(Published(now, decode(payload, Detections)))

    with ota_stream(
        tmp,
        key,
        name="bench",
        baseline=BASELINE,
        realtime=realtime,
        config=OtaConfig(probation_s=1.0, golden_latency_runs=10),
        publish=publish,
        publish_event=event,
    ) as (pipeline, source, manager):
        yield pipeline, source, manager, published


def _drops_at_events(marks: Marks, source: FrameSource, out: dict[str, int]) -> None:
    """Record the source's dropped-frame count when the shadow phase starts and ends."""
    deadline = time.time() + 120
    while time.time() < deadline and len(out) < 2:
        codes = {m[0] for m in marks}
        for code in ("ota.shadow", "ota.switching"):
            if code in codes and code not in out:
                out[code] = source.stats().frames_dropped
        time.sleep(0.005)


def measure(
    published: list[Published], start: float, end: float, dropped: int, *, cpu: float = 0.0
) -> Window:
    picked = [p for p in published if start <= p.at <= end]
    latencies = [(p.at - p.frame.frame_ts) * 1000.0 for p in picked]
    indices = [p.frame.frame_index for p in picked]
    lost = sum(b - a - 1 for a, b in itertools.pairwise(indices) if b > a + 1)
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    return Window(len(picked), dropped, lost, float(p50), float(p99), end - start, cpu)


def rounds(mode: str, n: int, steady_s: float) -> dict[str, list[Window]]:
    realtime = mode == "camera"
    key = Ed25519PrivateKey.generate()
    out: dict[str, list[Window]] = {"steady": [], "update": [], "swap": [], "shadow": []}
    marks: Marks = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        png, golden = golden_frame()
        state = RangeServerState(body=b"")
        with (
            range_server(state) as url,
            running(realtime, tmp, key, marks) as (_, source, manager, published),
        ):
            time.sleep(1.0)  # warm up
            for i in range(n):
                ref, body = make_ref(tmp, key, f"2.0.{i}", url, png, golden)
                state.body = body
                t0, d0, c0 = time.time(), source.stats().frames_dropped, time.process_time()
                time.sleep(steady_s)
                t1, d1, c1 = time.time(), source.stats().frames_dropped, time.process_time()
                out["steady"].append(measure(published, t0, t1, d1 - d0, cpu=c1 - c0))
                del marks[:]
                dropped_at: dict[str, int] = {}
                watch = threading.Thread(
                    target=_drops_at_events, args=(marks, source, dropped_at), daemon=True
                )
                watch.start()
                manager.handle_desired(
                    encode(Desired(schema=SCHEMA_VERSION, rev=i + 1, models={"bench": ref}))
                )
                time.sleep(0.02)
                assert manager.wait_idle(60)
                t2, d2 = time.time(), source.stats().frames_dropped
                phase = manager.updaters["bench"].state.phase
                assert phase == "committed", phase
                out["update"].append(measure(published, t1, t2, d2 - d1))
                watch.join()
                (_, s0, sc0), (_, s1, sc1) = (
                    next(m for m in marks if m[0] == code)
                    for code in ("ota.shadow", "ota.switching")
                )
                shadow_dropped = dropped_at["ota.switching"] - dropped_at["ota.shadow"]
                out["shadow"].append(measure(published, s0, s1, shadow_dropped, cpu=sc1 - sc0))
                # The frames around the swap: 10 before and 10 after the first of the new model.
                new = f"{ref.name}@{ref.version}"
                at = next(j for j, p in enumerate(published) if p.frame.model == new)
                near = published[max(0, at - 10) : at + 10]
                out["swap"].append(measure(near, near[0].at, near[-1].at, 0))
                time.sleep(0.2)
    return out


def _row(name: str, windows: list[Window], base: Window | None) -> str:
    frames = sum(w.frames for w in windows)
    dropped = sum(w.dropped for w in windows)
    lost = sum(w.lost for w in windows)
    p50 = statistics.median(w.p50 for w in windows)
    p99 = statistics.median(w.p99 for w in windows)
    seconds = sum(w.seconds for w in windows)
    fps = f"{frames / seconds:8.1f}" if name != "around the swap" and seconds > 0 else "       -"
    text = f"  {name:18s} {frames:7d} {fps} {dropped:8d} {lost:6d} {p50:8.2f} {p99:8.2f}"
    if base is not None:
        text += f"   p50 {p50 / base.p50:4.2f}x  p99 {p99 / base.p99:4.2f}x"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steady-s", type=float, default=3.0)
    parser.add_argument("--mode", choices=["camera", "max-rate", "both"], default="both")
    args = parser.parse_args()
    tune_process()
    modes = ["camera", "max-rate"] if args.mode == "both" else [args.mode]
    for mode in modes:
        result = rounds(mode, args.rounds, args.steady_s)
        steady = result["steady"]
        base = Window(
            0,
            0,
            0,
            statistics.median(w.p50 for w in steady),
            statistics.median(w.p99 for w in steady),
            0,
            0,
        )
        what = (
            "file paced at 15 fps, newest frame wins"
            if mode == "camera"
            else "as fast as possible, lossless queue"
        )
        print(
            f"\nhot swap, {mode} ({what}); {args.rounds} updates with the default gate and 1 s probation, medians of rounds"
        )
        print("  window              frames      fps  dropped   lost   p50 ms   p99 ms")
        print(_row("steady", steady, None))
        print(_row("during the update", result["update"], base))
        print(_row("around the swap", result["swap"], base))
        print(_row("shadow phase", result["shadow"], base))
        cores = statistics.median(w.cpu / w.seconds for w in steady)
        shadow_cores = statistics.median(w.cpu / w.seconds for w in result["shadow"])
        shadow_s = statistics.median(w.seconds for w in result["shadow"])
        print(
            f"  process CPU: steady {cores:.3f} cores, shadow phase {shadow_cores:.3f} cores "
            f"({shadow_cores / cores:.2f}x; the shadow adds {shadow_cores - cores:+.3f} cores); "
            f"shadow phase lasted {shadow_s:.1f} s (median)"
        )


if __name__ == "__main__":
    main()
