"""The fleet listing (controller.fleet.listing, GET /api/v1/fleet and the new GET
/api/v1/devices parameters) on SQLite and PostgreSQL: every sort key in both orders with
missing values last, stable paging, filters, counts, the telemetry summary written by the
real ingest path, and the API's 422s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select

from controller.api import create_app
from controller.db.models import device_streams, devices
from controller.db.session import Database
from controller.errors import ControllerError
from controller.fleet import listing
from controller.fleet.credentials import issue_credential, revoke_credential
from controller.fleet.devices import set_tags
from controller.fleet.listing import FleetQueryError, fleet_page, page_ids
from controller.ingest.writer import Ingestor
from protocol import (
    Reported,
    Status,
    StreamStatus,
    StreamTelemetry,
    Telemetry,
    encode,
    reported_topic,
    status_topic,
    telemetry_topic,
)
from tests.controller.conftest import Clock, serving

IDS = [f"cam-{i:02d}" for i in range(10)] + ["dock-1", "gate-a", "gate-b"]
REVOKED = "dock-1"


class Ticker:
    """Receipt times 1, 2, 3, ...: every message a device sends moves its last_seen."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def stream_telemetry(name: str, fps: float, p95: float | None) -> StreamTelemetry:
    return StreamTelemetry(
        name=name,
        source_state="running",
        fps=fps,
        frames_captured=100,
        frames_processed=90,
        frames_dropped=10,
        infer_ms_p50=None if p95 is None else p95 / 2,
        infer_ms_p95=p95,
        latency_ms_p50=None,
        latency_ms_p95=None if p95 is None else p95 + 7,
    )


def telemetry_msg(
    device_id: str,
    *,
    cpu: float,
    temp: float | None = 50.0,
    streams: list[StreamTelemetry] | None = None,
    ts: float = 1000.0,
) -> Telemetry:
    return Telemetry(
        schema=1,
        device_id=device_id,
        ts=ts,
        interval_s=10.0,
        cpu_percent=cpu,
        mem_percent=cpu / 2,
        mem_used_bytes=1000,
        temp_c=temp,
        disk_percent=30.0,
        disk_free_bytes=2000,
        spool_depth=0,
        spool_dropped=0,
        streams=streams or [],
    )


def status_msg(device_id: str, state: str, agent: str, models: dict[str, str]) -> Status:
    return Status(
        schema=1,
        device_id=device_id,
        state=state,  # type: ignore[arg-type]
        ts=1000.0,
        agent_version=agent,
        started_at=990.0,
        streams=[StreamStatus(name=n, source_state="running", model=m) for n, m in models.items()],
    )


def ingest(database: Database, messages: list[Status | Telemetry | Reported], **kw: Any) -> None:
    """Through the controller's ingestor: encoded protocol messages, decoded and batched."""
    topics = {Status: status_topic, Telemetry: telemetry_topic, Reported: reported_topic}
    ingestor = Ingestor(db=database, batch_size=kw.pop("batch_size", 1000), **kw)
    for m in messages:
        assert ingestor.handle(topics[type(m)](m.device_id), encode(m)) == "queued"
    assert ingestor.write_pending() == len(messages)
    assert ingestor.snapshot().stored == len(messages)


@dataclass(frozen=True)
class Fleet:
    online: set[str]
    tags: dict[str, list[str]]
    models: dict[str, set[str]]


