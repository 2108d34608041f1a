"""The cost of a camera: 1, 4 and 8 streams of the shipped 640x480 video at 15 fps through the
real daemon (``python -m agent.cli run``, its own process) and a real Mosquitto.

For each row: CPU of the agent process per stream in % of one core (utime + stime from
``/proc/PID/stat`` over the window), split by what the threads do (their names in
``/proc/PID/task/TID/comm``, agent.tuning.name_os_threads): inference (``infer-*``),
capture (``source-*``: decoding and preprocessing), publishing (``mqtt-publisher`` and
paho's network thread) and the rest; the agent's RSS (``VmRSS``) at the window's end, frames
dropped (the sources' ``frames_dropped`` from telemetry, summed) and the share of captured
frames that were inferred; with and without motion gating (``[streams.motion]``), with and
without cross-stream batching (``[batching] mode = "auto"``), on a static scene (one frame of
the shipped video without a face, written into a temp dir at run time) and on the shipped
video. ``--baseline DIR`` also runs the plain and gated rows (no batching; the gated one only
where that agent has motion gating) with the agent of another checkout (e.g. ``git archive
HEAD | tar -x -C DIR``), so a change is compared within one run. ``--check-every N ...``
runs this agent's gated rows once per ``[streams.motion] check_every`` (default: the agent's
default; the baseline's gated rows keep theirs). ``--fps N`` caps every stream at N frames a
second (``streams[].fps``), both agents.

Run: ``.venv/bin/python -m bench.cameras`` (about 5 minutes; ``--seconds``, ``--streams``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2

from bench.procstat import cpu_s
from inference import ASSETS_DIR
from protocol import Telemetry, decode
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"
REPO = Path(__file__).resolve().parent.parent
STATIC_FRAME = 45
"""A frame of the shipped video without a face."""


@dataclass(frozen=True, slots=True)
class Row:
    scene: str
    streams: int
    gating: bool
    batching: bool
    check_every: int | None
    """``[streams.motion] check_every`` when set (None: the agent's default, or no gating)."""
    agent: str
    cpu_per_stream: float
    roles: dict[str, float]
    """CPU per stream of each role (``ROLES``), % of one core; empty for an agent whose
    threads carry no names (a baseline from before agent.tuning.name_os_threads)."""
    rss_mb: float
    dropped: int
    captured: int
    inferred_share: float


def static_video(folder: Path, seconds: float = 10.0) -> Path:
    """One face-free frame of the shipped video, repeated, as a 15 fps video file."""
    cap = cv2.VideoCapture(str(VIDEO))
    frame = None
    for _ in range(STATIC_FRAME + 1):
        _, frame = cap.read()
    cap.release()
    assert frame is not None
    path = folder / "static-640x480.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 15.0, (640, 480))
    for _ in range(int(seconds * 15)):
        writer.write(frame)
    writer.release()
    return path


def _config(
    folder: Path,
    port: int,
    video: Path,
    streams: int,
    *,
    gating: bool,
    batching: bool,
    check_every: int | None = None,
    fps: float = 0.0,
) -> Path:
    text = f'device_id = "bench"\nstate_dir = "{folder / "state"}"\n'
    text += f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n[telemetry]\ninterval_s = 1\n'
    if batching:
        text += '[batching]\nmode = "auto"\n'
    for i in range(streams):
        text += (
            f'[[streams]]\nname = "cam{i}"\nsource = "{video}"\n'
            'model = "builtin:blazeface-short-int8"\nrealtime = true\nloop = true\n'
        )
        if fps:
            text += f"fps = {fps}\n"
        if gating:
            text += "[streams.motion]\nenabled = true\n"
            if check_every is not None:
                text += f"check_every = {check_every}\n"
    path = folder / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


ROLES = ("infer", "capture", "publish", "other")


def _role(comm: str) -> str:
    if comm.startswith("infer-"):
        return "infer"
    if comm.startswith("source-"):
        return "capture"
    if comm == "mqtt-publisher" or comm.startswith("paho-mqtt"):
        return "publish"
    return "other"


def _thread_cpu(pid: int) -> dict[str, float] | None:
    """CPU seconds of the process's threads by role (threads that ended are not counted);
    None when no thread has a role's name (an agent from before the names)."""
    out = dict.fromkeys(ROLES, 0.0)
    named = False
    task = Path(f"/proc/{pid}/task")
    for tid in os.listdir(task):
        try:
            role = _role((task / tid / "comm").read_text().strip())
            out[role] += cpu_s(task / tid / "stat")
        except OSError:
            continue
        named = named or role != "other"
    return out if named else None


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _totals(sub: Subscriber) -> tuple[int, int, int]:
    """(captured, processed, dropped) summed over the streams in the latest telemetry."""
    for m in reversed(sub.messages):
        if m.topic.endswith("/telemetry"):
            t = decode(m.payload, Telemetry)
            return (
                sum(s.frames_captured for s in t.streams),
                sum(s.frames_processed for s in t.streams),
                sum(s.frames_dropped for s in t.streams),
            )
    return 0, 0, 0


def measure(
    broker: Mosquitto,
    work: Path,
    video: Path,
    streams: int,
    *,
    gating: bool,
    batching: bool,
    seconds: float,
    agent_root: Path = REPO,
    check_every: int | None = None,
    fps: float = 0.0,
) -> tuple[float, dict[str, float], float, int, int, float]:
    """(CPU % of a core per stream, the same by role, RSS MB, frames dropped, captured,
    inferred share)."""
    folder = Path(tempfile.mkdtemp(dir=work))
    config = _config(
        folder,
        broker.port,
        video,
        streams,
        gating=gating,
        batching=batching,
        check_every=check_every,
        fps=fps,
    )
    sub = Subscriber(broker.port, ["edgefleet/v1/bench/telemetry"], persistent=False)
    env = dict(os.environ, PYTHONPATH=str(agent_root))
    with (folder / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=agent_root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        time.sleep(3.0)  # model loads, batching measurement, first frames
        sub.wait_for(lambda ms: len(ms) >= 1, timeout=30)
        captured0, processed0, dropped0 = _totals(sub)
        roles0 = _thread_cpu(proc.pid)
        cpu0, t0 = cpu_s(Path(f"/proc/{proc.pid}/stat")), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_s(Path(f"/proc/{proc.pid}/stat")), time.monotonic()
        roles1 = _thread_cpu(proc.pid)
        rss = _rss_mb(proc.pid)
        time.sleep(1.2)  # the telemetry that covers the window's end
        captured1, processed1, dropped1 = _totals(sub)
    finally:
        proc.terminate()
        proc.wait(10)
        sub.close()
    captured = captured1 - captured0
    share = (processed1 - processed0) / captured if captured else 0.0
    per_stream = 100.0 / (t1 - t0) / streams
    cpu = (cpu1 - cpu0) * per_stream
    roles = {}
    if roles0 is not None and roles1 is not None:
        roles = {r: (roles1[r] - roles0[r]) * per_stream for r in ROLES}
    return cpu, roles, rss, dropped1 - dropped0, captured, share


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        work = Path(tmp)
        scenes = {"static": static_video(work), "shipped": VIDEO}
        agents = {"this": REPO} | ({"baseline": Path(args.baseline)} if args.baseline else {})
        for scene in args.scenes:
            for streams in args.streams:
                for agent, root in agents.items():
                    plans = _plans(streams) if agent == "this" else _baseline_plans(root)
                    for gating, batching, every in _with_check_every(
                        plans, args.check_every if agent == "this" else [None]
                    ):
                        cpu, roles, rss, dropped, captured, share = measure(
                            broker,
                            work,
                            scenes[scene],
                            streams,
                            gating=gating,
                            batching=batching,
                            seconds=args.seconds,
                            agent_root=root,
                            check_every=every,
                            fps=args.fps,
                        )
                        row = Row(
                            scene,
                            streams,
                            gating,
                            batching,
                            every,
                            agent,
                            cpu,
                            roles,
                            rss,
                            dropped,
                            captured,
                            share,
                        )
                        rows.append(row)
                        print(_line(row), flush=True)
    return rows


def _with_check_every(
    plans: list[tuple[bool, bool]], values: Sequence[int | None]
) -> list[tuple[bool, bool, int | None]]:
    """Each gated plan once per ``check_every`` value; plans without gating once."""
    return [
        (gating, batching, every)
        for gating, batching in plans
        for every in (values if gating else [None])
    ]


def _baseline_plans(root: Path) -> list[tuple[bool, bool]]:
    """The plain row, and the gated one where that agent knows ``[streams.motion]`` (a
    baseline from before issue 15, such as its parent commit 4099dd4, does not)."""
    knows_motion = (root / "agent" / "motion.py").exists()
    return [(False, False)] + ([(True, False)] if knows_motion else [])


def _plans(streams: int) -> list[tuple[bool, bool]]:
    plans = [(False, False), (True, False)]
    return plans + ([(False, True), (True, True)] if streams > 1 else [])


HEADER = (
    f"{'scene':8} {'streams':>7} {'gating':>6} {'every':>5} {'batch':>5} {'agent':>8} "
    f"{'CPU %/stream':>12} {'(infer':>6} {'capt':>5} {'publ':>5} {'other)':>6} "
    f"{'RSS MB':>7} {'dropped':>7} {'captured':>8} {'inferred':>8}"
)


def _line(r: Row) -> str:
    return (
        f"{r.scene:8} {r.streams:7d} {'on' if r.gating else 'off':>6} "
        f"{'-' if r.check_every is None else r.check_every:>5} "
        f"{'auto' if r.batching else 'off':>5} {r.agent:>8} {r.cpu_per_stream:12.2f} "
        + (
            " ".join(f"{r.roles[k]:5.2f}" for k in ROLES)
            if r.roles
            else f"{'(threads not named)':>23}"
        )
        + f" {r.rss_mb:7.1f} {r.dropped:7d} {r.captured:8d} {r.inferred_share:8.0%}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per row")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--scenes", nargs="+", default=["static", "shipped"])
    parser.add_argument(
        "--baseline", help="a checkout whose agent runs the plain and gated rows too"
    )
    parser.add_argument(
        "--check-every",
        type=int,
        nargs="+",
        default=[None],
        metavar="N",
        help="[streams.motion] check_every of this agent's gated rows, a row per value",
    )
    parser.add_argument(
        "--fps", type=float, default=0.0, help="every stream's fps cap (streams[].fps; 0: none)"
    )
    args = parser.parse_args(argv)
    cap = f"; fps cap {args.fps:g}" if args.fps else ""
    print(f"{os.cpu_count()} CPUs; agent: python -m agent.cli run; {args.seconds:g} s per row{cap}")
    print(HEADER, flush=True)
    run(args)


if __name__ == "__main__":
    main()
