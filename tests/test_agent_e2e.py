"""The agent daemon as a real subprocess against a real Mosquitto."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from protocol import Detections, Event, Status, Telemetry, decode
from tests.agent_proc import (
    REPO,
    VIDEO,
    agent_command,
    start_agent,
    stop_agent,
    stream_block,
    write_config,
)
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Received, Subscriber
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

SCHEMAS = REPO / "docs" / "protocol"
FACE_FRAMES = set(range(30)) | set(range(60, 90)) | set(range(120, 150))


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    doc = json.loads((SCHEMAS / f"{kind}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(doc)


def _log(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-4000:]


def test_agent_publishes_faces_on_face_segments_only(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"])
    config = write_config(tmp_path, port=mosquitto.port)
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        assert proc.wait(60) == 0, _log(tmp_path / "agent.log")
    finally:
        if proc.poll() is None:
            proc.kill()
    messages = sub.wait_for(
        lambda ms: any(m.topic.endswith("/status") and b'"offline"' in m.payload for m in ms)
    )
    sub.close()
    det_schema, status_schema = _validator("detections"), _validator("status")
    detections = [m for m in messages if "/detections/" in m.topic]
    for m in detections:
        det_schema.validate(json.loads(m.payload))
    frames = [decode(m.payload, Detections) for m in detections]
    assert [f.frame_index for f in frames] == list(range(150)), "every frame once, in order"
    seqs = [f.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + 150))
    for f in frames:
        has_face = any(d.label == "face" and d.score >= 0.5 for d in f.detections)
        assert has_face == (f.frame_index in FACE_FRAMES), f"frame {f.frame_index}: {f.detections}"
        assert f.model == "blazeface-short-int8@1.0.0"
        assert (f.width, f.height) == (640, 480)
    statuses = [decode(m.payload, Status) for m in messages if m.topic.endswith("/status")]
    for m in messages:
        if m.topic.endswith("/status"):
            status_schema.validate(json.loads(m.payload))
    states = [s.state for s in statuses]
    assert states[0] == "online" and states[-1] == "offline" and "stopping" in states
    assert statuses[0].facts["cpu_count"] == os.cpu_count()
    assert "litert" in str(statuses[0].facts["runtimes"]).split(",")


def test_agent_replays_spool_after_broker_outage_exactly_once_in_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/detections/+"])
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True)
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        sub.wait_for(lambda ms: len(ms) >= 20)
        mosquitto.stop()
        # The agent keeps inferring for several seconds with no broker: detections go to its spool.
        spool = tmp_path / "state" / "spool"
        wait_for(
            lambda: proc.poll() is None and _dir_bytes(spool) > 0,
            timeout=10,
            what="detections in the on-disk spool while the broker is down",
        )
        time.sleep(3)
        mosquitto.start()
        before = len(sub.messages)
        sub.wait_for(lambda ms: len(ms) >= before + 60, timeout=30)
        code, _ = stop_agent(proc)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.close()
    delivered, redelivered = _consume_by_seq(sub.messages)
    seqs = [d.seq for d in delivered]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), (
        f"gaps: {sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))[:20]}"
    )
    # QoS 1 is at-least-once: a PUBACK lost when the broker went down makes the agent send
    # that message again. Such a redelivery is byte-identical (never renumbered) and bounded
    # by the in-flight window; the documented consumer rule (drop a seq already seen) then
    # yields every seq exactly once, in order.
    assert len(redelivered) <= 100, f"{len(redelivered)} redeliveries: more than one window"


def _consume_by_seq(messages: list[Received]) -> tuple[list[Detections], list[Detections]]:
    """What a protocol consumer keeps (docs/protocol.md: drop a seq already seen)."""
    kept: list[Detections] = []
    again: list[Detections] = []
    payloads: dict[int, bytes] = {}
    for m in messages:
        d = decode(m.payload, Detections)
        if d.seq in payloads:
            assert payloads[d.seq] == m.payload, f"seq {d.seq} arrived twice with other content"
            again.append(d)
            continue
        assert not kept or d.seq > kept[-1].seq, f"seq {d.seq} arrived after {kept[-1].seq}"
        payloads[d.seq] = m.payload
        kept.append(d)
    return kept, again


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def test_telemetry_metrics_and_sigterm(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Telemetry flows and validates, /metrics serves live counters, SIGTERM exits 0 in < 5 s."""
    sub = Subscriber(
        mosquitto.port, ["edgefleet/v1/cam-01/status", "edgefleet/v1/cam-01/telemetry"]
    )
    metrics_port = free_port()
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True)
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=streams,
        telemetry_s=0.5,
        extra=f"[metrics]\nenabled = true\nport = {metrics_port}\n",
    )
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        msgs = sub.wait_for(
            lambda ms: any(
                m.topic.endswith("/telemetry")
                and b'"fps":0.0' not in m.payload
                and b'"source_state":"running"' in m.payload
                for m in ms
            )
        )
        raw_telemetry = [m.payload for m in msgs if m.topic.endswith("/telemetry")]
        validator = _validator("telemetry")
        for payload in raw_telemetry:
            validator.validate(json.loads(payload))
        telemetry = [decode(p, Telemetry) for p in raw_telemetry]
        live = [s for t in telemetry for s in t.streams if s.fps > 0]
        assert live[-1].infer_ms_p50 is not None
        assert live[-1].frames_processed > 0
        assert telemetry[-1].mem_used_bytes > 0
        assert telemetry[-1].disk_free_bytes > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        processed = re.search(
            r'edgefleet_stream_frames_processed_total\{stream="front"\} (\S+)', text
        )
        assert processed is not None, text[:2000]
        assert float(processed.group(1)) > 0
        assert "edgefleet_agent_mqtt_connected 1.0" in text
        code, took = stop_agent(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, _log(tmp_path / "agent.log")
    assert took < 5.0
    states = [decode(m.payload, Status).state for m in sub.on("/status")]
    assert states[-2:] == ["stopping", "offline"]
    sub.close()


def test_unreachable_camera_is_reported_and_other_streams_keep_running(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/#"])
    streams = stream_block("good", source=str(VIDEO), realtime=True, loop=True) + stream_block(
        "dead", source="rtsp://127.0.0.1:9/none"
    )
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    proc = start_agent(config, tmp_path / "agent.log")
    try:

        def dead_reported(ms: list[Received]) -> bool:
            for m in ms:
                if m.topic.endswith("/status"):
                    st = decode(m.payload, Status)
                    dead = [s for s in st.streams if s.name == "dead"]
                    if (
                        dead
                        and dead[0].source_state in ("reconnecting", "failed")
                        and dead[0].error
                    ):
                        return True
            return False

        msgs = sub.wait_for(dead_reported)
        sub.wait_for(lambda ms: sum("/detections/good" in m.topic for m in ms) >= 10)
        assert proc.poll() is None, "the agent died"
        sub.wait_for(
            lambda ms: any(
                m.topic.endswith("/events")
                and decode(m.payload, Event).stream == "dead"
                and decode(m.payload, Event).code.startswith("source.")
                for m in ms
            )
        )
        error = next(
            s.error
            for m in msgs
            if m.topic.endswith("/status")
            for s in decode(m.payload, Status).streams
            if s.name == "dead" and s.error
        )
        assert "rtsp://127.0.0.1:9/none" in error
    finally:
        stop_agent(proc)
        sub.close()


def _agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet-agent ARGS`` to its end (at most 60 s), with its output captured."""
    return subprocess.run(
        agent_command(*args), cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=1, extra='colour = "red"')
    result = _agent_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'colour'" in result.stderr and "agent.toml:" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_file_exits_2_with_clear_error(tmp_path: Path) -> None:
    manifest = json.loads((REPO / "inference/assets/blazeface-short-int8.json").read_text())
    manifest["model"] = manifest["files"][0]["path"] = "gone.tflite"
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    streams = stream_block("front", source=str(VIDEO), model=str(tmp_path / "m.json"))
    config = write_config(tmp_path, port=1, streams=streams)
    result = _agent_cli("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "gone.tflite" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_good_and_names_problems(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=1883)
    ok = _agent_cli("check-config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "blazeface-short-int8@1.0.0" in ok.stdout
    bad = write_config(
        tmp_path, port=1883, streams=stream_block("front", source="x.mp4", model="nope.json")
    )
    result = _agent_cli("check-config", str(bad))
    assert result.returncode == 2 and "nope.json does not exist" in result.stderr