@pytest.fixture
def fleet(database: Database) -> Fleet:
    """13 devices with ties and gaps: no status (state, agent and streams missing), no
    telemetry (cpu, temp, fps missing), no temperature, no p95; one revoked."""
    messages: list[Status | Telemetry | Reported] = []
    online: set[str] = set()
    models: dict[str, set[str]] = {}
    for i, device_id in enumerate(IDS):
        if i % 5 != 4:
            state = "offline" if i % 3 == 1 else "online"
            pair = {"cam0": f"blazeface@{1 + i % 2}.0", "cam1": "yolo@3.0"}
            messages.append(status_msg(device_id, state, f"1.{i % 4}.0", pair))
            if state == "online":  # an offline status leaves active_model unset
                models[device_id] = set(pair.values())
                online.add(device_id)
        if i % 4 != 3:
            streams = [
                stream_telemetry(
                    "cam0", fps=float(i % 3) * 5, p95=None if i % 6 == 0 else 10.0 + i
                ),
                stream_telemetry("cam1", fps=float(i % 2) * 12, p95=20.0 - i),
            ]
            temp = None if i % 3 == 0 else 40.0 + i % 4
            messages.append(
                telemetry_msg(device_id, cpu=float(i % 3) * 25, temp=temp, streams=streams)
            )
    ingest(database, messages, clock=Ticker())
    tags: dict[str, list[str]] = {}
    with database.begin() as conn:
        for i, device_id in enumerate(IDS):
            tags[device_id] = ["site:berlin" if i % 2 == 0 else "site:paris"] + (
                ["lab"] if i < 3 else []
            )
            assert set_tags(conn, device_id, add=tags[device_id]) == sorted(tags[device_id])
        issue_credential(conn, REVOKED, now=1.0)
        assert revoke_credential(conn, REVOKED, now=2.0)
    online.discard(REVOKED)
    return Fleet(online=online, tags=tags, models=models)


def stored_keys(database: Database) -> dict[str, dict[str, Any]]:
    """Each device's sort values as the tables hold them, read with plain SQL."""
    fps = func.max(device_streams.c.fps)
    p95 = func.max(device_streams.c.infer_ms_p95)
    per_stream = {
        device_id: (f, p)
        for device_id, f, p in _rows(
            database,
            select(device_streams.c.device_id, fps, p95).group_by(device_streams.c.device_id),
        )
    }
    out = {}
    for r in _rows(database, select(devices)):
        f, p = per_stream.get(r.id, (None, None))
        out[r.id] = {
            "id": r.id,
            "state": r.state,
            "last_seen": r.last_seen,
            "cpu": r.cpu_percent,
            "temp": r.temp_c,
            "agent": r.agent_version,
            "fps": f,
            "p95": p,
        }
    return out


def _rows(database: Database, query: Any) -> list[Any]:
    with database.connect() as conn:
        return list(conn.execute(query))


def expected_order(keys: dict[str, dict[str, Any]], sort: str, order: str) -> list[str]:
    """Values in ``order``, ties by ascending id, missing values last (Python's sort is
    stable, also with ``reverse``)."""
    present = sorted((k for k in keys.values() if k[sort] is not None), key=lambda k: k["id"])
    present.sort(key=lambda k: k[sort], reverse=order == "desc")
    missing = sorted(k["id"] for k in keys.values() if k[sort] is None)
    return [k["id"] for k in present] + missing


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("sort", listing.SORT_KEYS)
def test_every_sort_key_orders_both_ways_with_missing_values_last(
    database: Database, fleet: Fleet, sort: str, order: str
) -> None:
    keys = stored_keys(database)
    if sort not in {"id", "last_seen"}:
        assert any(k[sort] is None for k in keys.values()), f"the fleet lacks a missing {sort}"
    values = [k[sort] for k in keys.values() if k[sort] is not None]
    assert len(values) > len(set(values)) or sort in {"id", "last_seen"}, "no tie to break"
    want = expected_order(keys, sort, order)
    with database.connect() as conn:
        assert page_ids(conn, sort=sort, order=order, limit=100) == want
        # Paging: every page in turn gives the same order, each device exactly once.
        paged: list[str] = []
        for offset in range(0, len(IDS) + 3, 3):
            page = fleet_page(conn, sort=sort, order=order, limit=3, offset=offset)
            assert page.total == len(IDS)
            paged += [r.id for r in page.rows]
    assert paged == want
    assert sorted(paged) == sorted(IDS)


