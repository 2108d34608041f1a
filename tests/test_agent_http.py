"""The agent's local HTTP inference endpoint ([http]) on the real daemon.

Real agent processes, a real Mosquitto, real HTTP over loopback and real LiteRT inference
on the shipped INT8 BlazeFace; the golden image is scikit-image's astronaut (one face,
tests/data/astronaut.png). The model swap is a real signed OTA update.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import HttpConfig, LoadedConfig, load_config, parse_config
from agent.errors import ConfigError
from agent.http_api import read_token
from agent.http_infer import lower_thread_priority
from agent.http_openapi import ROUTES
from protocol import Detections, decode
from tests import images
from tests.agent_http_support import (
    GOLDEN,
    TOKEN,
    Answer,
    assert_the_face,
    call,
    detect,
    expect_continue,
    faces,
    http_block,
    jpeg,
    listening,
    running_agent,
    wait_ready,
)
from tests.agent_proc import VIDEO, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.bundle_factory import write_public_key
from tests.mqtt_sub import Subscriber
from tests.ota_support import BASELINE_REF, desired, make_bundle, publish_desired
from tests.range_server import RangeServerState, range_server
from tests.waiting import wait_for

DEVICE = "cam-01"
MINIMAL = 'device_id = "cam-01"\n[[streams]]\nname = "a"\nsource = "0"\nmodel = "builtin:x"\n'


# --- config --------------------------------------------------------------------------------


def test_http_table_defaults_bounds_and_unknown_keys() -> None:
    assert parse_config(MINIMAL).http == HttpConfig(
        enabled=False,
        bind="127.0.0.1",
        port=8090,
        token=None,
        token_file=None,
        max_queue=4,
        max_concurrency=1,
        max_body_bytes=10 * 1024 * 1024,
    )
    for line, fragment in [
        ("port = 0", "http.port"),
        ("port = 65536", "http.port"),
        ("max_queue = 0", "http.max_queue"),
        ("max_queue = 65", "http.max_queue"),
        ("max_concurrency = 9", "http.max_concurrency"),
        ("max_body_bytes = 100", "http.max_body_bytes"),
        ('token = "short"', "http.token"),
        ('token = "has a space in it, sixteen+"', "http.token"),
        ("no_such_key = 1", "unknown key 'no_such_key' in http"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            parse_config(MINIMAL + f"[http]\n{line}\n", source="agent.toml")
    edges = "[http]\nport = 65535\nmax_queue = 64\nmax_concurrency = 8\n"
    assert parse_config(MINIMAL + edges).http.max_concurrency == 8
    both = f'[http]\ntoken = "{TOKEN}"\ntoken_file = "t"\n'
    with pytest.raises(ConfigError, match=r"agent.toml:8: set http.token or http.token_file"):
        parse_config(MINIMAL + both, source="agent.toml")


def test_token_file_is_resolved_read_and_must_exist(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, port=1883, extra='[http]\nenabled = true\ntoken_file = "http.token"\n'
    )
    with pytest.raises(ConfigError, match=r"http.token_file: .*http.token does not exist"):
        load_config(path)
    (tmp_path / "http.token").write_text(f"{TOKEN}\n", encoding="utf-8")
    loaded = load_config(path)
    assert read_token(loaded.config.http, loaded) == TOKEN
    (tmp_path / "http.token").write_text("short\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least 16 visible ASCII"):
        read_token(loaded.config.http, LoadedConfig(loaded.config, loaded.path))


# --- the real daemon -----------------------------------------------------------------------


@pytest.mark.slow
def test_http_is_off_by_default_nothing_listens(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port, [f"edgefleet/v1/{DEVICE}/detections/+"])
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True)
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    with running_agent(config, tmp_path / "agent.log") as proc:
        sub.wait_for(lambda ms: len(ms) >= 5, timeout=30)
        assert listening(proc.pid) == []
    sub.close()


@pytest.mark.slow
def test_http_inference_returns_the_golden_face_and_refuses_bad_requests(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    port = free_port()
    streams = stream_block("front", source=str(VIDEO)) + stream_block(
        "side", source=str(VIDEO), extra='labels = ["person"]'
    )
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=streams,
        extra=http_block(port, "max_body_bytes = 1048576"),
    )
    log = tmp_path / "agent.log"
    with running_agent(config, log) as proc:
        wait_ready(proc, port, log)
        assert listening(proc.pid) == [("127.0.0.1", port)]  # loopback unless configured
        health = call(port, "GET", "/healthz", token=None)
        assert (health.status, health.json()) == (200, {"status": "ok"})
        assert call(port, "GET", "/readyz", token=None).json()["models"] == [BASELINE_REF]

        # The bearer token: 401 without it or with a wrong one, on every protected route.
        for token in (None, "x" * len(TOKEN), TOKEN[:-1]):
            for method, path in (("GET", "/models"), ("GET", "/openapi.json")):
                denied = call(port, method, path, token=token)
                assert denied.status == 401 and "bearer token" in denied.json()["detail"]
                assert denied.headers["www-authenticate"].startswith("Bearer")
            assert detect(port, "?stream=front", token=token).status == 401

        models = call(port, "GET", "/models").json()["models"]
        assert models == [
            {
                "model": BASELINE_REF,
                "name": "blazeface-short-int8",
                "version": "1.0.0",
                "backend": "litert",
                "streams": ["front", "side"],
                "labels": ["face"],
                "input": {"width": 128, "height": 128},
            }
        ]

        # The golden PNG by stream, and the same picture as a JPEG by model.
        by_stream = faces(detect(port, "?stream=front"))
        assert_the_face(by_stream)
        assert (by_stream.stream, by_stream.model, by_stream.device_id) == (
            "front",
            BASELINE_REF,
            DEVICE,
        )
        assert (by_stream.width, by_stream.height) == (512, 512)
        assert by_stream.infer_ms > 0
        by_model = faces(
            detect(
                port,
                f"?model={BASELINE_REF}",
                jpeg(images.astronaut()),
                content_type="image/jpeg",
            )
        )
        assert_the_face(by_model)
        assert by_model.seq == by_stream.seq + 1
        # A stream's label filter applies to ?stream= answers as on MQTT.
        assert faces(detect(port, "?stream=side")).detections == []
        # No face on the coffee cup.
        assert (
            faces(
                detect(port, "?stream=front", jpeg(images.coffee()), content_type="image/jpeg")
            ).detections
            == []
        )

        def refused(answer: Answer, status: int, fragment: str) -> None:
            assert answer.status == status, (answer.status, answer.body)
            assert fragment in answer.json()["detail"], answer.json()

        refused(
            detect(port, "?stream=front", content_type="text/plain"), 415, "image/jpeg or image/png"
        )
        refused(detect(port, "?stream=front", content_type="image/gif"), 415, "not accepted")
        refused(detect(port, "?stream=front", b"\0" * 1_100_000), 413, "at most 1048576")
        refused(detect(port, "?stream=front", b"not an image at all"), 400, "not a PNG image")
        broken = GOLDEN.read_bytes()[:5000]
        refused(detect(port, "?stream=front", broken), 400, "could not be decoded")
        refused(
            detect(port, "?stream=front", b"\xff\xd8\xff\xd9", content_type="image/jpeg"),
            400,
            "JPEG",
        )
        bomb = bytearray(GOLDEN.read_bytes()[:33])
        bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header claims 100000x100000
        refused(detect(port, "?stream=front", bytes(bomb)), 400, "scale it down")
        refused(detect(port, "?stream=back"), 404, "no stream 'back'")
        refused(detect(port, "?model=blazeface-short-int8@9.9.9"), 404, BASELINE_REF)
        refused(detect(port), 400, "several streams")
        refused(detect(port, "?stream=front&model=x"), 400, "not both")
        refused(call(port, "GET", "/nope"), 404, "no route /nope")
        refused(call(port, "GET", "/detect"), 405, "POST")
        # Expect: 100-continue (curl sends it for bodies over 1 MiB): a refused request is
        # answered before its body is sent; an accepted one gets 100 Continue first.
        refused_early = expect_continue(port, "/detect?stream=front", 5_000_000, b"")
        assert refused_early.startswith(b"HTTP/1.1 413 "), refused_early
        accepted = expect_continue(port, "/detect?stream=front", None, GOLDEN.read_bytes())
        assert accepted.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), accepted
        assert_the_face(decode(accepted.split(b"\r\n\r\n", 2)[2], Detections))
        # After all of that the endpoint still answers.
        assert_the_face(faces(detect(port, "?stream=front")))

        doc = call(port, "GET", "/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        assert {p: sorted(ops) for p, ops in doc["paths"].items()} == {
            p: sorted(m) for p, m in ROUTES.items()
        }
        for path, ops in doc["paths"].items():
            for op in ops.values():
                assert ("security" in op) == (path not in ("/healthz", "/readyz")), path
        assert "Detections" in doc["components"]["schemas"]


def _rate(frames: list[Detections], windows: list[tuple[float, float]]) -> float:
    counted = sum(1 for f in frames for a, b in windows if a <= f.frame_ts < b)
    return counted / sum(b - a for a, b in windows)


@pytest.mark.slow
def test_a_full_queue_answers_503_and_the_camera_keeps_its_frame_rate(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Six clients post a 3072x3072 JPEG as fast as they are answered, in two 3 s bursts
    between quiet stretches (alternating, so other load on the machine hits both alike)."""
    port = free_port()
    sub = Subscriber(mosquitto.port, [f"edgefleet/v1/{DEVICE}/detections/front"])
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True)
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=streams,
        extra=http_block(port, "max_queue = 1\nmax_concurrency = 1"),
    )
    big = jpeg(images.astronaut(), scale=6.0)  # a heavy decode per request
    log = tmp_path / "agent.log"
    statuses: list[Answer] = []
    quiet: list[tuple[float, float]] = []
    loaded: list[tuple[float, float]] = []
    load = threading.Event()
    done = threading.Event()

    def client() -> None:
        # The clients stand for programs elsewhere: their own CPU time (this process, the
        # same cores) is not what the agent's design can control.
        lower_thread_priority(19)
        while load.wait() and not done.is_set():
            answer = detect(port, body=big, content_type="image/jpeg")
            statuses.append(answer)
            if answer.status == 503:
                time.sleep(0.05)  # a polite client; the agent sheds the rest

    with running_agent(config, log) as proc:
        wait_ready(proc, port, log)
        assert faces(detect(port, body=big, content_type="image/jpeg")).detections
        time.sleep(2.0)  # past the start-up
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for _ in range(2):
            begin = time.time()
            time.sleep(3.0)
            quiet.append((begin, time.time()))
            load.set()
            begin = time.time()
            time.sleep(3.0)
            loaded.append((begin + 0.2, time.time()))
            load.clear()
            time.sleep(0.5)  # the last answers
        done.set()
        load.set()
        for t in threads:
            t.join(30)
        time.sleep(1.0)
        assert proc.poll() is None
    sub.close()
    frames = [decode(m.payload, Detections) for m in sub.messages]
    quiet_fps, loaded_fps = _rate(frames, quiet), _rate(frames, loaded)
    codes = [a.status for a in statuses]
    busy = [a for a in statuses if a.status == 503]
    print(
        f"stream {quiet_fps:.2f} fps quiet, {loaded_fps:.2f} fps under HTTP load; "
        f"{codes.count(200)} answered, {len(busy)} refused (503)"
    )
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 3, codes
    assert busy, f"the queue never filled: {codes}"
    assert all(a.headers["retry-after"] == "1" and "busy" in a.json()["detail"] for a in busy)
    assert quiet_fps >= 12.0, f"the stream runs {quiet_fps:.1f} fps without HTTP load (video: 15)"
    assert loaded_fps >= 0.9 * quiet_fps, (
        f"stream rate {loaded_fps:.2f} fps under HTTP load vs {quiet_fps:.2f} fps without; "
        f"{codes.count(200)} answered, {len(busy)} refused"
    )


