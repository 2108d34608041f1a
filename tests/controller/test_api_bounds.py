"""Bounds of the HTTP API's input on SQLite and PostgreSQL, over real HTTP (issue 10's API
findings): integers past SQL BIGINT, NUL characters and over-long strings, unknown enum
values, undocumented status codes, tags without limit, oversized bodies. Each must be a
documented 4xx in the one error shape ``{"detail": "..."}`` (422 adds ``errors``) that says
what is wrong, never a 500; the good input next to each bound must still be accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.api import create_app
from controller.blobstore import BlobStore, ModelHosting
from controller.db.session import Database
from controller.fleet.writes import write_messages
from tests.controller.conftest import Clock, event, received, serving, status

BIG = 2**63
"""One past the largest SQL BIGINT."""
NUL = "a\x00b"


@pytest.fixture
def client(database: Database, clock: Clock, tmp_path: Path) -> Iterator[httpx.Client]:
    with database.begin() as conn:
        write_messages(
            conn,
            [
                received(status("cam-1"), at=clock()),
                received(event("cam-1", "deploy.failed"), at=clock()),
            ],
        )
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000)
    with serving(app) as url, httpx.Client(base_url=url) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(resp: httpx.Response, code: int, *words: str) -> dict[str, Any]:
    """``resp`` is ``code`` in the one error shape, its detail naming ``words``."""
    assert resp.status_code == code, f"{resp.request.method} {resp.request.url}: {resp.text[:300]}"
    body = resp.json()
    assert isinstance(body["detail"], str), body
    assert set(body) <= {"detail", "errors"}, body
    for word in words:
        assert word in body["detail"], (word, body["detail"][:300])
    return dict(body)


def documented(client: httpx.Client, method: str, path: str) -> set[int]:
    op = client.get("/openapi.json").json()["paths"][path][method]
    return {int(code) for code in op["responses"]}


# --- integers past SQL BIGINT ------------------------------------------------------------


def test_integers_past_bigint_are_422_not_500_on_every_integer_parameter(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin, operator = auth(tokens["admin"]), auth(tokens["operator"])
    for big in (BIG, 2**64, 10**30):
        refused(client.delete(f"/api/v1/tokens/{big}", headers=admin), 422, "path.token_id")
        refused(client.get(f"/api/v1/devices?offset={big}", headers=admin), 422, "query.offset")
        refused(client.get(f"/api/v1/rollouts/{big}", headers=admin), 422, "path.rollout_id")
        for action in ("pause", "resume", "abort", "rollback"):
            resp = client.post(f"/api/v1/rollouts/{big}/{action}", headers=operator)
            refused(resp, 422, "path.rollout_id", "less than or equal to 9223372036854775807")
    for path in (
        "/api/v1/devices",
        "/api/v1/devices/cam-1/telemetry",
        "/api/v1/events",
        "/api/v1/devices/cam-1/events",
        "/api/v1/rollouts",
    ):
        refused(client.get(f"{path}?limit={BIG}", headers=admin), 422, "query.limit")
    for path in ("/api/v1/events", "/api/v1/devices/cam-1/events"):
        # a float beyond the double range is infinite: refused too
        refused(client.get(f"{path}?since={'9' * 400}", headers=admin), 422, "query.since")
    refused(client.get("/api/v1/devices/cam-1/telemetry?until=inf", headers=admin), 422)
    refused(client.get(f"/api/v1/rollouts/{-1}", headers=admin), 422, "path.rollout_id")


def test_the_largest_bigint_is_still_a_good_id_or_offset(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = auth(tokens["admin"])
    top = BIG - 1
    for token_id in (2**31 - 1, 1000):  # token ids are a 32-bit column
        refused(client.delete(f"/api/v1/tokens/{token_id}", headers=admin), 404, "no active token")
    refused(client.delete(f"/api/v1/tokens/{2**31}", headers=admin), 422, "path.token_id")
    refused(client.get(f"/api/v1/rollouts/{top}", headers=admin), 404)
    refused(client.post(f"/api/v1/rollouts/{top}/pause", headers=admin), 404)
    assert client.get(f"/api/v1/devices?offset={top}", headers=admin).json() == {"devices": []}
    assert client.get("/api/v1/events?since=1e300", headers=admin).json() == {"events": []}


# --- NUL characters and string lengths ---------------------------------------------------


def test_nul_in_any_string_input_is_422_naming_the_field(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = auth(tokens["admin"])
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/tokens", {"json": {"name": NUL, "role": "viewer"}}, "body.name"),
        ("POST", "/api/v1/devices/cam-1/tags", {"json": {"add": [NUL]}}, "body.add.0"),
        ("POST", "/api/v1/devices/cam-1/tags", {"json": {"remove": [NUL]}}, "body.remove.0"),
        ("GET", "/api/v1/devices", {"params": {"tag": NUL}}, "query.tag"),
        ("GET", "/api/v1/devices", {"params": {"model": NUL}}, "query.model"),
        ("GET", "/api/v1/events", {"params": {"device": NUL}}, "query.device"),
        ("GET", "/api/v1/events", {"params": {"code": NUL}}, "query.code"),
        ("GET", "/api/v1/models", {"params": {"name": NUL}}, "query.name"),
        ("GET", "/api/v1/devices/cam%00", {}, "path.device_id"),
        ("GET", "/api/v1/devices/cam%00/telemetry", {}, "path.device_id"),
        ("GET", "/api/v1/models/face%00/1.0", {}, "path.name"),
        ("GET", "/api/v1/models/face/1%00", {}, "path.version"),
        ("GET", "/api/v1/models/face/1/bundle", {"params": {"key": NUL}}, "query.key"),
        ("POST", "/api/v1/rollouts", {"json": {"model": f"f@1{NUL}", "select": ["all"]}}, "model"),
        ("POST", "/api/v1/rollouts", {"json": {"model": "f@1", "select": [NUL]}}, "select.0"),
        (
            "POST",
            "/api/v1/rollouts",
            {"json": {"model": "f@1", "select": ["all"], "stream": NUL}},
            "stream",
        ),
        (
            "POST",
            "/api/v1/rollouts",
            {"json": {"model": "f@1", "select": ["all"], "stages": NUL}},
            "stages",
        ),
        ("POST", "/api/v1/rollouts/1/abort", {"json": {"reason": NUL}}, "body.reason"),
        ("POST", "/api/v1/rollouts/1/rollback", {"json": {"reason": NUL}}, "body.reason"),
    ]
    for method, path, kw, field in cases:
        resp = client.request(method, path, headers=admin, **kw)
        body = refused(resp, 422, field)
        assert body["errors"], body


def test_string_lengths_are_bounded_and_good_names_are_kept(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = auth(tokens["admin"])
    for name in ("x" * 101, "", "line\nbreak"):
        resp = client.post("/api/v1/tokens", json={"name": name, "role": "viewer"}, headers=admin)
        refused(resp, 422, "body.name")
    for name in ("x" * 100, "Zoë's laptop (CI) — 東京"):
        resp = client.post("/api/v1/tokens", json={"name": name, "role": "viewer"}, headers=admin)
        assert resp.status_code == 201, resp.text
        assert resp.json()["name"] == name
    refused(client.get("/api/v1/events", params={"code": "c" * 101}, headers=admin), 422)
    refused(client.get("/api/v1/devices/" + "d" * 65, headers=admin), 422, "at most 64 characters")
    refused(client.get("/api/v1/devices/Cam_1", headers=admin), 422, "a device id is 1-64")
    note = {"reason": "r" * 501}
    refused(client.post("/api/v1/rollouts/1/abort", json=note, headers=admin), 422, "reason")
    multi_line = {"reason": "wrong build\nsee ticket 12"}
    # a note may span lines: accepted, and the missing rollout is what is refused
    refused(client.post("/api/v1/rollouts/1/abort", json=multi_line, headers=admin), 404)


# --- enum filters --------------------------------------------------------------------------


def test_unknown_event_level_is_422_like_unknown_rollout_state_and_both_are_enums(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    viewer = auth(tokens["viewer"])
    refused(client.get("/api/v1/events?level=bogus", headers=viewer), 422, "query.level")
    refused(client.get("/api/v1/rollouts?state=bogus", headers=viewer), 422, "query.state")
    shown = client.get("/api/v1/events?level=info", headers=viewer).json()["events"]
    assert [e["code"] for e in shown] == ["deploy.failed"]
    assert client.get("/api/v1/events?level=error", headers=viewer).json() == {"events": []}
    paths = client.get("/openapi.json").json()["paths"]
    (level,) = [p for p in paths["/api/v1/events"]["get"]["parameters"] if p["name"] == "level"]
    assert _enum(level["schema"]) == ["info", "warning", "error"]
    rollouts = paths["/api/v1/rollouts"]["get"]["parameters"]
    (state,) = [p for p in rollouts if p["name"] == "state"]
    assert _enum(state["schema"]["items"]) == [
        "active",
        "paused",
        "completed",
        "aborted",
        "rolled_back",
    ]


def _enum(schema: dict[str, Any]) -> list[str]:
    """The enum of a schema, also when it is ``anyOf: [{enum}, {type: null}]``."""
    for option in schema.get("anyOf", [schema]):
        if "enum" in option:
            return list(option["enum"])
    raise AssertionError(f"no enum in {schema}")


# --- documented refusals ---------------------------------------------------------------------


def test_every_route_documents_the_auth_and_validation_errors_it_can_answer(
    client: httpx.Client,
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, ops in paths.items():
        if not path.startswith("/api/"):
            continue
        for method, op in ops.items():
            codes = {int(c) for c in op["responses"]}
            assert {401, 403, 422, 429} <= codes, (method, path, codes)
            for code in codes - {200, 201, 206, 304, 307, 416}:
                ref = op["responses"][str(code)]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorOut"), (method, path, code, ref)
    assert {404} <= documented(client, "get", "/api/v1/devices/{device_id}")
    assert {404, 409, 413} <= documented(client, "post", "/api/v1/devices/{device_id}/tags")
    assert {404} <= documented(client, "delete", "/api/v1/tokens/{token_id}")
    assert {404, 410} <= documented(client, "get", "/api/v1/models/{name}/{version}/bundle")


def test_empty_model_upload_is_a_documented_422_saying_what_to_send(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    resp = client.post("/api/v1/models", content=b"", headers=auth(tokens["operator"]))
    refused(resp, 422, "empty upload", "send the .efb file")
    assert {409, 413, 422, 503} <= documented(client, "post", "/api/v1/models")
    op = client.get("/openapi.json").json()["paths"]["/api/v1/models"]["post"]
    assert op["requestBody"]["required"] is True
    assert "application/octet-stream" in op["requestBody"]["content"]
    junk = client.post("/api/v1/models", content=b"junk", headers=auth(tokens["operator"]))
    detail = refused(junk, 422, "bundle rejected")["detail"]
    assert "/tmp" not in detail and ".part" not in detail  # no server paths in messages


def test_empty_select_entry_is_a_documented_422_naming_what_a_selector_is(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    body = {"model": "face@1.0.0", "select": [""]}
    resp = client.post("/api/v1/rollouts", json=body, headers=auth(tokens["operator"]))
    refused(resp, 422, "body.select.0", "use all, tag=KEY:VALUE")
    schema = client.get("/openapi.json").json()["components"]["schemas"]["RolloutIn"]
    items = schema["properties"]["select"]["items"]
    assert "pattern" in items and "maxLength" in items
    assert re.search(items["pattern"], "") is None
    for selector in ("all", "tag=site:berlin", "cam-1", " cam-1 "):
        assert re.search(items["pattern"], selector), selector
    good = {"model": "face@1.0.0", "select": ["cam-1"], "stages": "1, 100%"}
    # shape accepted: the model is what is missing
    refused(client.post("/api/v1/rollouts", json=good, headers=auth(tokens["operator"])), 404)


def test_every_error_has_the_one_shape(client: httpx.Client, tokens: dict[str, str]) -> None:
    viewer = auth(tokens["viewer"])
    refused(client.get("/api/v1/devices"), 401, "missing bearer token")
    refused(client.post("/api/v1/tokens", json={}, headers=viewer), 403, "needs admin")
    refused(client.get("/api/v1/devices/cam-9", headers=viewer), 404, "no device 'cam-9'")
    refused(client.get("/api/v1/nothing", headers=viewer), 404, "no such API path /api/v1/nothing")
    put = client.put("/api/v1/tokens", headers=viewer)
    refused(put, 405, "PUT is not allowed on /api/v1/tokens")
    assert put.headers["allow"] == "GET, POST"  # every documented method, not the first route's
    bad_json = client.post(
        "/api/v1/tokens",
        content=b"{not json",
        headers={**auth(tokens["admin"]), "Content-Type": "application/json"},
    )
    refused(bad_json, 422, "not valid JSON")


# --- tags ----------------------------------------------------------------------------------


def test_a_device_keeps_at_most_64_tags_with_a_clear_409(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    op = auth(tokens["operator"])
    url = "/api/v1/devices/cam-1/tags"
    first = client.post(url, json={"add": [f"t{i}" for i in range(60)]}, headers=op)
    assert first.status_code == 200 and len(first.json()["tags"]) == 60
    over = client.post(url, json={"add": [f"u{i}" for i in range(5)]}, headers=op)
    refused(over, 409, "would have 65 tags", "at most 64 per device")
    got = client.get("/api/v1/devices/cam-1", headers=op).json()["tags"]
    assert len(got) == 60  # nothing changed
    swap = {"add": [f"u{i}" for i in range(5)], "remove": ["t0", "t1", "t2", "t3", "t4"]}
    done = client.post(url, json=swap, headers=op)
    assert done.status_code == 200 and len(done.json()["tags"]) == 60
    full = client.post(url, json={"add": ["v1", "v2", "v3", "v4"]}, headers=op)
    assert full.status_code == 200 and len(full.json()["tags"]) == 64
    too_many = {"add": [f"w{i}" for i in range(65)]}
    refused(client.post(url, json=too_many, headers=op), 422, "body.add")
    long_tag = {"add": ["k" * 30 + ":" + "v" * 34]}
    refused(client.post(url, json=long_tag, headers=op), 422, "at most 64 characters")
    refused(client.post(url, json={"add": ["site berlin"]}, headers=op), 422, "a tag is")
    refused(client.get("/api/v1/devices", params={"tag": ["x"] * 65}, headers=op), 422)


# --- body size -----------------------------------------------------------------------------


def test_json_bodies_over_a_mebibyte_are_a_documented_413(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = auth(tokens["admin"])
    big = b'{"name": "' + b"x" * (1024 * 1024) + b'", "role": "viewer"}'
    headers = {**admin, "Content-Type": "application/json"}
    refused(client.post("/api/v1/tokens", content=big, headers=headers), 413, "larger than 1048576")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield big[:1000]
        yield big[1000:]

    streamed = client.post("/api/v1/tokens", content=chunks(), headers=headers)
    refused(streamed, 413, "larger than 1048576 bytes")
    assert 413 in documented(client, "post", "/api/v1/tokens")
    assert 413 in documented(client, "post", "/api/v1/rollouts")