def test_rows_carry_the_summary_tags_and_streams(database: Database, fleet: Fleet) -> None:
    with database.connect() as conn:
        page = fleet_page(conn, q="cam-02")
    assert page.total == 1
    (row,) = page.rows
    assert (row.id, row.online, row.state, row.agent_version) == ("cam-02", True, "online", "1.2.0")
    assert (row.cpu_percent, row.mem_percent, row.temp_c) == (50.0, 25.0, 42.0)
    assert row.tags == ["lab", "site:berlin"]
    assert [
        (s.name, s.active_model, s.fps, s.infer_ms_p95, s.latency_ms_p95) for s in row.streams
    ] == [
        ("cam0", "blazeface@1.0", 10.0, 12.0, 19.0),
        ("cam1", "yolo@3.0", 0.0, 18.0, 25.0),
    ]
    with database.connect() as conn:
        (bare,) = fleet_page(conn, q="cam-04").rows
    assert (bare.state, bare.agent_version, bare.streams, bare.cpu_percent) == (
        None,
        None,
        [],
        25.0,
    )


def test_filters_by_text_tag_model_and_state_with_totals(database: Database, fleet: Fleet) -> None:
    def ids(**kw: Any) -> tuple[list[str], int]:
        with database.connect() as conn:
            page = fleet_page(conn, limit=100, **kw)
        return [r.id for r in page.rows], page.total

    assert ids(q="GATE") == (["gate-a", "gate-b"], 2)  # id substring, any case
    assert ids(q="-0")[1] == 10
    berlin = sorted(d for d, t in fleet.tags.items() if "site:berlin" in t)
    assert ids(q="berlin") == (berlin, len(berlin))  # a tag
    assert ids(q="LAB") == (["cam-00", "cam-01", "cam-02"], 3)
    yolo = sorted(d for d, m in fleet.models.items() if "yolo@3.0" in m)
    assert ids(q="yolo@") == (yolo, len(yolo))  # a model
    assert ids(q="%") == ([], 0)  # LIKE wildcards are literal
    assert ids(q="_") == ([], 0)
    assert ids(q="") == (sorted(IDS), len(IDS))  # empty: no filter
    assert ids(tags=["lab", "site:paris"]) == (["cam-01"], 1)
    b2 = sorted(d for d, m in fleet.models.items() if "blazeface@2.0" in m)
    assert b2 and ids(model="blazeface@2.0") == (b2, len(b2))
    assert ids(model="blazeface@2") == ([], 0)  # the model filter is exact
    assert ids(state="online") == (sorted(fleet.online), len(fleet.online))
    assert ids(state="revoked") == ([REVOKED], 1)
    offline = sorted(set(IDS) - fleet.online - {REVOKED})
    assert ids(state="offline") == (offline, len(offline))
    # total counts every match, not only the page's rows
    with database.connect() as conn:
        page = fleet_page(conn, state="offline", limit=2, offset=1)
    assert [r.id for r in page.rows] == offline[1:3] and page.total == len(offline)
    with database.connect() as conn:
        beyond = fleet_page(conn, q="cam", offset=50)
    assert beyond.rows == [] and beyond.total == 10
    with database.connect() as conn:  # the total of a filtered, grouped (per-stream) sort
        grouped = fleet_page(conn, q="cam", sort="p95", order="desc", limit=2)
    assert len(grouped.rows) == 2 and grouped.total == 10


def test_counts_cover_the_whole_fleet_whatever_the_filters(
    database: Database, fleet: Fleet
) -> None:
    with database.connect() as conn:
        page = fleet_page(conn, q="gate-a", state="online")
    want = {
        "total": len(IDS),
        "online": len(fleet.online),
        "offline": len(IDS) - len(fleet.online) - 1,
        "revoked": 1,
    }
    assert page.counts == want
    assert page.counts["online"] + page.counts["offline"] + page.counts["revoked"] == len(IDS)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"sort": "name"}, "unknown sort key 'name': use one of id, state"),
        ({"order": "up"}, "unknown sort order 'up': use asc or desc"),
        ({"state": "zombie"}, "unknown state filter 'zombie': use one of online, offline, revoked"),
        ({"limit": 0}, "limit 0 is out of range: use 1 to 10000"),
        ({"offset": -1}, "offset -1 is negative"),
        ({"q": "x" * 201}, "at most 200"),
    ],
)
def test_bad_arguments_are_refused_with_a_controller_value_error(
    database: Database, kw: dict[str, Any], words: str
) -> None:
    with database.connect() as conn, pytest.raises(FleetQueryError) as info:
        fleet_page(conn, **kw)
    assert words in str(info.value)
    assert isinstance(info.value, ControllerError) and isinstance(info.value, ValueError)


