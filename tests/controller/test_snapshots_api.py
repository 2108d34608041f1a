"""Camera snapshots in the controller on SQLite and PostgreSQL: ingest of the ``snapshot``
kind (the latest per stream, JPEG checked), the API routes over real HTTP, and a real
agent's snapshot served byte for byte by the controller as a process."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import pytest

from controller.api import create_app
from controller.db.session import Database
from controller.ingest.writer import Ingestor
from protocol import Detection, Snapshot, decode, encode_checked, snapshot_topic
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.controller.conftest import Clock, serving
from tests.controller.controller_proc import ControllerProcess
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    cap = cv2.VideoCapture(str(VIDEO))
    ok, image = cap.read()
    cap.release()
    assert ok
    ok, buf = cv2.imencode(".jpg", cv2.resize(image, (width, height)))
    assert ok
    return buf.tobytes()


FACE = Detection(label="face", score=0.8, box=(0.1, 0.2, 0.3, 0.4))


def _snapshot(
    device: str = "cam-1", stream: str = "front", *, ts: float = 1000.0, jpeg: str | None = None
) -> Snapshot:
    return Snapshot(
        schema=1,
        device_id=device,
        stream=stream,
        ts=ts,
        model="face@1",
        width=64,
        height=48,
        detections=[FACE],
        jpeg=base64.b64encode(_jpeg()).decode() if jpeg is None else jpeg,
    )


@dataclass
class Rig:
    http: httpx.Client
    ingest: Ingestor

    def send(self, message: Snapshot, topic: str | None = None) -> str:
        topic = topic or snapshot_topic(message.device_id, message.stream)
        outcome = self.ingest.handle(topic, encode_checked(message))
        self.ingest.write_pending()
        return outcome


@pytest.fixture
def rig(database: Database, clock: Clock) -> Iterator[Rig]:
    ingest = Ingestor(db=database, clock=clock)
    app = create_app(db=database, clock=clock, ingest_snapshot=ingest.snapshot)
    with serving(app) as url, httpx.Client(base_url=url) as http:
        yield Rig(http, ingest)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_ingested_snapshot_is_listed_and_served_with_an_etag(
    rig: Rig, tokens: dict[str, str], clock: Clock
) -> None:
    h = auth(tokens["viewer"])
    assert rig.send(_snapshot("cam-new")) == "queued"
    listed = rig.http.get("/api/v1/devices/cam-new/snapshots", headers=h)
    assert listed.status_code == 200
    assert listed.json() == {
        "snapshots": [
            {
                "stream": "front",
                "ts": 1000.0,
                "received_at": clock(),
                "model": "face@1",
                "width": 64,
                "height": 48,
                "detections": [{"label": "face", "score": 0.8, "box": [0.1, 0.2, 0.3, 0.4]}],
                "bytes": len(_jpeg()),
            }
        ]
    }
    assert rig.http.get("/api/v1/devices/cam-new", headers=h).status_code == 200, "created"
    image = rig.http.get("/api/v1/devices/cam-new/snapshots/front", headers=h)
    assert image.status_code == 200 and image.content == _jpeg()
    assert image.headers["content-type"] == "image/jpeg"
    assert image.headers["cache-control"] == "no-cache"
    etag = image.headers["etag"]
    again = rig.http.get(
        "/api/v1/devices/cam-new/snapshots/front", headers={**h, "If-None-Match": etag}
    )
    assert again.status_code == 304 and again.content == b""


def test_only_a_newer_snapshot_replaces_the_stored_one(rig: Rig, tokens: dict[str, str]) -> None:
    h = auth(tokens["viewer"])
    url = "/api/v1/devices/cam-1/snapshots/front"
    rig.send(_snapshot(ts=2000.0))
    first = rig.http.get(url, headers=h).content
    other = base64.b64encode(_jpeg(32, 24)).decode()
    rig.send(_snapshot(ts=1999.0, jpeg=other))  # late or redelivered: older, ignored
    assert rig.http.get(url, headers=h).content == first
    rig.send(_snapshot(ts=2001.0, jpeg=other))
    assert rig.http.get(url, headers=h).content == _jpeg(32, 24)
    # Within one batch the newest wins too, whatever the arrival order.
    for ts, jpeg in ((2003.0, None), (2002.0, other)):
        rig.ingest.handle(
            snapshot_topic("cam-1", "front"), encode_checked(_snapshot(ts=ts, jpeg=jpeg))
        )
    rig.ingest.write_pending()
    listed = rig.http.get("/api/v1/devices/cam-1/snapshots", headers=h).json()["snapshots"]
    assert [s["ts"] for s in listed] == [2003.0]
    assert rig.http.get(url, headers=h).content == _jpeg()


def test_bad_base64_and_non_jpeg_are_rejected_and_counted(rig: Rig, tokens: dict[str, str]) -> None:
    topic = snapshot_topic("cam-1", "front")
    good = encode_checked(_snapshot())
    not_jpeg = encode_checked(_snapshot(jpeg=base64.b64encode(b"GIF89a" + b"\0" * 30).decode()))
    bad_base64 = good.replace(b'"jpeg":"', b'"jpeg":"*', 1)
    wrong_stream = encode_checked(_snapshot(stream="back"))
    assert rig.ingest.handle(topic, not_jpeg) == "malformed"
    assert rig.ingest.handle(topic, bad_base64) == "malformed"
    assert rig.ingest.handle(topic, wrong_stream) == "malformed"
    assert rig.ingest.handle(topic + "/jpeg", _jpeg()) == "malformed"
    rig.ingest.write_pending()
    metrics = rig.http.get("/metrics").text
    for reason in ("not_jpeg", "out_of_bounds", "topic_mismatch", "topic"):
        line = f'edgefleet_ingest_rejected_total{{kind="snapshot",reason="{reason}"}} 1.0'
        assert line in metrics, reason
    resp = rig.http.get("/api/v1/devices/cam-1/snapshots", headers=auth(tokens["viewer"]))
    assert resp.status_code == 404, "nothing of them was stored, not even the device"


def test_404s_say_what_is_missing_and_a_token_is_required(rig: Rig, tokens: dict[str, str]) -> None:
    h = auth(tokens["viewer"])
    rig.send(_snapshot("cam-1", "front"))
    none = rig.http.get("/api/v1/devices/cam-1/snapshots/back", headers=h)
    assert none.status_code == 404
    assert "has no snapshot of stream 'back'" in none.json()["detail"]
    unknown = rig.http.get("/api/v1/devices/cam-9/snapshots/front", headers=h)
    assert unknown.status_code == 404 and "no device 'cam-9'" in unknown.json()["detail"]
    assert rig.http.get("/api/v1/devices/cam-9/snapshots", headers=h).status_code == 404
    for path in ("/api/v1/devices/cam-1/snapshots", "/api/v1/devices/cam-1/snapshots/front"):
        assert rig.http.get(path).status_code == 401
        assert rig.http.get(path, headers=auth("efc_wrong")).status_code == 401
    bad = rig.http.get("/api/v1/devices/cam-1/snapshots/Front", headers=h)
    assert bad.status_code == 422 and "detail" in bad.json()


def test_the_routes_are_documented(rig: Rig) -> None:
    paths = rig.http.get("/openapi.json").json()["paths"]
    image = paths["/api/v1/devices/{device_id}/snapshots/{stream}"]["get"]["responses"]
    assert "image/jpeg" in image["200"]["content"]
    assert {"304", "401", "404"} <= set(image)
    listed = paths["/api/v1/devices/{device_id}/snapshots"]["get"]["responses"]
    assert {"200", "401", "404"} <= set(listed)


@pytest.mark.slow
def test_a_real_agents_snapshot_is_served_by_the_controller_byte_for_byte(
    db_url: str, database: Database, tokens: dict[str, str], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    (tmp_path / "ctl").mkdir()
    ctl = ControllerProcess(tmp_path / "ctl", db_url, mosquitto)
    ctl.start()
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/cam-01/snapshot/front"])
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=stream_block("front", source=str(VIDEO), realtime=True, loop=True),
        extra="[snapshots]\nenabled = true\ninterval_s = 2\n",
    )
    agent = start_agent(config, tmp_path / "agent.log")
    h = auth(tokens["viewer"])
    try:
        with httpx.Client(base_url=ctl.url, headers=h) as http:

            def listed() -> list[dict[str, object]]:
                resp = http.get("/api/v1/devices/cam-01/snapshots")
                return resp.json()["snapshots"] if resp.status_code == 200 else []

            wait_for(lambda: bool(listed()), timeout=40, what="a snapshot in the controller")
            stored = listed()[0]
            image = http.get("/api/v1/devices/cam-01/snapshots/front")
            assert httpx.get(f"{ctl.url}/api/v1/devices/cam-01/snapshots").status_code == 401
        assert stop_agent(agent)[0] == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        sub.close()
        ctl.stop()
    published = {s.ts: s for s in (decode(m.payload, Snapshot) for m in sub.messages)}
    sent = published[stored["ts"]]  # type: ignore[index]
    assert image.status_code == 200 and image.content == base64.b64decode(sent.jpeg)
    assert (stored["width"], stored["height"], stored["model"]) == (640, 480, sent.model)
    assert stored["bytes"] == len(image.content)
    assert stored["detections"][0]["label"] == "face"  # type: ignore[index]
    assert "Traceback" not in ctl.tail()