@pytest.mark.slow
def test_a_model_swapped_in_on_the_stream_serves_the_next_request(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    port = free_port()
    key = Ed25519PrivateKey.generate()
    pub = write_public_key(key, tmp_path / "signing.pub")
    ota = (
        f'[ota]\ntrusted_keys = ["{pub.name}"]\nprobation_s = 2.0\nshadow_max_s = 3\n'
        'undecided = "commit"\n'
    )
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True)
    config = write_config(
        tmp_path, port=mosquitto.port, streams=streams, extra=ota + http_block(port)
    )
    bundle = make_bundle(tmp_path / "v2.efb", key, version="2.0.0")
    sub = Subscriber(mosquitto.port, [f"edgefleet/v1/{DEVICE}/detections/front"])
    log = tmp_path / "agent.log"
    with ExitStack() as stack:
        url = stack.enter_context(range_server(RangeServerState(bundle.body)))
        proc = stack.enter_context(running_agent(config, log))
        wait_ready(proc, port, log)
        assert faces(detect(port)).model == BASELINE_REF  # the only stream: no query needed
        publish_desired(mosquitto.port, DEVICE, desired(1, {"front": bundle.at(url)}))

        def swapped() -> bool:
            return any(bundle.name.encode() in m.payload for m in sub.on("/front"))

        wait_for(swapped, timeout=60, what=lambda: f"the swap\n{log.read_text()[-3000:]}")
        answer = faces(detect(port, "?stream=front"))
        assert answer.model == bundle.name == "blazeface-short-int8@2.0.0"
        assert_the_face(answer)
        assert faces(detect(port, f"?model={bundle.name}")).model == bundle.name
        gone = detect(port, f"?model={BASELINE_REF}")
        assert gone.status == 404 and bundle.name in gone.json()["detail"]
        models = call(port, "GET", "/models").json()["models"]
        assert [(m["model"], m["streams"]) for m in models] == [(bundle.name, ["front"])]
        # The HTTP copy of the old model is closed once no stream runs it.
        wait_for(
            lambda: f"http: closed its copy of {BASELINE_REF}" in log.read_text(),
            timeout=10,
            what="the old model's HTTP copy to be closed",
        )
    sub.close()


