"""Pipeline benchmark: raw invoke() vs a naive synchronous loop vs the agent pipeline.

All three run in this process, on the shipped video, against a local Mosquitto, for the
INT8 and fp16 BlazeFace models; rounds alternate so machine noise hits them alike. It
prints rates and ratios (agent / raw invoke, agent / naive) and the CPU time per frame
spent outside inference. Run: `make bench` or `.venv/bin/python -m bench.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.app import tune_process
from agent.config import BrokerConfig, StreamConfig
from agent.drift import StreamDrift
from agent.ota.health import HealthRecorder
from agent.pipeline import ObserverGroup, StreamPipeline
from agent.publisher import Publisher
from agent.sdnotify import ReadinessGate
from agent.sources import FrameSource
from agent.spool.queue import Spool
from inference import ASSETS_DIR
from inference.detector import Detector, load_detector
from tests.broker import Mosquitto

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"


def raw_invoke(detector: Detector, frames: int) -> float:
    cap = cv2.VideoCapture(str(VIDEO))
    _, image = cap.read()
    cap.release()
    backend = detector.backend
    backend.set_input(detector.preprocess(image).tensor)
    for _ in range(50):
        backend.invoke()
    start = time.perf_counter()
    for _ in range(frames):
        backend.invoke()
    return frames / (time.perf_counter() - start)


def naive_loop(detector: Detector, frames: int, port: int) -> float:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    cap = cv2.VideoCapture(str(VIDEO))
    start = time.perf_counter()
    infos = []
    for i in range(frames):
        ok, image = cap.read()
        if not ok:
            cap.release()
            cap = cv2.VideoCapture(str(VIDEO))
            ok, image = cap.read()
        result = detector.infer(detector.preprocess(image))
        payload = json.dumps(
            {
                "seq": i,
                "ts": time.time(),
                "detections": [
                    {"label": d.label, "score": d.score, "box": list(d.box)}
                    for d in result.detections
                ],
            }
        )
        infos.append(client.publish("bench/naive", payload, qos=1))
    elapsed = time.perf_counter() - start
    for info in infos[-10:]:
        info.wait_for_publish(5)
    cap.release()
    client.loop_stop()
    client.disconnect()
    return frames / elapsed


def bench_publisher(port: int, workdir: Path) -> Publisher:
    """The daemon's publisher (its own spool under ``workdir``) on the local broker, started."""
    spool = Spool(workdir / f"spool-{time.monotonic_ns()}", max_bytes=64 << 20)
    publisher = Publisher(
        device_id="bench",
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}"),
        spool=spool,
        will_payload=b'{"state":"offline"}',
    )
    publisher.start()
    return publisher


def agent_pipeline(
    manifest: Path, frames: int, port: int, workdir: Path
) -> tuple[float, float, float]:
    """Return (frames/s, CPU ms per frame for the whole process, mean invoke ms)."""
    threads = cv2.getNumThreads()
    tune_process()  # what the daemon does at start
    detector = load_detector(manifest, threads=1)
    publisher = bench_publisher(port, workdir)
    source = FrameSource(name="bench", uri=str(VIDEO), loop=True, realtime=False)
    config = StreamConfig(name="bench", source=str(VIDEO), model=str(manifest))
    counter = iter(range(1 << 62))
    # The frame observers the daemon attaches (OTA health, drift KPI, systemd readiness).
    observer = ObserverGroup(
        HealthRecorder(),
        StreamDrift(baseline_path=workdir / "drift.json", window=500, baseline_size=1000),
        ReadinessGate(["bench"], on_ready=lambda: None).observer("bench"),
    )
    pipeline = StreamPipeline(
        device_id="bench",
        config=config,
        source=source,
        detector=detector,
        publish=publisher.publish_detections,
        next_seq=lambda: next(counter),
        observer=observer,
    )
    pipeline.start()
    source.start()
    # Warm up, then measure a window of `frames` frames.
    while pipeline.stats.frames_processed < 100:
        time.sleep(0.01)
    first = pipeline.stats.snapshot()
    cpu0, t0 = time.process_time(), time.perf_counter()
    while pipeline.stats.frames_processed - first.frames_processed < frames:
        time.sleep(0.01)
    last = pipeline.stats.snapshot()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    count = last.frames_processed - first.frames_processed
    infer_ms = (last.infer_seconds_total - first.infer_seconds_total) * 1000 / count
    source.stop()
    pipeline.stop()
    publisher.close(final_status=None, timeout=5)
    detector.close()
    cv2.setNumThreads(threads)
    return count / elapsed, cpu * 1000 / count, infer_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        for name in ("blazeface-short-int8", "blazeface-short-fp16"):
            manifest = ASSETS_DIR / f"{name}.json"
            detector = load_detector(manifest, threads=1)
            raw, naive, agent, cpu, infer = [], [], [], [], []
            for _ in range(args.rounds):
                raw.append(raw_invoke(detector, args.frames))
                naive.append(naive_loop(detector, args.frames, broker.port))
                a, c, i = agent_pipeline(manifest, args.frames, broker.port, Path(tmp))
                agent.append(a)
                cpu.append(c)
                infer.append(i)
            detector.close()
            r, n, a = statistics.median(raw), statistics.median(naive), statistics.median(agent)
            c, i = statistics.median(cpu), statistics.median(infer)
            print(
                f"\n{name}  ({args.rounds} rounds x {args.frames} frames, medians, 1 inference thread)"
            )
            print(f"  raw invoke()      {r:8.0f} frames/s")
            print(f"  naive sync loop   {n:8.0f} frames/s   {n / r:5.2f}x raw")
            print(
                f"  agent pipeline    {a:8.0f} frames/s   {a / r:5.2f}x raw   {a / n:5.2f}x naive"
            )
            print(
                f"  agent CPU/frame   {c:8.3f} ms total, {i:.3f} ms in invoke, {c - i:.3f} ms outside inference"
            )


if __name__ == "__main__":
    main()