# --- ingest --------------------------------------------------------------------------


def summary(database: Database, device_id: str) -> tuple[Any, ...]:
    with database.connect() as conn:
        row = conn.execute(
            select(devices.c.cpu_percent, devices.c.mem_percent, devices.c.temp_c).where(
                devices.c.id == device_id
            )
        ).one()
        streams = conn.execute(
            select(
                device_streams.c.name,
                device_streams.c.fps,
                device_streams.c.infer_ms_p95,
                device_streams.c.latency_ms_p95,
            )
            .where(device_streams.c.device_id == device_id)
            .order_by(device_streams.c.name)
        ).all()
    return tuple(row), [tuple(s) for s in streams]


def test_ingested_telemetry_sets_the_summary_latest_in_a_batch_wins(database: Database) -> None:
    two = {"cam0": "m@1", "cam1": "m@1"}
    ingest(
        database,
        [
            status_msg("pi-1", "online", "1.0.0", two),
            telemetry_msg("pi-1", cpu=10.0, streams=[stream_telemetry("cam1", 3.0, 30.0)]),
            telemetry_msg(
                "pi-1",
                cpu=20.0,
                temp=None,
                streams=[stream_telemetry("cam0", 5.0, None), stream_telemetry("ghost", 9.0, 1.0)],
            ),
            telemetry_msg("pi-2", cpu=70.0, streams=[stream_telemetry("cam0", 1.0, 2.0)]),
        ],
    )
    # pi-1: the second telemetry wins whole (cam1 was only in the first); no ghost row;
    # pi-2 has no stream rows (no status): only its device row changes.
    assert summary(database, "pi-1") == (
        (20.0, 10.0, None),
        [("cam0", 5.0, None, None), ("cam1", None, None, None)],
    )
    assert summary(database, "pi-2") == ((70.0, 35.0, 50.0), [])
    ingest(
        database, [telemetry_msg("pi-1", cpu=30.0, streams=[stream_telemetry("cam1", 4.0, 8.0)])]
    )
    assert summary(database, "pi-1") == (
        (30.0, 15.0, 50.0),
        [("cam0", 5.0, None, None), ("cam1", 4.0, 8.0, 15.0)],
    )
    ingest(database, [status_msg("pi-2", "online", "1.0.0", {})])  # a batch without telemetry
    assert summary(database, "pi-2") == ((70.0, 35.0, 50.0), [])
    with database.connect() as conn:
        (row,) = fleet_page(conn, q="pi-1").rows
    assert (row.cpu_percent, [s.fps for s in row.streams]) == (30.0, [5.0, 4.0])


