"""The last will after an agent crash: the controller keeps showing each stream's model.

Outside testers saw a device with no model after ``kill -9`` of its agent: the will, built
when the agent connected, said ``model: null`` per stream, and the controller wrote that
over what the retained ``reported`` state said. The agent's will now claims nothing about
the streams; the controller does not clear a stream's active model on an offline status
(older agents still send such wills).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.db import Database
from controller.fleet.devices import get_device
from controller.fleet.writes import Received, write_messages
from protocol import SCHEMA_VERSION, Status, StreamStatus
from tests.agent_proc import VIDEO, start_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.controller.conftest import Cli, pg_url  # noqa: F401 - the pg_url fixture
from tests.controller.controller_proc import ControllerProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

MODEL = "blazeface-short-int8@1.0.0"


@pytest.fixture
def controller(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[ControllerProcess]:
    """The controller as a real process on SQLite, ingesting from the test broker."""
    (tmp_path / "ctl").mkdir()
    ctl = ControllerProcess(tmp_path / "ctl", f"sqlite:///{tmp_path / 'ctl.db'}", mosquitto)
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


def test_kill_9_leaves_the_device_offline_with_its_models(
    controller: ControllerProcess, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cli = Cli(tmp_path)
    token = cli.json("tokens", "create", "--role", "viewer", "--config", str(controller.config))
    viewer = token["token"]

    def device() -> Any:
        return cli.json("--url", controller.url, "--token", viewer, "devices", "show", "will-01")[
            "device"
        ]

    def listed() -> Any:
        found = cli.json("--url", controller.url, "--token", viewer, "devices", "list")
        return next((d for d in found if d["id"] == "will-01"), None)

    streams = stream_block("front", source=str(VIDEO), extra="fps = 2") + stream_block(
        "back", source=str(VIDEO), extra="fps = 2"
    )
    config = write_config(tmp_path, port=mosquitto.port, device_id="will-01", streams=streams)
    proc = start_agent(config, tmp_path / "agent.log")
    try:

        def online_with_models() -> bool:
            d = listed()
            return bool(
                d
                and d["state"] == "online"
                and sorted((s["name"], s["active_model"]) for s in d["streams"])
                == [("back", MODEL), ("front", MODEL)]
            )

        wait_for(online_with_models, timeout=30, what="the device online with both models")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = wait_for(
        lambda: (d := device()) and d["state"] == "offline" and d,
        timeout=20,
        what="the controller to see the last will (device offline)",
    )
    assert shown["online"] is False
    models = {s["name"]: s["active_model"] for s in shown["streams"]}
    assert models == {"front": MODEL, "back": MODEL}, shown["streams"]


def _status(state: str, model: str | None, *, ts: float) -> Received:
    status = Status(
        schema=SCHEMA_VERSION,
        device_id="old-01",
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version="0.1.0",
        started_at=1000.0,
        streams=[StreamStatus(name="front", source_state="running", model=model, error=None)],
    )
    return Received("edgefleet/v1/old-01/status", "old-01", status, ts)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database: SQLite (a file) and PostgreSQL (a fresh schema)."""
    url = (
        f"sqlite:///{tmp_path / 'fleet.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    db = Database.from_url(url)
    db.upgrade()
    yield db
    db.dispose()


def _active(db: Database) -> str | None:
    with db.engine.connect() as conn:
        view = get_device(conn, "old-01")
    assert view is not None
    return view.streams[0].active_model


def test_offline_status_with_null_models_keeps_the_active_model(database: Database) -> None:
    """An older agent's will (``model: null`` per stream) must not clear the model; an online
    status that says a stream runs no model (it failed to load) still does."""
    with database.engine.begin() as conn:
        write_messages(conn, [_status("online", MODEL, ts=1000.0)])
    assert _active(database) == MODEL
    with database.engine.begin() as conn:
        write_messages(conn, [_status("offline", None, ts=1001.0)])
    assert _active(database) == MODEL
    with database.engine.begin() as conn:
        write_messages(conn, [_status("online", None, ts=1002.0)])
    assert _active(database) is None
