"""HTTP API on SQLite and PostgreSQL, over real HTTP (uvicorn on loopback): auth and roles,
devices, tags, telemetry, events, tokens, health, OpenAPI, metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from controller.api import create_app
from controller.db.session import Database
from controller.fleet.tokens import list_tokens, revoke_token
from controller.fleet.writes import write_messages
from tests.controller.conftest import Clock, event, received, reported, serving, status, telemetry


@pytest.fixture
def client(database: Database, clock: Clock) -> Iterator[httpx.Client]:
    with database.begin() as conn:
        write_messages(
            conn,
            [
                received(status("cam-1"), at=clock()),
                received(reported("cam-1"), at=clock()),
                received(status("cam-2", "offline"), at=clock()),
                *[received(telemetry("cam-1", ts=100.0 + i, cpu=i), at=clock()) for i in range(5)],
                received(event("cam-1", "deploy.failed"), at=clock()),
            ],
        )
    with serving(create_app(db=database, clock=clock)) as url, httpx.Client(base_url=url) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_missing_token_gets_401_saying_how_to_create_one(client: httpx.Client) -> None:
    resp = client.get("/api/v1/devices")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert "edgefleet tokens create" in resp.json()["detail"]


def test_wrong_or_revoked_token_gets_401_saying_how_to_create_one(
    client: httpx.Client, tokens: dict[str, str], database: Database, clock: Clock
) -> None:
    resp = client.get("/api/v1/devices", headers=auth("efc_not-a-real-token"))
    assert resp.status_code == 401
    assert "unknown or revoked" in resp.json()["detail"]
    assert "edgefleet tokens create --role viewer" in resp.json()["detail"]
    with database.begin() as conn:
        viewer = next(t for t in list_tokens(conn) if t.role == "viewer")
        revoke_token(conn, viewer.id, now=clock())
    assert client.get("/api/v1/devices", headers=auth(tokens["viewer"])).status_code == 401


def test_viewer_reads_but_tagging_needs_operator_and_tokens_need_admin(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    viewer, operator, admin = tokens["viewer"], tokens["operator"], tokens["admin"]
    assert client.get("/api/v1/devices", headers=auth(viewer)).status_code == 200
    refused = client.post("/api/v1/devices/cam-1/tags", json={"add": ["lab"]}, headers=auth(viewer))
    assert refused.status_code == 403
    assert "has role viewer; this needs operator" in refused.json()["detail"]
    ok = client.post("/api/v1/devices/cam-1/tags", json={"add": ["lab"]}, headers=auth(operator))
    assert ok.status_code == 200 and ok.json() == {"device_id": "cam-1", "tags": ["lab"]}
    assert client.get("/api/v1/tokens", headers=auth(operator)).status_code == 403
    listed = client.get("/api/v1/tokens", headers=auth(admin))
    assert listed.status_code == 200
    assert {t["role"] for t in listed.json()["tokens"]} == {"viewer", "operator", "admin"}
    assert all("token" not in t for t in listed.json()["tokens"])


def test_devices_list_detail_and_filters(client: httpx.Client, tokens: dict[str, str]) -> None:
    h = auth(tokens["viewer"])
    devices = client.get("/api/v1/devices", headers=h).json()["devices"]
    assert [(d["id"], d["online"]) for d in devices] == [("cam-1", True), ("cam-2", False)]
    online = client.get("/api/v1/devices", params={"online": "false"}, headers=h).json()
    assert [d["id"] for d in online["devices"]] == ["cam-2"]
    detail = client.get("/api/v1/devices/cam-1", headers=h).json()
    assert detail["agent_version"] == "1.2.3" and detail["desired_rev"] == 7
    assert detail["streams"][0]["active_model"] == "m@2"
    assert detail["streams"][0]["previous_model"] == "m@1"
    by_model = client.get("/api/v1/devices", params={"model": "m@2"}, headers=h).json()
    assert [d["id"] for d in by_model["devices"]] == ["cam-1"]
    missing = client.get("/api/v1/devices/nope", headers=h)
    assert missing.status_code == 404 and "edgefleet devices list" in missing.json()["detail"]


def test_tags_are_validated_and_filter_the_list(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    h = auth(tokens["operator"])
    bad = client.post("/api/v1/devices/cam-1/tags", json={"add": ["no spaces"]}, headers=h)
    assert bad.status_code == 422
    client.post("/api/v1/devices/cam-2/tags", json={"add": ["lab", "old"]}, headers=h)
    resp = client.post("/api/v1/devices/cam-2/tags", json={"remove": ["old"]}, headers=h)
    assert resp.json()["tags"] == ["lab"]
    listed = client.get("/api/v1/devices", params={"tag": "lab"}, headers=h).json()
    assert [d["id"] for d in listed["devices"]] == ["cam-2"]
    assert (
        client.post("/api/v1/devices/nope/tags", json={"add": ["x"]}, headers=h).status_code == 404
    )


def test_telemetry_history_returns_the_newest_samples_oldest_first(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    h = auth(tokens["viewer"])
    body = client.get("/api/v1/devices/cam-1/telemetry", params={"limit": 3}, headers=h).json()
    assert [s["ts"] for s in body["samples"]] == [102.0, 103.0, 104.0]
    ranged = client.get(
        "/api/v1/devices/cam-1/telemetry", params={"since": 101, "until": 103}, headers=h
    ).json()
    assert [s["cpu_percent"] for s in ranged["samples"]] == [1.0, 2.0]


def test_events_endpoint_filters_by_device_and_code(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    h = auth(tokens["viewer"])
    events = client.get("/api/v1/events", params={"code": "deploy.failed"}, headers=h).json()
    assert [e["device_id"] for e in events["events"]] == ["cam-1"]
    assert client.get("/api/v1/devices/cam-2/events", headers=h).json()["events"] == []


def test_admin_creates_and_revokes_tokens_over_the_api(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    h = auth(tokens["admin"])
    created = client.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"}, headers=h)
    assert created.status_code == 201
    new_token = created.json()["token"]
    me = client.get("/api/v1/whoami", headers=auth(new_token)).json()
    assert me["name"] == "ci" and me["role"] == "viewer"
    revoked = client.delete(f"/api/v1/tokens/{created.json()['id']}", headers=h)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/whoami", headers=auth(new_token)).status_code == 401
    assert client.delete("/api/v1/tokens/9999", headers=h).status_code == 404


def test_healthz_and_openapi_need_no_token(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "mqtt": "not running"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/devices", "/api/v1/devices/{device_id}/telemetry", "/metrics"} <= set(paths)


def test_metrics_show_fleet_gauges_from_the_database(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert 'edgefleet_devices{state="online"} 1.0' in text
    assert 'edgefleet_devices{state="offline"} 1.0' in text
    assert 'edgefleet_model_devices{model="m@2"} 1.0' in text
    assert "edgefleet_database_up 1.0" in text


def test_readyz_is_200_only_with_the_database_and_mqtt_up(database: Database) -> None:
    """Readiness (Kubernetes): 503 "not ready" without an MQTT connection, documented as such
    in the OpenAPI; 200 once the ingest counters say MQTT is connected."""
    from controller.ingest.stats import IngestStats

    stats = IngestStats()
    with serving(create_app(db=database, ingest_snapshot=stats.snapshot)) as url:
        down = httpx.get(f"{url}/readyz")
        assert down.status_code == 503
        assert down.json()["status"] == "not ready" and down.json()["mqtt"] == "disconnected"
        assert down.json()["database"] == "ok"
        documented = httpx.get(f"{url}/openapi.json").json()["paths"]["/readyz"]["get"]
        assert set(documented["responses"]) >= {"200", "503"}
        stats.mqtt_connected = True
        up = httpx.get(f"{url}/readyz")
        assert up.status_code == 200 and up.json()["status"] == "ready", up.text
    with serving(create_app(db=database)) as url:
        assert httpx.get(f"{url}/readyz").json()["mqtt"] == "not running"
