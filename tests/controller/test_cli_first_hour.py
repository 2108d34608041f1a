"""Issue 11, "an operator's first hour": the device commands of the CLI, over real HTTP.

- ``devices tag cam-01 site=lab`` answered with a raw regular expression: now the CLI says
  in words what a tag may hold, with an example, and the API does too;
- ``devices show`` said "uptime 0s" for a device up for minutes (it took the status
  message's time, sent at start, as "now");
- "1 devices": plural forms;
- the stream table's SOURCE column held a state;
- reason codes were cut (``no_truste…``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from controller.api import create_app
from controller.api.params import TAG_PATTERN
from controller.db.session import Database
from controller.fleet.registry import add_model
from controller.fleet.writes import Received, write_messages
from controller.rollouts import commands
from protocol import Reported, Status, StreamReport, StreamStatus
from tests.controller.conftest import Cli, Clock, serving

REASON = "no_trusted_keys_configured_for_bundles"
"""A long reason code (snake case, no spaces): it must show whole."""


@pytest.fixture
def api(database: Database, clock: Clock) -> Iterator[str]:
    with serving(create_app(db=database, clock=clock)) as url:
        yield url


@pytest.fixture
def cli(api: str, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    c = Cli(tmp_path_factory.mktemp("cli"), url=api, token=tokens["operator"])
    c.env["COLUMNS"] = "80"
    return c


def _device(database: Database, device_id: str, *, started_ago: float, reason: str = "") -> None:
    """A device whose agent started ``started_ago`` seconds ago and sent its status then."""
    now = time.time()
    started = now - started_ago
    status = Status(
        schema=1,
        device_id=device_id,
        state="online",
        ts=started,
        agent_version="1.0",
        started_at=started,
        streams=[StreamStatus(name="front", source_state="running", model="base@1")],
    )
    report = Reported(
        schema=1,
        device_id=device_id,
        ts=now,
        desired_rev=None,
        streams={
            "front": StreamReport(
                active="base@1", phase="failed", target="face@2", reason=reason or None
            )
        },
    )
    with database.begin() as conn:
        write_messages(
            conn,
            [
                Received(topic="t", device_id=device_id, message=status, received_at=now),
                Received(topic="t", device_id=device_id, message=report, received_at=now),
            ],
        )


def test_a_bad_tag_is_refused_in_words_with_an_example(
    cli: Cli, database: Database, api: str, tokens: dict[str, str]
) -> None:
    _device(database, "cam-01", started_ago=10)
    refused = cli("devices", "tag", "cam-01", "site=lab")
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.startswith("error: invalid tag 'site=lab': a tag is 1-64 characters")
    assert "(e.g. site:berlin)" in refused.stderr and "did you mean site:lab?" in refused.stderr
    assert TAG_PATTERN not in refused.output and "[A-Za-z" not in refused.output
    # The API (what other clients get) says it in words too.
    answer = httpx.post(
        f"{api}/api/v1/devices/cam-01/tags",
        json={"add": ["site=lab"], "remove": []},
        headers={"Authorization": f"Bearer {tokens['operator']}"},
    )
    assert answer.status_code == 422
    assert "a tag is 1-64 characters" in answer.json()["detail"]
    assert "[A-Za-z" not in answer.text
    # Good input still goes through.
    tagged = cli("devices", "tag", "cam-01", "site:lab", "lab")
    assert tagged.exit_code == 0, tagged.output
    assert tagged.stdout.strip() == "cam-01: lab, site:lab"


def test_devices_show_uptime_columns_and_uncut_reason(cli: Cli, database: Database) -> None:
    _device(database, "cam-01", started_ago=312, reason=REASON)
    shown = cli("devices", "show", "cam-01")
    assert shown.exit_code == 0, shown.output
    uptime = re.search(r"uptime (\S+),", shown.stdout)
    assert uptime is not None, shown.stdout
    assert uptime.group(1) in {"5m12s", "5m13s", "5m14s"}, shown.stdout
    assert "SOURCE STATE" in shown.stdout and "running" in shown.stdout
    assert REASON in shown.stdout, shown.stdout  # never "no_truste…"
    assert "…" not in shown.stdout


def test_counts_use_plural_forms(cli: Cli, database: Database) -> None:
    _device(database, "cam-01", started_ago=10)
    one = cli("devices", "list")
    assert one.exit_code == 0 and "1 device, 1 online" in one.stdout, one.output
    _device(database, "cam-02", started_ago=10)
    assert "2 devices, 2 online" in cli("devices", "list").stdout
    models = cli("model", "list")
    assert models.exit_code == 0 and "0 models" in models.stdout, models.output
    with database.begin() as conn:
        add_model(
            conn, name="face", version="2", sha256="ab" * 32, size=1234, runtime="litert",
            manifest={}, signature="c2ln", key_id=None, now=time.time(),
        )  # fmt: skip
        commands.create_rollout(
            conn, commands.RolloutRequest(model="face@2", select=["all"]), now=time.time()
        )
    models = cli("model", "list")
    assert models.exit_code == 0 and "1 model\n" in models.stdout, models.output
    rollouts = cli("rollout", "list")
    assert rollouts.exit_code == 0 and "1 rollout\n" in rollouts.stdout, rollouts.output
