"""``python -m tools.demo`` (what ``make demo`` runs): the whole story on one machine.

1. The controller starts on SQLite with its embedded MQTT broker.
2. A fleet of three real agent processes runs the shipped fp16 BlazeFace on the shipped
   video; detections are printed live as any MQTT subscriber sees them.
3. The operator CLI shows the devices online; one agent is stopped (SIGTERM), its device
   goes offline, the agent comes back and so does the device.
4. The INT8 model is packaged as a signed bundle (golden samples computed here), pushed,
   and rolled out in stages: a canary first, then the rest; every device runs it beside the
   fp16 model on the same live frames (the health gate's shadow phase: agreement and latency
   with confidence intervals), hot-swaps it without a restart, and commits it after probation.
5. A broken version (it never reports a face at min_score 0.99, yet passes golden samples
   that contain no face) is rolled out: the canary's health gate sees it agree on none of
   the current model's boxes and refuses it before it publishes a single detection; the
   rollout aborts and the other devices are never touched.
"""

from __future__ import annotations

import argparse
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

from agent.config import OtaConfig
from controller.broker import free_port
from controller.service import Controller, build_controller
from inference import ASSETS_DIR
from tools.demo_live import LivePrinter

DEVICES = ("demo-cam-1", "demo-cam-2", "demo-cam-3")
BASELINE = "builtin:blazeface-short-fp16"
INT8 = "blazeface-short-int8"
PROBATION_S = 5
DEVICE_TIMEOUT_S = OtaConfig().shadow_max_s + PROBATION_S + 60
"""The rollouts' per-device limit: longer than the agent's longest shadow phase, its
probation and a minute for download, self-test and swap, so a health gate that cannot decide
ends as the agent's own ``shadow_inconclusive`` report, with its evidence, not as a
controller timeout (a loaded machine can keep the gate undecided that long)."""
FACE_FRAME, NO_FACE_FRAME = 10, 45
"""Frames of the shipped video with and without a face (inference/assets/README.md)."""


def _say(text: str) -> None:
    print(f"\n\033[1;36m== {text}\033[0m", flush=True)


def _note(text: str) -> None:
    print(f"   {text}", flush=True)


