"""Health-gate benchmark: false rollbacks and missed bad models, repeated, under host load.

One process runs the agent's real pieces (a FrameSource on the shipped video at its 15 fps,
the stream pipeline, the OTA manager with the daemon's ``build_services`` and the default
``[ota]`` gate settings) while another process keeps one core busy. Each round deploys a
signed bundle over loopback HTTP and records the outcome, then goes back to the baseline:

- good: the shipped INT8 over the shipped fp16 (``int8-over-fp16``), and the shipped INT8
  bytes under a new version over themselves (``same-bytes``): each must be committed;
- bad (each must be refused before it publishes a detection): ``blind`` (passes its golden
  sample without a face, never detects on the video), ``shifted`` (boxes moved by half a box)
  and ``slow`` (10x the inference time, spent computing), both faults injected into the loaded
  candidate, ``nan`` (NaN outputs) and ``garbage`` (does not load).

Run: ``.venv/bin/python -m bench.gate --rounds 10`` (``--probation-s`` shortens the probation,
60 s by default, to fit a session; the shadow phase is unchanged).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.app import tune_process
from agent.config import OtaConfig
from bench.ota_rig import ota_stream
from inference import ASSETS_DIR
from inference.detector import Detector, InferenceResult, Prepared, load_detector
from protocol import SCHEMA_VERSION, Desired, Detection, Detections, decode, encode
from tests.ota_support import make_bundle
from tests.range_server import RangeServerState, range_server

FP16 = ASSETS_DIR / "blazeface-short-fp16.json"
INT8 = ASSETS_DIR / "blazeface-short-int8.json"
GOOD = {"int8-over-fp16": FP16, "same-bytes": INT8}
BAD = ("blind", "shifted", "slow", "nan", "garbage")


def _shifted(detector: Detector) -> None:
    infer = detector.infer

    def run(prepared: Prepared, *, min_score: float | None = None) -> InferenceResult:
        result = infer(prepared, min_score=min_score)
        moved = [
            Detection(
                label=d.label,
                score=d.score,
                box=(
                    d.box[0] + (d.box[2] - d.box[0]) / 2,
                    d.box[1],
                    d.box[2] + (d.box[2] - d.box[0]) / 2,
                    d.box[3],
                ),
            )
            for d in result.detections
        ]
        return dataclasses.replace(result, detections=moved)

    detector.infer = run  # type: ignore[method-assign]


def _slow(detector: Detector) -> None:
    invoke = detector.backend.invoke

    def run() -> None:  # nine more invokes' worth of computing (the gate times CPU, not sleep)
        start = time.perf_counter()
        invoke()
        end = time.perf_counter() + 9 * (time.perf_counter() - start)
        while time.perf_counter() < end:
            pass

    detector.backend.invoke = run  # type: ignore[method-assign]


FAULTS: dict[str, Callable[[Detector], None]] = {"shifted": _shifted, "slow": _slow}


def run_case(case: str, rounds: int, probation_s: float, tmp: Path) -> Counter[str]:
    baseline = GOOD.get(case, FP16)
    key = Ed25519PrivateKey.generate()
    published: Counter[str] = Counter()

    def publish(_topic: str, payload: bytes) -> None:
        published[decode(payload, Detections).model] += 1

    fault = FAULTS.get(case)

    def load(path: Path) -> Detector:
        detector = load_detector(path)
        if fault is not None and detector.manifest_path != baseline:
            fault(detector)
        return detector

    outcomes: Counter[str] = Counter()
    kind = {"blind": "live_blind", "nan": "nan", "garbage": "garbage"}.get(case, "good")
    state = RangeServerState(body=b"")
    with (
        range_server(state) as url,
        ota_stream(
            tmp / case,
            key,
            name="front",
            baseline=baseline,
            realtime=True,
            config=OtaConfig(probation_s=probation_s),
            publish=publish,
            load=load,
        ) as (_, _, manager),
    ):
        time.sleep(2.0)
        rev = 0
        for i in range(rounds):
            extra: dict[str, object] = {"golden": []} if case in FAULTS else {}
            bundle = make_bundle(
                tmp / case / f"{i}.efb", key, version=f"2.0.{i}", kind=kind, **extra
            )
            state.body = bundle.body
            rev += 1
            start = time.monotonic()
            desired = Desired(schema=SCHEMA_VERSION, rev=rev, models={"front": bundle.at(url)})
            manager.handle_desired(encode(desired))
            time.sleep(0.05)
            assert manager.wait_idle(600)
            got = manager.updaters["front"].state
            gate = got.gate
            leaked = published[bundle.name]
            label = f"{got.phase}:{got.reason}" if got.reason else got.phase
            outcomes[label + (" (published!)" if leaked and case in BAD else "")] += 1
            evidence = gate.summary if gate is not None else "-"
            print(
                f"  {case:15s} round {i + 1:2d}: {label:28s} {time.monotonic() - start:5.1f} s"
                f"  {evidence}",
                flush=True,
            )
            if got.phase == "committed":
                rev += 1
                back = Desired(schema=SCHEMA_VERSION, rev=rev, models={})
                manager.handle_desired(encode(back))
                time.sleep(0.05)
                assert manager.wait_idle(60)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--probation-s", type=float, default=60.0)
    parser.add_argument("--cases", default=",".join([*GOOD, *BAD]))
    args = parser.parse_args()
    tune_process()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    results: dict[str, Counter[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            for case in args.cases.split(","):
                (Path(tmpdir) / case).mkdir()
                results[case] = run_case(case, args.rounds, args.probation_s, Path(tmpdir))
    finally:
        busy.kill()
        busy.wait()
    print(f"\nhealth gate, {args.rounds} rounds per case, one core kept busy by another process")
    false_rollbacks = missed = 0
    for case, outcomes in results.items():
        good = case in GOOD
        wrong = sum(
            n
            for label, n in outcomes.items()
            if (label != "committed") == good or "published" in label
        )
        if good:
            false_rollbacks += wrong
        else:
            missed += wrong
        print(f"  {case:15s} {dict(outcomes)}")
    print(f"  false rollbacks of good models: {false_rollbacks}; missed bad models: {missed}")


if __name__ == "__main__":
    main()
