"""Repository functions on SQLite and PostgreSQL: tokens, batched ingest writes, tags, retention."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from sqlalchemy import select

from controller.db.models import api_tokens, telemetry
from controller.db.session import Database
from controller.fleet.devices import (
    device_counts,
    device_records,
    get_device,
    model_counts,
    set_tags,
)
from controller.fleet.history import list_events, telemetry_history
from controller.fleet.listing import page_ids
from controller.fleet.retention import apply_retention
from controller.fleet.tokens import (
    TOKEN_PREFIX,
    create_token,
    list_tokens,
    revoke_token,
    role_allows,
    verify_token,
)
from controller.fleet.writes import write_messages
from protocol import StreamStatus
from tests.controller.conftest import Clock, event, received, reported, status
from tests.controller.conftest import telemetry as telemetry_msg


def test_tokens_are_stored_only_as_sha256_and_verified_by_role(
    database: Database, clock: Clock
) -> None:
    with database.begin() as conn:
        info, token = create_token(conn, name="ops", role="operator", now=clock())
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    with database.connect() as conn:
        row = conn.execute(select(api_tokens)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (row.token_hash, row.prefix, row.name)
    with database.begin() as conn:
        verified = verify_token(conn, token, now=clock())
        assert verified is not None and verified.id == info.id and verified.role == "operator"
        assert verify_token(conn, token + "x", now=clock()) is None
    assert role_allows("operator", "viewer")
    assert role_allows("operator", "operator")
    assert not role_allows("operator", "admin")
    assert not role_allows("nobody", "viewer")


def test_revoked_token_no_longer_verifies_and_disappears_from_the_list(
    database: Database, clock: Clock
) -> None:
    with database.begin() as conn:
        info, token = create_token(conn, name="a", role="admin", now=clock())
        create_token(conn, name="b", role="viewer", now=clock())
    with database.begin() as conn:
        assert revoke_token(conn, info.id, now=clock())
        assert not revoke_token(conn, info.id, now=clock())
    with database.begin() as conn:
        assert verify_token(conn, token, now=clock()) is None
        assert [t.name for t in list_tokens(conn)] == ["b"]
        assert [t.name for t in list_tokens(conn, include_revoked=True)] == ["a", "b"]


def test_first_message_creates_the_device_and_telemetry_is_stored(database: Database) -> None:
    items = [received(telemetry_msg("cam-1", ts=100 + i), at=500.0 + i) for i in range(3)]
    with database.begin() as conn:
        assert write_messages(conn, items) == {"cam-1"}
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
        history = telemetry_history(conn, "cam-1")
    assert device is not None
    assert (device.first_seen, device.last_seen, device.last_telemetry_at) == (500.0, 502.0, 502.0)
    assert not device.online and device.state is None
    assert [t.ts for t in history] == [100, 101, 102]
    assert history[0].spool_depth == 3 and history[0].resolution_s == 0


def test_last_will_after_online_in_the_same_batch_leaves_the_device_offline(
    database: Database,
) -> None:
    online = status("cam-1", "online", ts=2000)
    will = status("cam-1", "offline", ts=1000)  # the will carries the (older) connect time
    with database.begin() as conn:
        write_messages(conn, [received(online), received(will)])
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
    assert device is not None and not device.online and device.state == "offline"
    with database.begin() as conn:
        write_messages(conn, [received(status("cam-1", "online", ts=3000))], known={"cam-1"})
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
        counts = device_counts(conn)
    assert device is not None and device.online and device.agent_version == "1.2.3"
    assert counts == {"online": 1, "offline": 0}


def test_reported_state_sets_active_and_previous_model_and_drops_removed_streams(
    database: Database,
) -> None:
    st = status("cam-1", model="m@1")
    old = StreamStatus(name="old", source_state="running", model="m@0")
    st2 = msgspec.structs.replace(st, streams=[old])
    with database.begin() as conn:
        write_messages(conn, [received(st2)])
        write_messages(conn, [received(st)])
        write_messages(conn, [received(reported("cam-1", active="m@2", previous="m@1"))])
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
        models = model_counts(conn)
    assert device is not None
    assert [s.name for s in device.streams] == ["cam0"]
    stream = device.streams[0]
    assert (stream.active_model, stream.previous_model, stream.phase) == ("m@2", "m@1", "committed")
    assert stream.source_state == "running"
    assert device.desired_rev == 7
    assert models == {"m@2": 1}


def test_events_are_stored_with_details_and_listed_newest_first(database: Database) -> None:
    items = [
        received(event("cam-1", "deploy.started", ts=10)),
        received(event("cam-1", "deploy.committed", ts=20)),
        received(event("cam-2", "source.unreachable", ts=15)),
    ]
    with database.begin() as conn:
        write_messages(conn, items)
    with database.connect() as conn:
        all_events = list_events(conn)
        cam1 = list_events(conn, device_id="cam-1")
        coded = list_events(conn, code="source.unreachable")
    assert [e.code for e in all_events] == [
        "deploy.committed",
        "source.unreachable",
        "deploy.started",
    ]
    assert [e.ts for e in cam1] == [20, 10]
    assert cam1[0].details == {"bytes": 12, "ok": True}
    assert [e.device_id for e in coded] == ["cam-2"]


def test_tags_filter_the_device_list(database: Database) -> None:
    with database.begin() as conn:
        write_messages(conn, [received(status(d)) for d in ("a-1", "b-2", "c-3")])
        assert set_tags(conn, "a-1", add=["lab", "floor2"]) == ["floor2", "lab"]
        assert set_tags(conn, "b-2", add=["lab"]) == ["lab"]
        assert set_tags(conn, "a-1", add=["x"], remove=["floor2"]) == ["lab", "x"]
        assert set_tags(conn, "nope", add=["lab"]) is None
    with database.connect() as conn:
        assert page_ids(conn, tags=["lab"]) == ["a-1", "b-2"]
        assert page_ids(conn, tags=["lab", "x"]) == ["a-1"]
        assert page_ids(conn, online=True) == ["a-1", "b-2", "c-3"]
        assert page_ids(conn, model="m@1", limit=2) == ["a-1", "b-2"]
        assert device_records(conn, page_ids(conn))[0].tags == ["lab", "x"]


def test_retention_averages_old_raw_telemetry_into_buckets(database: Database) -> None:
    # 10 raw samples per minute over 3 minutes, starting at t=0 (bucket 60 s).
    items = [
        received(telemetry_msg(device, ts=float(t), cpu=float(t % 60)), at=1.0)
        for t in range(0, 180, 6)
        for device in ("cam-1", "cam-2")
    ]
    with database.begin() as conn:
        write_messages(conn, items)
    result = apply_retention(
        database.begin,
        now=150.0 + 100,  # raw cutoff 150 -> only the buckets [0,60) and [60,120) fold
        telemetry_raw_s=100,
        telemetry_downsample_s=60,
        telemetry_downsampled_s=10_000,
        events_s=10_000,
    )
    assert result.downsampled_rows == 40 and result.buckets_written == 4
    with database.connect() as conn:
        rows = telemetry_history(conn, "cam-1")
        assert len(telemetry_history(conn, "cam-2")) == 2 + 10
    averaged = [r for r in rows if r.resolution_s == 60]
    raw = [r for r in rows if r.resolution_s == 0]
    assert [(r.ts, r.samples) for r in averaged] == [(0, 10), (60, 10)]
    assert averaged[0].cpu_percent == pytest.approx(27.0)  # mean of 0, 6, ..., 54
    assert averaged[0].spool_depth == 3 and averaged[0].mem_used_bytes == 1000
    assert [r.ts for r in raw] == list(range(120, 180, 6))


def test_retention_deletes_old_averages_events_and_raw_samples_when_not_downsampling(
    database: Database,
) -> None:
    with database.begin() as conn:
        write_messages(
            conn,
            [
                received(telemetry_msg("cam-1", ts=10.0)),
                received(telemetry_msg("cam-1", ts=990.0)),
                received(event("cam-1", ts=10.0)),
                received(event("cam-1", ts=990.0)),
            ],
        )
        conn.execute(
            telemetry.insert().values(
                device_id="cam-1",
                ts=5.0,
                resolution_s=300,
                samples=30,
                interval_s=300,
                cpu_percent=1,
                mem_percent=1,
                mem_used_bytes=1,
                disk_percent=1,
                disk_free_bytes=1,
                spool_depth=0,
                spool_dropped=0,
                streams=[],
            )
        )
    result = apply_retention(
        database.begin,
        now=1000.0,
        telemetry_raw_s=100,
        telemetry_downsample_s=0,
        telemetry_downsampled_s=500,
        events_s=500,
    )
    assert (result.deleted_raw, result.deleted_downsampled, result.deleted_events) == (1, 1, 1)
    with database.connect() as conn:
        assert [r.ts for r in telemetry_history(conn, "cam-1")] == [990.0]
        assert [e.ts for e in list_events(conn)] == [990.0]
