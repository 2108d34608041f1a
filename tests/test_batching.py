"""Cross-stream batching: a batch gives the detections of separate calls, on the real daemon too."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.batching import BatchGroup
from inference.batching import BatchedModel, batch_sizes, find_layout
from inference.detector import load_detector
from protocol import Detection, Detections, decode
from tests.agent_proc import VIDEO, start_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.video_files import shipped_frames

ASSETS = Path(__file__).resolve().parent.parent / "inference" / "assets"


def test_batch_sizes_are_the_group_size_and_powers_of_two() -> None:
    assert batch_sizes(2) == (2,)
    assert batch_sizes(3) == (3, 2)
    assert batch_sizes(8) == (8, 4, 2)
    assert batch_sizes(12) == (12, 8, 4, 2)


def test_find_layout_of_a_plain_batch_and_of_segments() -> None:
    rng = np.random.default_rng(1)
    singles = [rng.integers(0, 255, size=(1, 6, 2)) for _ in range(3)]
    plain = np.concatenate(singles)  # [3, 6, 2]: a plain batch dimension
    index = find_layout(singles, plain)
    assert index is not None
    assert index.tolist() == [list(range(6)), list(range(6, 12)), list(range(12, 18))]
    # Two segments (4 + 2 rows), each batch-major, like BlazeFace's two feature maps.
    segmented = np.concatenate([s[0, :4] for s in singles] + [s[0, 4:] for s in singles])[None]
    index = find_layout(singles, segmented)
    assert index is not None
    rows = segmented[0]
    for i, single in enumerate(singles):
        assert np.array_equal(rows[index[i]], single[0])
    shuffled = segmented[:, ::-1]
    assert find_layout(singles, shuffled) is None


@pytest.mark.parametrize("model", ["int8", "fp16"])
def test_a_batch_gives_the_detections_of_separate_calls(model: str) -> None:
    manifest = ASSETS / f"blazeface-short-{model}.json"
    frames = shipped_frames(150)[::10]  # faces and the empty scene
    with load_detector(manifest) as separate, load_detector(manifest) as own:
        batched = BatchedModel(own, max_batch=8)
        try:
            prepared = [separate.preprocess(f) for f in frames]
            expected = [separate.infer(p).detections for p in prepared]
            assert batched.sizes == (8, 4, 2)
            assert not batched.supports(3), "3 frames run as 2 + 1"
            for size in (2, 3, 7, 8):
                for start in range(0, len(prepared) - size + 1, size):
                    got = batched.infer(prepared[start : start + size])
                    assert [r.detections for r in got] == expected[start : start + size]
            assert sum(1 for e in expected if e) >= 5, "the frames hold faces"
            timing = batched.measure(4, runs=3)
            assert timing is not None and timing.batch_ms > 0 and timing.separate_ms > 0
        finally:
            batched.close()


def test_a_model_without_a_batch_dimension_runs_separately() -> None:
    """The shipped ONNX export has a fixed batch of 1: no batch, separate calls instead."""
    pytest.importorskip("onnxruntime")
    with load_detector(ASSETS / "blazeface-short-onnx.json") as detector:
        batched = BatchedModel(detector, max_batch=4)
        assert not batched.supports(2)
        assert batched.measure(2) is None
        frames = shipped_frames(3)
        results = batched.infer([detector.preprocess(f) for f in frames])
        assert [len(r.detections) for r in results] == [1, 1, 1]


@pytest.mark.slow
def test_the_daemon_batches_streams_with_the_detections_of_separate_calls(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/detections/#"])
    names = ("a", "b", "c")
    streams = "".join(stream_block(n, source=str(VIDEO), realtime=True, loop=False) for n in names)
    config = write_config(
        tmp_path, port=mosquitto.port, streams=streams, extra='[batching]\nmode = "always"\n'
    )
    log = tmp_path / "agent.log"
    proc = start_agent(config, log)
    try:
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    measured = re.search(r"per frame in a batch of 3 vs [\d.]+ ms in separate calls; batched", text)
    assert measured, text[-3000:]
    ran = re.search(r"blazeface-short-int8@1.0.0 ran (\d+) batched invokes", text)
    assert ran and int(ran.group(1)) >= 50, text[-3000:]
    sub.wait_for(lambda ms: len(ms) >= 300)
    sub.close()
    frames = shipped_frames(150)
    with load_detector(ASSETS / "blazeface-short-int8.json") as detector:
        expected = [detector.detect(f).detections for f in frames]
    for name in names:
        got = [decode(m.payload, Detections) for m in sub.messages if m.topic.endswith(f"/{name}")]
        assert len(got) >= 140, f"stream {name}: {len(got)} frames"
        for message in got:
            assert message.detections == expected[message.frame_index], message.frame_index


def test_a_batch_group_batches_waiting_streams_and_does_not_wait_for_one_that_left() -> None:
    manifest = ASSETS / "blazeface-short-int8.json"
    frames = shipped_frames(90)[::10]
    with load_detector(manifest) as stream_detector:
        prepared = [stream_detector.preprocess(f) for f in frames]
        expected = [stream_detector.infer(p).detections for p in prepared]
        group = BatchGroup(
            BatchedModel(load_detector(manifest), max_batch=3),
            ["a", "b", "c"],
            max_wait_s=5.0,
        )
        try:
            results: dict[str, list[list[Detection]]] = {}

            def stream(name: str, offset: int) -> None:
                got: list[list[Detection]] = []
                for p in prepared[offset::3]:
                    result = group.infer(name, stream_detector, p)
                    assert result is not None
                    got.append(result.detections)
                results[name] = got

            threads = [threading.Thread(target=stream, args=(n, i)) for i, n in enumerate("abc")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            for i, name in enumerate("abc"):
                assert results[name] == expected[i::3]
            assert group.batches == 3, "every tick ran as one batch of three"
            group.leave("b")
            group.leave("c")
            started = time.monotonic()
            alone = group.infer("a", stream_detector, prepared[0])
            assert alone is not None and alone.detections == expected[0]
            assert time.monotonic() - started < 1.0, "no wait for streams that left"
            other = load_detector(ASSETS / "blazeface-short-fp16.json")
            try:
                assert group.infer("a", other, other.preprocess(frames[0])) is None
            finally:
                other.close()
        finally:
            group.close()
