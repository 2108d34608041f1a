"""The agent's MQTT reconnect waits: at most ``[broker] reconnect_max_s`` (default 10 s),
each drawn with jitter from the upper half of its ceiling.

Outside testers saw an agent come back 43 s after a broker outage: its backoff grew to 60 s.
Here the agent's publisher is built from its broker config as the agent builds it, and each
connection failure is reported to it the way paho does (its ``on_connect_fail`` callback);
what is checked is the wait before the next attempt that the connection then hands paho.
No broker is needed: nothing connects (tests/test_agent_reconnect.py times a real outage).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import BrokerConfig, parse_config
from agent.publisher import Publisher
from agent.spool.queue import Spool
from tests.test_agent_reconnect import CONFIG  # the same agent config, [broker] filled in

FAILURES = 200
"""Connection failures in a row: the ceiling is reached after a handful, then ~195 waits are
drawn from its upper half (none in the lowest, or none in the highest, fifth of that half:
probability 0.8^195 each)."""


def _publisher(
    broker: BrokerConfig, tmp_path: Path, reconnect_max_s: float | None = None
) -> Publisher:
    return Publisher(
        device_id="cam-01",
        broker=broker,
        spool=Spool(tmp_path / "spool", max_bytes=1 << 20),
        will_payload=b"offline",
        reconnect_max_s=reconnect_max_s,
    )


def waits_after_failures(publisher: Publisher, n: int = FAILURES) -> list[float]:
    """Report ``n`` connection failures as paho does; the wait set on paho after each."""
    client = publisher._conn.client
    on_connect_fail = client.on_connect_fail
    assert on_connect_fail is not None
    waits: list[float] = []
    for _ in range(n):
        on_connect_fail(client, None)
        # min == max: paho waits exactly this long before its next attempt.
        assert client._reconnect_min_delay == client._reconnect_max_delay
        waits.append(float(client._reconnect_max_delay))
    return waits


def assert_capped_with_jitter(waits: list[float], max_s: float) -> None:
    """The n-th wait is within the upper half of ``min(max_s, 1 s * 2^n)``, and the waits at
    the cap are spread over that half, not all the same."""
    ceilings = [min(max_s, 2.0**n) for n in range(len(waits))]
    outside = [
        (n, w, c)
        for n, (w, c) in enumerate(zip(waits, ceilings, strict=True))
        if not c / 2 <= w <= c
    ]
    assert not outside, f"(attempt, wait, ceiling) outside the upper half: {outside[:5]}"
    assert max(waits) <= max_s
    capped = [w for w, c in zip(waits, ceilings, strict=True) if c == max_s]
    assert len(capped) > FAILURES - 10
    assert min(capped) < max_s * 0.6 and max(capped) > max_s * 0.9, (min(capped), max(capped))
    assert len(set(capped)) > len(capped) // 2, "jitter: the waits at the cap differ"


def test_the_default_broker_config_waits_at_most_10_s_with_jitter(tmp_path: Path) -> None:
    broker = BrokerConfig()
    assert broker.reconnect_max_s == 10.0
    publisher = _publisher(broker, tmp_path)
    try:
        waits = waits_after_failures(publisher)
    finally:
        publisher.close(timeout=0)
    assert_capped_with_jitter(waits, 10.0)


@pytest.mark.parametrize("passed_explicitly", [True, False], ids=["as-the-agent", "by-default"])
def test_broker_reconnect_max_s_2_caps_the_waits_at_2_s(
    tmp_path: Path, passed_explicitly: bool
) -> None:
    """``as-the-agent``: agent/app.py passes ``cfg.broker.reconnect_max_s``; ``by-default``:
    the publisher and its MQTT connection take it from the broker config they are given."""
    cfg = parse_config(CONFIG.format(broker="reconnect_max_s = 2"), source="a.toml")
    assert cfg.broker.reconnect_max_s == 2.0
    explicit = cfg.broker.reconnect_max_s if passed_explicitly else None
    publisher = _publisher(cfg.broker, tmp_path, explicit)
    try:
        waits = waits_after_failures(publisher)
    finally:
        publisher.close(timeout=0)
    assert_capped_with_jitter(waits, 2.0)