@pytest.mark.slow
def test_the_live_endpoint_matches_its_openapi_document(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """schemathesis drives the running endpoint from its own /openapi.json, every check on:
    no 5xx, and every status, content type and body as documented."""
    import schemathesis
    from schemathesis.engine import events, from_schema
    from schemathesis.engine.statistic import Statistic

    port = free_port()
    streams = stream_block("front", source=str(VIDEO))
    config = write_config(tmp_path, port=mosquitto.port, streams=streams, extra=http_block(port))
    log = tmp_path / "agent.log"
    with running_agent(config, log) as proc:
        wait_ready(proc, port, log)
        settings = schemathesis.Config.from_dict(
            {
                "seed": 20261207,
                "max-time": 15,
                "headers": {"Authorization": f"Bearer {TOKEN}"},
                "generation": {"max-examples": 20, "mode": "all", "database": "none"},
                "checks": {"enabled": True},
                "workers": 1,
                "operations": [
                    {
                        # Schema-valid bytes are rarely a decodable image (400), and no
                        # schema can list the device's streams and models (404).
                        "include-path": "/detect",
                        "include-method": "POST",
                        "checks": {
                            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]}
                        },
                    }
                ],
            }
        )
        schema = schemathesis.openapi.from_url(
            f"http://127.0.0.1:{port}/openapi.json", config=settings
        )
        stat = Statistic()
        errors: list[str] = []
        for ev in from_schema(schema).execute():
            if isinstance(ev, events.ScenarioFinished):
                stat.on_scenario_finished(ev.recorder)
            elif isinstance(ev, events.NonFatalError):
                errors.append(f"{ev.label}: {ev.info.message}")
            elif isinstance(ev, events.FatalError):
                raise ev.exception
            elif isinstance(ev, events.EngineFinished):
                stat.record_run_check_failures(ev.failures, label="run")
        failures = [
            f"{label}: {f.title}: {f.message.splitlines()[0] if f.message else ''} -> "
            f"{group.response.status_code if group.response is not None else None} "
            f"{group.response.content[:200] if group.response is not None else b''!r}"
            for label, groups in stat.failures.items()
            for group in groups.values()
            for f in group.failures
        ]
        print(f"schemathesis: {stat.total_cases} cases, {len(failures)} failures")
        assert stat.total_cases >= 20
        assert not errors, errors
        assert not failures, "\n".join(failures[:20])
        assert_the_face(faces(detect(port)))  # and it still answers
