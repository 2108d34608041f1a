"""The agent is back soon after a broker outage: ``[broker] reconnect_max_s`` (real Mosquitto).

Outside testers saw an agent come back 43 s after the broker did: its reconnect backoff grew
to 60 s and could not be configured. Now the wait between two attempts is at most
``reconnect_max_s`` (default 10 s), so after the broker is back the agent connects again
within that (plus the time a connect takes).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from agent.config import BrokerConfig, parse_config
from agent.errors import ConfigError
from protocol.topics import status_topic
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.mqtt_sub import Received, Subscriber
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

OUTAGE_S = 15.0
MARGIN_S = 3.0
"""A connect attempt itself, and a loaded test machine."""


def _connects(broker: Mosquitto, client_id: str) -> int:
    """How often ``client_id`` connected, from the broker's own log."""
    text = broker.log_path.read_text(errors="replace") if broker.log_path.exists() else ""
    return len(re.findall(rf"New client connected from \S+ as {re.escape(client_id)}\b", text))


def test_agents_reconnect_within_reconnect_max_s_after_an_outage(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    default_max = BrokerConfig().reconnect_max_s
    assert default_max <= 10.0
    agents = {"fast": 2.0, "default": None}
    procs = {}
    logs = {}
    for name, max_s in agents.items():
        workdir = tmp_path / name
        workdir.mkdir()
        broker_keys = f"reconnect_max_s = {max_s}\n" if max_s is not None else ""
        config = write_config(
            workdir,
            port=mosquitto.port,
            device_id=f"re-{name}",
            streams=stream_block("front", source=str(VIDEO), extra="fps = 2"),
        )
        # write_config has no [broker] keys of its own beyond url: add ours to that table.
        text = config.read_text().replace("[broker]\n", f"[broker]\n{broker_keys}", 1)
        config.write_text(text)
        logs[name] = workdir / "agent.log"
        procs[name] = start_agent(config, logs[name])
    try:

        def connects(name: str) -> int:
            return _connects(mosquitto, f"edgefleet-agent-re-{name}")

        wait_for(
            lambda: all(connects(name) for name in agents),
            timeout=30,
            what="both agents to connect",
        )
        mosquitto.stop()
        before = {name: connects(name) for name in agents}
        threading.Event().wait(OUTAGE_S)
        for name, proc in procs.items():
            assert proc.poll() is None, logs[name].read_text(errors="replace")[-3000:]
        mosquitto.start()
        back = time.monotonic()
        back_wall = time.time()
        came_back: dict[str, float] = {}

        def all_back() -> bool:
            for name in agents:
                if name not in came_back and connects(name) > before[name]:
                    came_back[name] = time.monotonic() - back
            return len(came_back) == len(agents)

        wait_for(
            all_back,
            timeout=default_max + MARGIN_S,
            what=lambda: f"both agents to reconnect; back so far: {came_back}",
        )
        for name, max_s in agents.items():
            assert came_back[name] <= (max_s or default_max) + MARGIN_S, came_back
        # The status each agent retains after the reconnect is a fresh one (its ts is after
        # the broker came back), not the payload from before the outage sent again: the
        # controller's "last status" must move when a device comes back.
        watcher = Subscriber(
            mosquitto.port, [status_topic(f"re-{n}") for n in agents], persistent=False
        )
        try:

            def fresh(messages: list[Received]) -> bool:
                newest = {}
                for m in messages:
                    status = json.loads(m.payload)
                    newest[status["device_id"]] = (status["state"], status["ts"])
                return all(
                    newest.get(f"re-{n}", ("", 0.0))[0] == "online"
                    and newest[f"re-{n}"][1] >= back_wall - 1.0
                    for n in agents
                )

            watcher.wait_for(fresh, timeout=10)
        finally:
            watcher.close()
        for name, proc in procs.items():
            code, _ = stop_agent(proc)
            assert code == 0, logs[name].read_text(errors="replace")[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


CONFIG = """device_id = "cam-01"
[broker]
{broker}
[[streams]]
name = "front"
source = "clip.mp4"
model = "builtin:blazeface-short-int8"
"""


@pytest.mark.parametrize("value", ["1", "2.5", "300"])
def test_reconnect_max_s_accepts_values_within_bounds(value: str) -> None:
    config = parse_config(CONFIG.format(broker=f"reconnect_max_s = {value}"), source="a.toml")
    assert config.broker.reconnect_max_s == float(value)


def test_reconnect_max_s_defaults_to_10_s() -> None:
    assert parse_config(CONFIG.format(broker=""), source="a.toml").broker.reconnect_max_s == 10.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("reconnect_max_s = 0.5", "a.toml:3: broker.reconnect_max_s must be in 1..300"),
        ("reconnect_max_s = 301", "a.toml:3: broker.reconnect_max_s must be in 1..300"),
        ('reconnect_max_s = "10"', "a.toml:3: broker.reconnect_max_s: Expected `float`"),
        ("reconnect_max = 10", "a.toml:3: unknown key 'reconnect_max' in broker"),
    ],
)
def test_reconnect_max_s_refuses_bad_values_naming_key_and_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG.format(broker=line), source="a.toml")
    assert str(err.value).startswith(message), err.value
