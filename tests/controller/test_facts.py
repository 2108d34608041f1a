"""Hardware/runtime facts from the device status land in the devices table."""

from __future__ import annotations

import msgspec

from controller.db.session import Database
from controller.fleet.devices import get_device
from controller.fleet.writes import write_messages
from tests.controller.conftest import received, status


def test_status_facts_are_stored_on_the_device(database: Database) -> None:
    facts = {
        "arch": "aarch64",
        "board": "Raspberry Pi 5 Model B",
        "cpu_count": 4,
        "runtimes": "litert",
    }
    msg = msgspec.structs.replace(status("cam-1"), facts=facts)
    with database.begin() as conn:
        write_messages(conn, [received(msg)])
    with database.connect() as conn:
        device = get_device(conn, "cam-1")
    assert device is not None
    assert device.facts == facts
