"""Console pages on SQLite and PostgreSQL with data written through the real ingest path
and the real models API: fleet (paging, sorting, filters), device (charts, events,
snapshots), models (golden samples), rollouts (create with preview, actions)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import insert

from controller.api import create_app
from controller.blobstore import BlobStore, ModelHosting
from controller.db.models import device_snapshots
from controller.db.session import Database
from controller.rollouts.records import get_rollout
from tests.controller.conftest import Clock
from tests.controller.console_support import add_device, client_for, csrf_of, login
from tests.ota_support import make_bundle

ROW = re.compile(r'<tr data-device="([^"]+)">')


def cell(html: str, device: str, cls: str) -> str:
    row = html.split(f'<tr data-device="{device}">', 1)[1].split("</tr>", 1)[0]
    found = re.search(rf'<td class="{cls}[^"]*">(.*?)</td>', row, re.S)
    assert found is not None, (device, cls)
    return re.sub(r"<[^>]+>", " ", found.group(1)).strip()


@pytest.fixture
def fleet(database: Database, clock: Clock) -> list[str]:
    """120 devices: every third offline, cpu = index, fps falling, tag lab on even ones."""
    ids = []
    for i in range(120):
        device_id = f"cam-{i:03d}"
        add_device(
            database,
            device_id,
            at=clock() - 30,
            online=i % 3 != 0,
            cpu=float(i),
            fps=100.0 - i / 2,
            tags=("site:lab",) if i % 2 == 0 else (),
            model="m@2" if i < 10 else "m@1",
        )
        ids.append(device_id)
    return ids


def test_fleet_page_counts_pages_and_rows(
    database: Database, clock: Clock, tokens: dict[str, str], fleet: list[str]
) -> None:
    client = client_for(database, clock)
    login(client, tokens["viewer"])
    page = client.get("/ui/fleet").text
    assert '<main id="main" data-live="fleet">' in page
    assert re.search(r'id="count-total">120<', page)
    assert re.search(r'id="count-online">80<', page)
    assert re.search(r'id="count-offline">40<', page)
    assert ROW.findall(page) == fleet[:50]
    assert re.search(r'id="page-info">page 1 of 3<', page)
    assert cell(page, "cam-001", "state") == "online"
    assert cell(page, "cam-003", "state") == "offline"
    assert cell(page, "cam-005", "models") == "cam0: m@2"
    assert cell(page, "cam-005", "fps") == "97.5"
    assert cell(page, "cam-005", "cpu") == "5.0"
    assert cell(page, "cam-005", "last-seen") == "30s ago"
    assert '<a class="sort" data-sort="cpu"' in page
    assert 'href="/ui/devices/cam-005"' in page
    last = client.get("/ui/fleet", params={"page": 3}).text
    assert ROW.findall(last) == fleet[100:]
    assert 'id="next" aria-disabled="true"' in last and 'id="prev" href=' in last


def test_fleet_page_sorts_and_filters_on_the_server(
    database: Database, clock: Clock, tokens: dict[str, str], fleet: list[str]
) -> None:
    client = client_for(database, clock)
    login(client, tokens["viewer"])
    by_cpu = client.get("/ui/fleet", params={"sort": "cpu", "order": "desc"}).text
    assert ROW.findall(by_cpu)[:3] == ["cam-119", "cam-118", "cam-117"]
    assert 'aria-sort="descending"' in by_cpu
    by_fps = client.get("/ui/fleet", params={"sort": "fps", "order": "asc"}).text
    assert ROW.findall(by_fps)[0] == "cam-119"
    offline_lab = client.get("/ui/fleet", params={"state": "offline", "tag": "site:lab"}).text
    assert ROW.findall(offline_lab) == [f"cam-{i:03d}" for i in range(0, 120, 6)]
    model = client.get("/ui/fleet", params={"model": "m@2"}).text
    assert ROW.findall(model) == fleet[:10]
    assert re.search(r'id="page-info">page 1 of 1<', model)
    text = client.get("/ui/fleet", params={"q": "cam-11"}).text
    assert ROW.findall(text) == fleet[110:120]
    bad = client.get("/ui/fleet", params={"sort": "colour"})
    assert bad.status_code == 400 and "unknown sort key 'colour'" in html.unescape(bad.text)
    assert client.get("/ui/fleet", params={"page": "0"}).status_code == 400


def test_fragment_request_answers_only_the_inner_main(
    database: Database, clock: Clock, tokens: dict[str, str], fleet: list[str]
) -> None:
    client = client_for(database, clock)
    login(client, tokens["viewer"])
    part = client.get("/ui/fleet", headers={"X-Console-Fragment": "main"}).text
    assert "<html" not in part and "<main" not in part and 'id="nav-fleet"' not in part
    assert 'id="count-total">120<' in part and len(ROW.findall(part)) == 50


def test_device_page_streams_charts_events_and_snapshot(
    database: Database, clock: Clock, tokens: dict[str, str]
) -> None:
    for i in range(6):  # six telemetry samples in the last hour
        add_device(database, "cam-1", at=clock() - 600 + 60 * i, cpu=10.0 * i, fps=5.0 + i)
    jpeg = b"\xff\xd8\xff\xe0" + b"0" * 100 + b"\xff\xd9"
    with database.begin() as conn:
        conn.execute(
            insert(device_snapshots).values(
                device_id="cam-1",
                stream="cam0",
                ts=clock() - 5,
                received_at=clock() - 4,
                model="m@1",
                width=640,
                height=480,
                detections=[{"label": "face", "score": 0.9, "box": [0.1, 0.1, 0.3, 0.4]}],
                jpeg=jpeg,
            )
        )
    client = client_for(database, clock)
    login(client, tokens["viewer"])
    page = client.get("/ui/devices/cam-1").text
    assert '<main id="main" data-live="device:cam-1">' in page
    assert re.search(r'id="device-state" class="badge online">online<', page)
    assert 'id="device-facts"' in page
    row = page.split('<tr data-stream="cam0">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="active-model">m@1</td>' in row
    assert '<td class="previous-model">m@0</td>' in row
    assert '<td class="phase">committed</td>' in row
    for metric in ("fps", "latency_p50", "latency_p95", "cpu", "mem", "temp", "spool", "psi"):
        figure = page.split(f'<figure class="chart" data-metric="{metric}">', 1)[1]
        figure = figure.split("</figure>", 1)[0]
        assert "<svg" in figure and "<figcaption>" in figure, metric
    cpu = page.split('data-metric="cpu"', 1)[1].split("</figure>", 1)[0]
    points = re.search(r'<polyline points="([^"]+)"', cpu)
    assert points is not None and len(points.group(1).split()) == 6
    psi = page.split('data-metric="psi"', 1)[1].split("</figure>", 1)[0]
    assert "no data" in psi  # no drift KPI reported
    assert len(re.findall(r'<li class="level-info">', page)) == 6  # one event per message batch
    assert 'id="range-hour"' in page and 'id="range-day"' in page
    img = '<img class="snapshot" data-stream="cam0" src="/ui/devices/cam-1/snapshots/cam0.jpg"'
    assert img in page
    assert "cam0: 5s ago, 1 detection, m@1" in page
    snap = client.get("/ui/devices/cam-1/snapshots/cam0.jpg")
    assert snap.status_code == 200 and snap.headers["content-type"] == "image/jpeg"
    assert snap.content == jpeg
    assert client.get("/ui/devices/cam-1/snapshots/cam9.jpg").status_code == 404
    day = client.get("/ui/devices/cam-1", params={"range": "day"}).text
    cpu_day = day.split('data-metric="cpu"', 1)[1].split("</figure>", 1)[0]
    day_points = re.search(r'<polyline points="([^"]+)"', cpu_day)
    assert day_points is not None and len(day_points.group(1).split()) in (2, 3)  # 5-min means
    assert "5-minute means" in cpu_day
    missing = client.get("/ui/devices/nope")
    assert missing.status_code == 404 and "no device 'nope'" in html.unescape(missing.text)
    assert client.get("/ui/devices/cam-1", params={"range": "week"}).status_code == 400


@pytest.fixture
def hosted(database: Database, clock: Clock, tmp_path: Path) -> TestClient:
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000_000
    )
    return TestClient(app, follow_redirects=False)


def test_models_pages_show_registry_golden_samples_and_devices(
    hosted: TestClient, database: Database, clock: Clock, tokens: dict[str, str], tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "face.efb", Ed25519PrivateKey.generate(), version="2.0.0")
    pushed = hosted.post(
        "/api/v1/models",
        content=bundle.body,
        headers={"Authorization": f"Bearer {tokens['operator']}"},
    )
    assert pushed.status_code == 201, pushed.text
    ref = bundle.name
    add_device(database, "cam-7", at=clock(), model=ref)
    login(hosted, tokens["viewer"])
    listing = hosted.get("/ui/models").text
    row = listing.split(f'<tr data-model="{ref}">', 1)[1].split("</tr>", 1)[0]
    assert re.search(r"<td class=\"runtime\">[a-z]+</td>", row)
    assert re.search(r'<td class="devices num">1</td>', row)
    assert re.search(r'<td class="size num">[\d.]+ (KiB|MiB)</td>', row)
    name, version = ref.split("@")
    detail = hosted.get(f"/ui/models/{name}/{version}").text
    assert 'id="lineage"' in detail
    golden = re.findall(r'<figure class="golden">(.*?)</figure>', detail, re.S)
    expected = bundle.manifest.golden[0].expected
    assert len(golden) == len(bundle.manifest.golden) == 1
    assert len(re.findall(r"<rect ", golden[0])) == len(expected) >= 1
    assert '<svg class="boxes"' in golden[0]
    src = re.search(r'<img src="([^"]+)"', golden[0])
    assert src is not None
    image = hosted.get(src.group(1))
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert re.search(r'<ul id="running">\s*<li><a href="/ui/devices/cam-7">cam-7</a>', detail)
    assert hosted.get(f"/ui/models/{name}/{version}/golden/5").status_code == 404
    assert hosted.get(f"/ui/models/{name}/9.9.9").status_code == 404


def test_rollout_preview_create_and_actions(
    hosted: TestClient, database: Database, clock: Clock, tokens: dict[str, str], tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "face.efb", Ed25519PrivateKey.generate(), version="2.0.0")
    headers = {"Authorization": f"Bearer {tokens['operator']}"}
    assert hosted.post("/api/v1/models", content=bundle.body, headers=headers).status_code == 201
    for i in range(4):
        add_device(database, f"cam-{i}", at=clock(), tags=("site:lab",) if i < 3 else ())
    csrf = login(hosted, tokens["operator"])
    assert 'id="new-rollout"' in hosted.get("/ui/rollouts").text
    form = hosted.get("/ui/rollouts/new").text
    assert f'<option value="{bundle.name}"' in form and 'id="rollout-form"' in form
    fields = {
        "csrf": csrf,
        "model": bundle.name,
        "select": "tag=site:lab",
        "stream": "*",
        "stages": "1,50%,100%",
        "bake": "0s",
        "max-failures": "0%",
    }
    preview = hosted.post("/ui/rollouts/preview", data=fields)
    assert preview.status_code == 200, preview.text
    assert re.search(r'id="preview-count">3<', preview.text)
    assert re.findall(r"<li>(cam-\d):", preview.text) == ["cam-0", "cam-1", "cam-2"]
    assert 'id="confirm"' in preview.text and 'id="create"' in preview.text
    with database.connect() as conn:  # the preview stored nothing
        assert get_rollout(conn, 1) is None and get_rollout(conn, 2) is None
    unconfirmed = hosted.post("/ui/rollouts", data=fields)
    assert unconfirmed.status_code == 422 and "tick the confirmation" in unconfirmed.text
    bad = hosted.post("/ui/rollouts/preview", data={**fields, "stages": "50%,10%"})
    assert bad.status_code == 422
    assert re.search(r'<p id="error" role="alert">stages 50%,10% are cumulative', bad.text)
    created = hosted.post("/ui/rollouts", data={**fields, "confirm": "on"})
    assert created.status_code == 303
    url = created.headers["location"]
    rollout_id = int(url.rsplit("/", 1)[1])
    page = hosted.get(url).text
    assert re.search(r'id="rollout-state" class="badge active">active<', page)
    assert f'data-live="rollout:{rollout_id}"' in page
    assert len(re.findall(r'<tr data-stage="\d">', page)) == 3
    assert re.findall(r'<tr data-device="(cam-\d)"', page) == ["cam-0", "cam-1", "cam-2"]
    buttons = re.findall(r'<button id="(\w+)" type="submit">', page)
    assert buttons == ["logout", "pause", "abort", "rollback"]  # what an active one allows
    overlap = hosted.post("/ui/rollouts", data={**fields, "confirm": "on"})
    assert overlap.status_code == 409 and f"are in rollout {rollout_id}" in overlap.text

    def act(action: str, **extra: str) -> str:
        resp = hosted.post(f"{url}/{action}", data={"csrf": csrf, **extra})
        assert resp.status_code == 303, resp.text
        assert resp.headers["location"] == url
        shown: str = hosted.get(url).text
        return shown

    paused = act("pause")
    assert 'class="badge paused">paused<' in paused
    assert re.findall(r'<button id="(\w+)" type="submit">', paused)[1:] == [
        "resume",
        "abort",
        "rollback",
    ]
    again = hosted.post(f"{url}/pause", data={"csrf": csrf})
    assert again.status_code == 409
    assert "cannot pause rollout" in again.text and "rollout resume" in again.text
    assert 'class="badge active">active<' in act("resume")
    aborted = act("abort", reason="wrong build")
    assert 'class="badge aborted">aborted<' in aborted
    assert 'class="actions"' not in aborted  # nothing left to do
    assert re.search(
        r"<p id=\"abort-reason\">aborted by token .t-operator.: wrong build</p>",
        html.unescape(aborted),
    )
    listing = hosted.get("/ui/rollouts").text
    assert f'<tr data-rollout="{rollout_id}">' in listing
    assert re.search(r'<td class="progress">0/3 done</td>', listing)
    assert hosted.post("/ui/rollouts/999/pause", data={"csrf": csrf}).status_code == 404
    assert hosted.get("/ui/rollouts/999").status_code == 404


def test_csrf_field_is_per_session(
    database: Database, clock: Clock, tokens: dict[str, str]
) -> None:
    one, two = client_for(database, clock), client_for(database, clock)
    first, second = login(one, tokens["operator"]), login(two, tokens["operator"])
    assert first != second
    assert csrf_of(one.get("/ui/rollouts").text) == first
    assert one.post("/ui/logout", data={"csrf": second}).status_code == 403