class Demo:
    """The controller, the fleet and the operator's CLI of one demo run."""

    def __init__(self, state: Path, controller: Controller, token: str, assets: Path) -> None:
        self.state = state
        self.controller = controller
        self.token = token
        self.assets = assets
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.keys = state / "keys"

    # --- the fleet ------------------------------------------------------------------------

    def agent_config(self, device: str) -> Path:
        b = self.controller.broker
        folder = self.state / device
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            f'device_id = "{device}"',
            f'state_dir = "{folder / "state"}"',
            "[broker]",
            f'url = "{b.url}"',
            *([f'username = "{b.username}"'] if b.username else []),
            *([f'password = "{b.password}"'] if b.password else []),
            "[telemetry]",
            "interval_s = 2",
            "[ota]",
            f'trusted_keys = ["{self.keys / "signing.pub"}"]',
            f"probation_s = {PROBATION_S}",
            "[[streams]]",
            'name = "front"',
            f'source = "{self.assets / "face-walk-640x480.mp4"}"',
            f'model = "{BASELINE}"',
        ]
        cfg = folder / "agent.toml"
        cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return cfg

    def start_agent(self, device: str) -> None:
        cfg = self.state / device / "agent.toml"
        with (self.state / device / "agent.log").open("ab") as out:
            self.agents[device] = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop_agent(self, device: str) -> int:
        proc = self.agents.pop(device)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(10)

    def stop_all(self) -> None:
        for device in list(self.agents):
            if self.agents[device].poll() is None:
                self.stop_agent(device)

    # --- the operator ---------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            EDGEFLEET_URL=self.controller.api_url,
            EDGEFLEET_TOKEN=self.token,
            COLUMNS="120",
        )

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        result = subprocess.run(
            [sys.executable, "-m", "controller.cli", *args],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        return result.returncode, result.stdout + result.stderr

    def show(self, *args: str) -> str:
        print(f"   $ edgefleet {' '.join(args)}", flush=True)
        code, out = self.cli(*args)
        print(out.rstrip("\n"), flush=True)
        if code:
            print(f"   (exit {code})", flush=True)
        return out

    def must(self, *args: str) -> str:
        code, out = self.cli(*args)
        if code:
            raise SystemExit(f"demo step `edgefleet {' '.join(args)}` failed:\n{out}")
        return out

    def devices(self) -> list[dict[str, Any]]:
        code, out = self.cli("devices", "list", "--json")
        if code:
            return []
        try:
            data: list[dict[str, Any]] = json.loads(out)
        except json.JSONDecodeError:
            return []
        return data

    def wait_online(self, device: str, online: bool, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dev = next((d for d in self.devices() if d.get("id") == device), None)
            if dev is not None and bool(dev.get("online")) == online:
                return True
            time.sleep(0.5)
        return False

    def wait_all_online(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = {d.get("id") for d in self.devices() if d.get("online")}
            if online >= set(DEVICES):
                return True
            time.sleep(0.5)
        return False

    # --- bundles --------------------------------------------------------------------------

    def golden_frames(self) -> tuple[Path, Path]:
        import cv2

        out = self.state / "golden"
        out.mkdir(exist_ok=True)
        cap = cv2.VideoCapture(str(self.assets / "face-walk-640x480.mp4"))
        frames: dict[int, Any] = {}
        index = 0
        while index <= max(FACE_FRAME, NO_FACE_FRAME):
            ok, image = cap.read()
            if not ok:
                break
            frames[index] = image
            index += 1
        cap.release()
        face, no_face = out / "face.png", out / "no-face.png"
        cv2.imwrite(str(face), frames[FACE_FRAME])
        cv2.imwrite(str(no_face), frames[NO_FACE_FRAME])
        return face, no_face

    def blind_manifest(self) -> Path:
        """The INT8 model with min_score 0.99: it will never report a face on the video."""
        folder = self.state / "blind-model"
        folder.mkdir(exist_ok=True)
        manifest = json.loads((self.assets / f"{INT8}.json").read_text(encoding="utf-8"))
        shutil.copy(self.assets / manifest["model"], folder / manifest["model"])
        manifest["min_score"] = 0.99
        manifest["description"] = "demo: a broken build that stopped reporting faces"
        path = folder / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return path

    def publish_bundle(self, src: Path, version: str, golden: list[Path]) -> None:
        bundle = self.state / f"{INT8}-{version}.efb"
        goldens = [arg for g in golden for arg in ("--golden", str(g))]
        for line in self.must(
            "model", "package", str(src), "--name", INT8, "--version", version,
            *goldens, "--latency-budget-ms", "50", "--out", str(bundle),
        ).splitlines()[:-1]:  # fmt: skip
            _note(line)
        _note(
            self.must(
                "model", "sign", str(bundle), "--key", str(self.keys / "signing.key")
            ).splitlines()[0]
        )
        _note(self.must("model", "push", str(bundle)).splitlines()[0])

    def rollout(self, ref: str, *, bake: str, expect_abort: bool = False) -> tuple[int, int]:
        """Create a rollout over the whole fleet (canary, then the rest) and watch it.

        ``expect_abort``: the story wants this rollout aborted, so the watch's report of
        the abort (``error: rollout N aborted …``, exit 1) is told as the outcome it is;
        anything else the CLI says keeps its ``error:``."""
        args = (
            "rollout", "create", ref, "--select", "all", "--stages", "1,100%", "--bake", bake,
            "--max-failures", "0%", "--min-executed", "1", "--timeout", f"{DEVICE_TIMEOUT_S:g}s",
            "--json",
        )  # fmt: skip
        print(f"   $ edgefleet {' '.join(args[:-1])}", flush=True)
        created = json.loads(self.must(*args))
        rid = int(created["id"])
        _note(f"rollout {rid}: stages {created['stages']} of {created['device_count']} devices")
        print(f"   $ edgefleet rollout watch {rid}", flush=True)
        aborted = f"error: rollout {rid} aborted " if expect_abort else None
        return rid, self.stream_cli("rollout", "watch", str(rid), expected_error=aborted)

    def stream_cli(self, *args: str, expected_error: str | None = None) -> int:
        """Run the CLI and print its lines as they come (between the live MQTT lines); a
        line starting with ``expected_error`` is the outcome the story wants, told as such."""
        with subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *args],
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                text = line.rstrip()
                if expected_error and text.startswith(expected_error):
                    rest = text[len(expected_error) :]
                    text = f"{expected_error[len('error: ') :]}as intended {rest}"
                    print(f"   \033[1;32m{text}\033[0m", flush=True)
                    continue
                print(f"   \033[1m{text}\033[0m", flush=True)
            return proc.wait(300)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 - the story, step by step
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=Path("demo-state"), help="where the demo keeps its files"
    )
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="live detections shown per phase"
    )
    args = parser.parse_args(argv)
    state: Path = args.dir.resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    assets = ASSETS_DIR

    _say("Starting the controller (SQLite + embedded MQTT broker)")
    keys = state / "keys"
    subprocess.run(
        [sys.executable, "-m", "controller.cli", "keys", "generate", "--out", str(keys)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    controller = build_controller(
        {
            "data_dir": str(state / "controller"),
            "api": {"port": 0},
            "embedded_broker": {"port": free_port()},
            # Uploads must carry a signature by the operator's key; agents trust it too.
            "models": {"trusted_keys": [str(keys / "signing.pub")]},
        },
    )
    controller.start()
    token = controller.create_dev_token()
    print(controller.describe())
    demo = Demo(state, controller, token, assets)
    _note(f"signing key: {keys / 'signing.key'} (controller and agents trust signing.pub)")
    printer = LivePrinter(
        controller.broker.url,
        controller.broker.username,
        controller.broker.password,
        sampled=DEVICES[0],
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        _say(f"Starting a fleet of {len(DEVICES)} agents: fp16 BlazeFace on the shipped video")
        for device in DEVICES:
            demo.agent_config(device)
            demo.start_agent(device)
            _note(f"{device}: log in {state / device / 'agent.log'}")
        stop.wait(args.seconds)
        demo.wait_all_online()
        printer.verbose = False
        _say("The operator's view")
        demo.show("devices", "list")

        _say(f"Stopping {DEVICES[2]} (SIGTERM): the device goes offline, then comes back")
        _note(f"agent exited with {demo.stop_agent(DEVICES[2])}")
        _note(f"{DEVICES[2]} offline: {demo.wait_online(DEVICES[2], False)}")
        demo.start_agent(DEVICES[2])
        _note(f"{DEVICES[2]} online again: {demo.wait_online(DEVICES[2], True)}")

        _say("Packaging the INT8 model as a signed bundle (golden samples computed here)")
        face, no_face = demo.golden_frames()
        demo.publish_bundle(assets / f"{INT8}.json", "1.0.0", [face, no_face])

        _say("Rolling it out: a canary first, then the rest of the fleet")
        _, code = demo.rollout(f"{INT8}@1.0.0", bake="4s")
        demo.show("devices", "list")
        good = code == 0 and all(m == f"{INT8}@1.0.0" for m in printer.models().values())

        _say(
            "A broken build (1.1.0): it stopped reporting faces, but passes golden samples without one"
        )
        demo.publish_bundle(demo.blind_manifest(), "1.1.0", [no_face])
        _say("Rolling out 1.1.0: the canary's health gate should refuse it before it goes live")
        rid, code = demo.rollout(f"{INT8}@1.1.0", bake="4s", expect_abort=True)
        demo.show("rollout", "status", str(rid), "--devices")
        stop.wait(2)
        models = printer.models()
        caught = code != 0 and all(m == f"{INT8}@1.0.0" for m in models.values())
        _say(
            "Done: "
            + ("the INT8 rollout completed; " if good else "the INT8 rollout did NOT complete; ")
            + (
                "the broken build was rolled back on the canary and never reached the others."
                if caught
                else "the broken build was NOT caught as expected."
            )
        )
        print(
            f"   {printer.frames} detection messages received, {printer.faces} with a face; "
            f"models now: {', '.join(f'{d} {m}' for d, m in sorted(models.items()))}\n"
            f"   State kept in {state}",
            flush=True,
        )
        return 0 if good and caught else 1
    finally:
        demo.stop_all()
        printer.close()
        controller.stop()


if __name__ == "__main__":
    raise SystemExit(main())
