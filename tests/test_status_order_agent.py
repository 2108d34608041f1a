"""The real agent numbers its statuses and last wills so that a controller can order them
(``protocol.Status.seq``), across a dropped link (real Mosquitto, the link cut by a proxy).

The broker publishes connection 1's will after every status sent on it, though the will was
built (and stamped) when connection 1 was made; the statuses of connection 2 come after the
will. Written into the controller's database in any order, the status that stays is the
newest one."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from controller.db.session import Database
from controller.fleet.devices import get_device
from controller.fleet.writes import Received, write_messages
from protocol import Status
from protocol.messages import STATUS_SEQ_BITS, decode, will_seq
from protocol.topics import status_topic
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.tcp_balancer import TcpBalancer

pytestmark = pytest.mark.slow


@pytest.fixture
def link(mosquitto: Mosquitto) -> Iterator[TcpBalancer]:
    """The device's link to the broker: a proxy the test can cut."""
    proxy = TcpBalancer([mosquitto.port])
    yield proxy
    proxy.close()


def _statuses(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.payloads(status_topic("order-01"))]


def test_the_will_sorts_between_the_statuses_of_its_connection_and_the_next(
    mosquitto: Mosquitto, link: TcpBalancer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        port=link.port,
        device_id="order-01",
        streams=stream_block("front", source=str(VIDEO), extra="fps = 2"),
    )
    sub = Subscriber(mosquitto.port, [status_topic("order-01")], persistent=False)
    proc = start_agent(config, tmp_path / "agent.log")
    try:

        def running(messages: list[Any]) -> bool:
            return any(
                s["state"] == "online" and s["streams"][0]["source_state"] == "running"
                for s in _statuses(sub)
            )

        sub.wait_for(running, timeout=60)
        for cut in (1, 2):  # two dropped links: each connection has its own will
            assert link.cut() == 1

            def back(messages: list[Any], cut: int = cut) -> bool:
                """The will came, then the next connection's own status (the sender may
                first re-send the one retained before the link dropped)."""
                seen = _statuses(sub)
                wills = [s for s in seen if s["state"] == "offline"]
                return len(wills) == cut and any(
                    s["state"] == "online" and s["seq"] >> STATUS_SEQ_BITS == cut + 1 for s in seen
                )

            sub.wait_for(back, timeout=30)
        code, _ = stop_agent(proc)
        assert code == 0, (tmp_path / "agent.log").read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()

    statuses = _statuses(sub)
    assert len({s["started_at"] for s in statuses}) == 1
    seqs = [s["seq"] for s in statuses]
    wills = [i for i, s in enumerate(statuses) if s["state"] == "offline"][:2]
    assert [seqs[i] for i in wills] == [will_seq(1), will_seq(2)]
    assert all(statuses[i]["streams"] == [] for i in wills)
    for connection, (start, end) in enumerate(
        zip([0, *wills], [*wills, len(seqs)], strict=True), 1
    ):
        assert max(seqs[start:end]) < (will_seq(connection) if connection <= 2 else will_seq(3))
        if connection > 1:  # the connection's fresh status comes after the previous will
            assert any(q >> STATUS_SEQ_BITS == connection for q in seqs[start + 1 : end])
    # The agent stopped cleanly (no will): its final offline is its newest status.
    assert statuses[-1]["state"] == "offline" and seqs[-1] == max(seqs)

    # Whatever order replicas commit them in, the newest status is the one that stays.
    payloads = sub.payloads(status_topic("order-01"))
    newest = statuses[-1]
    rng = random.Random(7)
    orders = [list(reversed(range(len(payloads))))]
    orders += [rng.sample(range(len(payloads)), len(payloads)) for _ in range(5)]
    db = Database.from_url(f"sqlite:///{tmp_path / 'ctl.db'}")
    db.upgrade()
    try:
        for n, order in enumerate(orders):
            device_id = f"order-{n:02d}"  # one device per order, same messages
            for i in order:
                msg = msgspec.structs.replace(decode(payloads[i], Status), device_id=device_id)
                with db.begin() as conn:
                    write_messages(conn, [Received("t", device_id, msg, received_at=0.0)])
            with db.connect() as conn:
                device = get_device(conn, device_id)
            assert device is not None, order
            assert (device.state, device.status_ts) == ("offline", newest["ts"]), order
    finally:
        db.dispose()