def test_the_summary_is_written_in_two_batched_statements(database: Database) -> None:
    """One executemany per summary table however many devices a batch has (no per-device
    statement). On PostgreSQL the devices' summary rides on the statement that creates and
    locks the batch's device rows (written anyway), so no UPDATE of devices runs for it."""
    ids = [f"pi-{i}" for i in range(40)]
    ingest(database, [status_msg(d, "online", "1.0.0", {"cam0": "m@1"}) for d in ids])
    statements: list[tuple[str, bool, int]] = []

    def seen(_conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        verb = sql.lstrip().split()[0].upper()
        if verb in ("UPDATE", "INSERT") and ("cpu_percent" in sql or "fps" in sql):
            table = sql.split()[1 if verb == "UPDATE" else 2]
            if table != "telemetry":  # its rows carry the samples, not the summary
                statements.append((f"{verb} {table}", many, len(params) if many else 1))

    event.listen(database.engine, "before_cursor_execute", seen)
    try:
        ingest(
            database,
            [
                telemetry_msg(d, cpu=float(i), streams=[stream_telemetry("cam0", float(i), 1.0)])
                for i, d in enumerate(ids)
            ],
        )
    finally:
        event.remove(database.engine, "before_cursor_execute", seen)
    devices_statement = (
        "INSERT devices" if database.engine.dialect.name == "postgresql" else "UPDATE devices"
    )
    assert sorted(statements) == sorted(
        [("UPDATE device_streams", True, 40), (devices_statement, True, 40)]
    )
    with database.connect() as conn:
        assert [r.id for r in fleet_page(conn, sort="fps", order="desc", limit=3).rows] == [
            "pi-39",
            "pi-38",
            "pi-37",
        ]


# --- HTTP API ------------------------------------------------------------------------


@pytest.fixture
def api(
    database: Database, fleet: Fleet, tokens: dict[str, str], clock: Clock
) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {tokens['viewer']}"}
    with (
        serving(create_app(db=database, clock=clock)) as url,
        httpx.Client(base_url=url, headers=headers) as c,
    ):
        yield c


def test_fleet_endpoint_answers_the_page_as_json(api: httpx.Client, fleet: Fleet) -> None:
    resp = api.get(
        "/api/v1/fleet", params={"sort": "cpu", "order": "desc", "limit": 2, "tag": "site:berlin"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"rows", "total", "counts", "limit", "offset", "sort", "order"}
    assert body["total"] == sum(1 for t in fleet.tags.values() if "site:berlin" in t)
    assert body["counts"]["total"] == len(IDS) and body["counts"]["revoked"] == 1
    first = body["rows"][0]
    assert first["cpu_percent"] == 50.0 and "site:berlin" in first["tags"]
    assert set(first["streams"][0]) == {
        "name",
        "active_model",
        "fps",
        "infer_ms_p95",
        "latency_ms_p95",
        "phase",
    }
    default = api.get("/api/v1/fleet").json()
    assert (default["limit"], default["sort"], default["order"]) == (50, "id", "asc")
    assert [r["id"] for r in default["rows"]] == sorted(IDS)


def test_devices_endpoint_takes_q_state_sort_and_order(api: httpx.Client, fleet: Fleet) -> None:
    plain = api.get("/api/v1/devices").json()
    assert set(plain) == {"devices"} and [d["id"] for d in plain["devices"]] == sorted(IDS)
    assert "facts" in plain["devices"][0]  # still the full record
    found = api.get("/api/v1/devices", params={"q": "gate", "sort": "id", "order": "desc"})
    assert [d["id"] for d in found.json()["devices"]] == ["gate-b", "gate-a"]
    revoked = api.get("/api/v1/devices", params={"state": "revoked"}).json()["devices"]
    assert [d["id"] for d in revoked] == [REVOKED]
    by_cpu = api.get("/api/v1/devices", params={"sort": "cpu", "order": "desc", "limit": 3})
    top = [d["id"] for d in by_cpu.json()["devices"]]
    assert top == ["cam-02", "cam-05", "cam-08"]
    # online=false and state=offline together: both apply
    both = api.get("/api/v1/devices", params={"online": "false", "state": "offline"}).json()
    assert sorted(d["id"] for d in both["devices"]) == sorted(set(IDS) - fleet.online - {REVOKED})


@pytest.mark.parametrize("path", ["/api/v1/fleet", "/api/v1/devices"])
@pytest.mark.parametrize(
    ("params", "where", "words"),
    [
        ({"sort": "name"}, "query.sort", "'id', 'state', 'last_seen', 'cpu', 'temp', 'fps', 'p95'"),
        ({"order": "up"}, "query.order", "'asc' or 'desc'"),
        ({"state": "zombie"}, "query.state", "'online', 'offline' or 'revoked'"),
        ({"q": "a\nb"}, "query.q", "must not contain control characters"),
        ({"q": "x" * 201}, "query.q", "at most 200 characters"),
    ],
)
def test_bad_listing_parameters_get_422_in_the_error_shape(
    api: httpx.Client, path: str, params: dict[str, str], where: str, words: str
) -> None:
    resp = api.get(path, params=params)
    assert resp.status_code == 422
    body = resp.json()
    assert body["detail"].startswith(f"invalid request: {where}: ")
    assert words in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [where.split(".")]


def test_fleet_limit_is_bounded(api: httpx.Client) -> None:
    assert api.get("/api/v1/fleet", params={"limit": 1001}).status_code == 422
    assert api.get("/api/v1/fleet", params={"limit": 1000}).status_code == 200
