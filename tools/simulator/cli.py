"""The simulator's command line (``python -m tools.simulator``): simulated devices on a broker,
telemetry until stopped (or ``--count`` messages), optionally acting on desired states."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence

from protocol import ProtocolError
from protocol.broker import parse_broker_url
from tools.simulator.device import SimulatedDevice
from tools.simulator.fleet import SimulatedFleet
from tools.simulator.messages import DEFAULT_MODEL
from tools.simulator.ota import DEPLOY_PHASES, OtaBehaviour


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.simulator",
        description="Simulated edgefleet devices speaking the MQTT protocol (no camera, no model).",
    )
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--devices", type=int, default=1, help="number of devices")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0001, ...")
    parser.add_argument("--streams", default="cam0", help="comma-separated stream names")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="active model name@version")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--count", type=int, default=0, help="telemetry messages per device, then exit (0 = run)"
    )
    parser.add_argument("--event", action="append", default=[], help="publish this event code")
    parser.add_argument(
        "--ota", action="store_true", help="act on desired states (docs/ota.md): deploy models"
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="MODEL[:REASON]",
        help="deploying MODEL fails (reason default golden_mismatch); implies --ota",
    )
    parser.add_argument(
        "--fail-device", action="append", default=[], help="only this device fails (repeatable)"
    )
    parser.add_argument(
        "--fail-phase", default="staging", choices=DEPLOY_PHASES[:-1], help="where it fails"
    )
    parser.add_argument(
        "--slow", action="append", default=[], metavar="MODEL", help="MODEL has worse telemetry"
    )
    parser.add_argument("--phase-delay", type=float, default=0.05, help="seconds per OTA phase")
    parser.add_argument(
        "--download", action="store_true", help="really download bundles and check them"
    )
    parser.add_argument(
        "--per-connection",
        type=int,
        default=0,
        metavar="N",
        help="N devices per shared MQTT connection, no last wills (implies --ota; for 10,000+ "
        "devices); 0 = one connection per device",
    )
    parser.add_argument(
        "--download-workers", type=int, default=64, help="concurrent downloads (--per-connection)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.per_connection and args.event:
        parser.error("--event needs one connection per device (leave out --per-connection)")
    try:
        parse_broker_url(args.broker)
    except ProtocolError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    behaviour: OtaBehaviour | None = None
    if args.ota or args.fail or args.slow or args.download or args.per_connection:
        fails: dict[str, str] = {}
        for f in args.fail:
            model, _, reason = f.partition(":")
            fails[model] = reason or "golden_mismatch"
        behaviour = OtaBehaviour(
            fail=fails,
            fail_phase=args.fail_phase,
            fail_devices=frozenset(args.fail_device) if args.fail_device else None,
            slow=frozenset(args.slow),
            phase_delay_s=args.phase_delay,
            download=args.download,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.per_connection:
        assert behaviour is not None
        return _run_fleet(args, behaviour, stop)
    devices = [
        SimulatedDevice(
            device_id=f"{args.prefix}-{i:04d}",
            broker_url=args.broker,
            username=args.username,
            password=args.password,
            streams=[s for s in args.streams.split(",") if s],
            model=args.model,
            telemetry_interval_s=args.telemetry_interval,
            seed=i,
            ota=behaviour,
        )
        for i in range(1, args.devices + 1)
    ]
    for dev in devices:
        dev.connect()
        dev.announce()
        for code in args.event:
            dev.publish_event(code, message=f"simulated {code}")
    print(f"ready: {len(devices)} devices on {args.broker}", flush=True)
    sent = 1
    try:
        while not stop.wait(args.telemetry_interval):
            if args.count and sent >= args.count:
                break
            for dev in devices:
                dev.publish_telemetry(wait=False)
            sent += 1
    finally:
        for dev in devices:
            dev.stop(graceful=True)
    return 0


def _run_fleet(args: argparse.Namespace, behaviour: OtaBehaviour, stop: threading.Event) -> int:
    """Many devices over shared connections (:class:`SimulatedFleet`), downloads concurrent."""
    fleet = SimulatedFleet(
        broker_url=args.broker,
        username=args.username,
        password=args.password,
        device_ids=[f"{args.prefix}-{i:04d}" for i in range(1, args.devices + 1)],
        behaviour=behaviour,
        streams=[s for s in args.streams.split(",") if s],
        model=args.model,
        per_connection=args.per_connection,
        telemetry_interval_s=args.telemetry_interval,
        download_workers=args.download_workers,
    )
    fleet.connect(timeout=120)
    fleet.announce()
    print(f"ready: {args.devices} devices on {args.broker} (shared connections)", flush=True)
    sent = 1
    try:
        while not stop.wait(args.telemetry_interval):
            if args.count and sent >= args.count:
                break
            fleet.publish_telemetry()
            sent += 1
    finally:
        fleet.stop()
    return 0
