"""Local HTTP inference benchmark: POST /detect vs raw invoke(), with and without a camera.

In this process: the agent's HTTP endpoint (agent.http_api, real sockets) serving the INT8
BlazeFace, the raw ``invoke()`` rate of the same model, and optionally a camera stream
beside them (the shipped 640x480 video played at its 15 fps through the agent's own
FrameSource + StreamPipeline, publishing to a local Mosquitto). The HTTP clients run in
other processes (spawned, one persistent connection each) so their CPU time and GIL are
not the server's; each posts a 640x480 JPEG frame of the video with a face, as fast as it
is answered (at normal priority, on the same cores: local clients cost CPU too). It prints
requests/s, p50/p95 latency, refusals (503) and the camera's frame rate per case; ``x raw``
is requests/s over the raw invoke() rate measured just before, beside the same camera (or
none). ``--niceness 10,0`` compares the HTTP threads' priority. Run:
`.venv/bin/python -m bench.http` (about a minute per niceness).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2

from agent import http_infer
from agent.app import tune_process
from agent.config import HttpConfig, StreamConfig
from agent.http_api import HttpApi
from agent.http_infer import ServedModel
from agent.pipeline import StreamPipeline
from agent.sources import FrameSource
from bench.pipeline import bench_publisher, raw_invoke
from inference import ASSETS_DIR
from inference.detector import load_detector
from tests.broker import Mosquitto

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"
MANIFEST = ASSETS_DIR / "blazeface-short-int8.json"


def frame_jpeg() -> bytes:
    cap = cv2.VideoCapture(str(VIDEO))
    ok, image = cap.read()  # frame 0 shows a face
    cap.release()
    assert ok
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def client(port: int, body: bytes, start_at: float, seconds: float) -> list[tuple[int, float]]:
    """Post ``body`` until ``start_at + seconds``; (status, latency ms) per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "image/jpeg"}
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    while time.time() < start_at + seconds:
        t0 = time.perf_counter()
        conn.request("POST", "/detect", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        out.append((resp.status, (time.perf_counter() - t0) * 1000))
        if resp.status == 503:
            conn.close()  # a refused body is not read: the server closes
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            time.sleep(0.01)
    conn.close()
    return out


def served() -> list[ServedModel]:
    return [
        ServedModel(
            stream="bench",
            ref="blazeface-short-int8@1.0.0",
            manifest_path=MANIFEST,
            backend="litert",
            min_score=0.5,
            labels=frozenset(),
            model_labels=("face",),
            input_size=(128, 128),
        )
    ]


@contextmanager
def endpoint(max_queue: int, max_concurrency: int) -> Iterator[int]:
    config = HttpConfig(enabled=True, port=0, max_queue=max_queue, max_concurrency=max_concurrency)
    api = HttpApi(config, device_id="bench", catalog=served, token=None, streams=["bench"])
    api.start()
    try:
        yield api.port
    finally:
        api.stop()


@contextmanager
def camera(port: int, workdir: Path) -> Iterator[StreamPipeline]:
    """The daemon's stream parts on the shipped video at its 15 fps."""
    detector = load_detector(MANIFEST, threads=1)
    publisher = bench_publisher(port, workdir)
    source = FrameSource(name="cam", uri=str(VIDEO), loop=True, realtime=True)
    counter = iter(range(1 << 62))
    pipeline = StreamPipeline(
        device_id="bench",
        config=StreamConfig(name="cam", source=str(VIDEO), model=str(MANIFEST)),
        source=source,
        detector=detector,
        publish=publisher.publish_detections,
        next_seq=lambda: next(counter),
    )
    pipeline.start()
    source.start()
    try:
        while pipeline.stats.frames_processed < 15:
            time.sleep(0.05)
        yield pipeline
    finally:
        source.stop()
        pipeline.stop()
        publisher.close(final_status=None, timeout=5)
        detector.close()


def fps(pipeline: StreamPipeline | None, seconds: float) -> float | None:
    if pipeline is None:
        return None
    before = pipeline.stats.frames_processed
    time.sleep(seconds)
    return (pipeline.stats.frames_processed - before) / seconds


def http_case(
    pool: ProcessPoolExecutor,
    clients: int,
    body: bytes,
    seconds: float,
    max_concurrency: int,
    pipeline: StreamPipeline | None,
) -> dict[str, float | None]:
    with endpoint(max_queue=4, max_concurrency=max_concurrency) as port:
        client(port, body, time.time(), 0.5)  # warm: the model copy is loaded
        start_at = time.time() + 0.5
        futures = [pool.submit(client, port, body, start_at, seconds) for _ in range(clients)]
        time.sleep(max(0.0, start_at - time.time()) + 0.5)
        rate = fps(pipeline, seconds - 1.0)
        results = [r for f in futures for r in f.result()]
    ok = sorted(ms for status, ms in results if status == 200)
    return {
        "req_s": len(ok) / seconds,
        "p50": statistics.median(ok) if ok else float("nan"),
        "p95": ok[int(0.95 * (len(ok) - 1))] if ok else float("nan"),
        "refused": sum(1 for status, _ in results if status == 503),
        "fps": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per HTTP case")
    parser.add_argument("--frames", type=int, default=2000, help="raw invoke() calls per case")
    parser.add_argument(
        "--niceness",
        default="10",
        help="comma-separated HTTP thread niceness values to compare (the agent uses 10)",
    )
    args = parser.parse_args()
    tune_process()
    body = frame_jpeg()
    spawn = multiprocessing.get_context("spawn")
    rows: list[tuple[str, str, dict[str, float | None]]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Mosquitto(Path(tmp) / "broker") as broker,
        ProcessPoolExecutor(max_workers=8, mp_context=spawn) as pool,
    ):
        list(pool.map(time.sleep, [0.0] * 8))  # the client processes are up
        for niceness, with_camera in itertools.product(
            [int(n) for n in args.niceness.split(",")], (False, True)
        ):
            http_infer.HTTP_NICENESS = niceness
            ctx = camera(broker.port, Path(tmp)) if with_camera else _nothing()
            with ctx as pipeline:
                label = f"{'camera' if with_camera else 'no camera'}, nice {niceness}"
                quiet = fps(pipeline, 3.0)
                detector = load_detector(MANIFEST, threads=1)
                raw = raw_invoke(detector, args.frames)
                detector.close()
                rows.append(
                    (label, "raw invoke()", {"req_s": raw, "p50": 1000 / raw, "fps": quiet})
                )
                for clients, conc in ((1, 1), (4, 1), (4, 2), (8, 1)):
                    case = http_case(pool, clients, body, args.seconds, conc, pipeline)
                    rows.append((label, f"HTTP {clients} client(s), {conc} thread(s)", case))
    print(
        f"\nINT8 BlazeFace, 640x480 JPEG per request, {args.seconds:.0f} s per case, "
        "max_queue 4; 'camera fps': the stream beside it (quiet before the raw case)\n"
    )
    head = f"{'':18} {'case':31} {'req/s':>8} {'x raw':>6} {'p50 ms':>7} {'p95 ms':>7} {'503':>5} {'camera fps':>10}"
    print(head)
    print("-" * len(head))
    raw_rate = {label: r["req_s"] for label, case, r in rows if case == "raw invoke()"}
    for label, name, row in rows:
        req = float(row["req_s"] or 0.0)
        p95 = row.get("p95")
        camera_fps = row.get("fps")
        print(
            f"{label:18} {name:31} {req:8.1f} {req / float(raw_rate[label] or 1):6.3f} "
            f"{float(row['p50'] or 0):7.2f} "
            f"{'' if p95 is None else f'{p95:.2f}':>7} "
            f"{'' if 'refused' not in row else int(row['refused'] or 0):>5} "
            f"{'' if camera_fps is None else f'{camera_fps:.1f}':>10}"
        )


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
