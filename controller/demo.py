"""``python -m controller.demo`` (what ``make demo`` runs): the whole story on one machine.

1. The controller starts on SQLite with its embedded MQTT broker.
2. A real agent process runs the shipped INT8 BlazeFace on the shipped video; its
   detections are printed live as any MQTT subscriber sees them.
3. The operator CLI shows the device online; the agent is stopped (SIGTERM) and the
   device goes offline; the agent comes back and so does the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from controller.broker import free_port
from controller.service import Controller, build_controller
from protocol import Detections, Kind, ProtocolError, decode, subscription

DEVICE = "demo-cam"


def _agent_assets() -> Path:
    """The agent's shipped assets, found without importing the agent (layering rule)."""
    spec = importlib.util.find_spec("agent")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the agent is not installed: run `make demo` (it installs edgefleet[agent])"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def _say(text: str) -> None:
    print(f"\n\033[1;36m== {text}\033[0m", flush=True)


class LivePrinter:
    """Prints detections as a third-party subscriber sees them (every 5th frame + changes)."""

    def __init__(self, url: str, username: str | None, password: str | None) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.frames = 0
        self.faces = 0
        self._last_had_face: bool | None = None
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = lambda c, *_: c.subscribe(subscription(Kind.DETECTIONS), qos=1)
        self._client.on_message = self._on_message
        self._client.connect(host, int(port))
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            det = decode(bytes(msg.payload), Detections)
        except ProtocolError as err:
            print(f"  (bad message on {msg.topic}: {err})")
            return
        self.frames += 1
        has_face = bool(det.detections)
        self.faces += has_face
        if det.frame_index % 5 and has_face == self._last_had_face:
            return
        self._last_had_face = has_face
        if det.detections:
            d = det.detections[0]
            what = f"\033[32m{d.label} {d.score:.2f}\033[0m box [{', '.join(f'{v:.2f}' for v in d.box)}]"
        else:
            what = "\033[2mno face\033[0m"
        print(
            f"  {msg.topic}  seq {det.seq:5d}  frame {det.frame_index:3d}  {what}  "
            f"({det.infer_ms:.2f} ms, {det.model})",
            flush=True,
        )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _agent_config(state: Path, controller: Controller, assets: Path) -> Path:
    b = controller.broker
    cfg = state / "agent.toml"
    lines = [
        f'device_id = "{DEVICE}"',
        f'state_dir = "{state / "state"}"',
        "[broker]",
        f'url = "{b.url}"',
        *([f'username = "{b.username}"'] if b.username else []),
        *([f'password = "{b.password}"'] if b.password else []),
        "[telemetry]",
        "interval_s = 2",
        "[[streams]]",
        'name = "front"',
        f'source = "{assets / "face-walk-640x480.mp4"}"',
        'model = "builtin:blazeface-short-int8"',
    ]
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


def _start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _cli(controller: Controller, token: str, *args: str) -> str:
    env = dict(os.environ, EDGEFLEET_URL=controller.api_url, EDGEFLEET_TOKEN=token, COLUMNS="120")
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result.stdout + result.stderr


def _device(controller: Controller, token: str) -> dict[str, Any] | None:
    out = _cli(controller, token, "devices", "list", "--json")
    try:
        devices = json.loads(out)
    except json.JSONDecodeError:
        return None
    return next((d for d in devices if d.get("id", d.get("device_id")) == DEVICE), None)


def _wait_online(controller: Controller, token: str, online: bool, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dev = _device(controller, token)
        if dev is not None and bool(dev.get("online")) == online:
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=Path("demo-state"), help="where the demo keeps its files"
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="live detections shown per phase"
    )
    args = parser.parse_args(argv)
    state: Path = args.dir.resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    assets = _agent_assets()

    _say("Starting the controller (SQLite + embedded MQTT broker)")
    controller = build_controller(
        {
            "data_dir": str(state / "controller"),
            "api": {"port": 0},
            "embedded_broker": {"port": free_port()},
        },
    )
    controller.start()
    token = controller.create_dev_token()
    print(controller.describe())
    printer = LivePrinter(
        controller.broker.url, controller.broker.username, controller.broker.password
    )
    cfg = _agent_config(state, controller, assets)
    agent_log = state / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        _say(f"Starting agent {DEVICE!r}: INT8 BlazeFace on the shipped video (log: {agent_log})")
        agent = _start_agent(cfg, agent_log)
        stop.wait(args.seconds)
        _say("The operator's view: `edgefleet devices list`")
        _wait_online(controller, token, True)
        print(_cli(controller, token, "devices", "list"))

        _say("Stopping the agent (SIGTERM): the device goes offline")
        agent.send_signal(signal.SIGTERM)
        print(f"  agent exited with {agent.wait(10)}")
        print("  device offline:", _wait_online(controller, token, False))
        print(_cli(controller, token, "devices", "list"))

        _say("Starting the agent again: the device comes back, seq continues")
        agent = _start_agent(cfg, agent_log)
        stop.wait(args.seconds / 2)
        print("  device online:", _wait_online(controller, token, True))
        print(_cli(controller, token, "devices", "show", DEVICE))
        _say(
            f"Done: {printer.frames} detection messages received, {printer.faces} with a face. "
            f"State kept in {state}"
        )
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
        printer.close()
        controller.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
