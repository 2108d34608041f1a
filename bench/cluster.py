"""Controller replicas as processes for the benchmarks: N ``controller serve`` on one database
and one broker, in one MQTT shared group, behind a round-robin TCP balancer (their
``api.public_url``, so devices download bundles through every replica), with per-process
CPU time and memory; and the ingestion throughput of 1 vs N replicas (:func:`ingest_rate`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import httpx
from sqlalchemy import text

from bench import procstat
from controller.broker import EmbeddedBroker
from controller.db.session import Database
from controller.fleet.tokens import create_token
from tests.broker import free_port
from tests.bundle_factory import blazeface_files, blazeface_manifest, build_bundle
from tools.simulator.load import publish_load, telemetry_payloads

REPO = Path(__file__).resolve().parent.parent


def cpu_s(pid: int) -> float:
    return procstat.cpu_s(Path(f"/proc/{pid}/stat"))


class ProcCpu(NamedTuple):
    name: str
    """The command name (``comm``)."""
    cpu_s: float
    """Its CPU seconds with those of its children that ended and were waited for (the
    backends of a PostgreSQL server count for the postmaster)."""
    ppid: int


def machine_cpu() -> dict[int, ProcCpu]:
    """pid → its :class:`ProcCpu` for every process on the machine now."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        out[int(entry.name)] = ProcCpu(
            text[text.index("(") + 1 : text.rindex(")")],
            procstat.stat_cpu_s(text, children=True),
            int(text.rsplit(")", 1)[1].split()[1]),
        )
    return out


def cpu_split(
    before: dict[int, ProcCpu], after: dict[int, ProcCpu], roles: dict[int, str]
) -> dict[str, float]:
    """CPU seconds between two ``machine_cpu`` snapshots, by role (``roles``: pid → role;
    other processes by command name). A process that ended between them counts for its
    parent, without what it had spent before the first snapshot; one whose parent did not
    wait for it is not counted."""
    spent = {
        pid: p.cpu_s - before[pid].cpu_s if pid in before else p.cpu_s for pid, p in after.items()
    }
    for pid, gone in before.items():
        if pid not in after and gone.ppid in spent:
            spent[gone.ppid] -= gone.cpu_s
    split: dict[str, float] = {}
    for pid, seconds in spent.items():
        if seconds > 0:
            role = roles.get(pid, after[pid].name)
            split[role] = split.get(role, 0.0) + seconds
    return split


def mem_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def operator_token(db_url: str) -> str:
    """A new operator API token in the database at ``db_url``."""
    db = Database.from_url(db_url)
    try:
        with db.begin() as conn:
            _, token = create_token(conn, name="bench", role="operator", now=time.time())
    finally:
        db.dispose()
    return token


def face_bundle(folder: Path) -> Path:
    """The shipped INT8 BlazeFace as an unsigned bundle ``face@2.0.0`` (about 120 KiB)."""
    return build_bundle(
        folder / "face.efb",
        blazeface_manifest(name="face", version="2.0.0"),
        blazeface_files(),
        key=None,
    )


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Cluster:
    """``replicas`` controller processes; ``url`` is the balancer in front of them."""

    tmp: Path
    db_url: str
    broker: EmbeddedBroker
    replicas: int
    tick_s: float = 1.0
    bundle_cache_bytes: int | None = None
    """``models.cache_bytes`` of every replica (None: the default)."""
    repo: Path = REPO
    """The checkout whose controller runs (another one for a baseline)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    balancer: subprocess.Popen[str] | None = None
    url: str = ""
    """The balancer (tests/tcp_balancer.py, its own process) in front of the replicas."""

    def start(self) -> None:
        self.ports = [free_port() for _ in range(self.replicas)]
        self.balancer = subprocess.Popen(
            [sys.executable, "-m", "tests.tcp_balancer", *map(str, self.ports)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.balancer.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.balancer.stdout.readline())}"
        shared = 'shared_group = "bench"\nadopt_sessions = true\n' if self.replicas > 1 else ""
        cache = self.bundle_cache_bytes
        cache_line = f"cache_bytes = {cache}\n" if cache is not None else ""
        for n, port in enumerate(self.ports):
            config = self.tmp / f"controller-{n}.toml"
            config.write_text(
                f'data_dir = "{self.tmp / f"data-{n}"}"\nlog_level = "warning"\n'
                f'[database]\nurl = "{self.db_url}"\n'
                f'[broker]\nurl = "{self.broker.url}"\nusername = "{self.broker.username}"\n'
                f'password = "{self.broker.password}"\nclient_id = "bench-ctl-{n}-{port}"\n'
                f"{shared}"
                f'[api]\nport = {port}\npublic_url = "{self.url}"\n'
                f'[models]\nblob_dir = "{self.tmp / "blobs"}"\n{cache_line}'
                f"[rollouts]\ntick_interval_s = {self.tick_s}\n"
            )
            log = (self.tmp / f"controller-{n}.log").open("wb")
            self._logs.append(log)
            cmd = [sys.executable, "-m", "controller", "controller", "serve", "--config"]
            self.procs.append(
                subprocess.Popen(
                    [*cmd, str(config)],
                    cwd=self.repo,
                    env=dict(os.environ, PYTHONPATH=str(self.repo)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            # one at a time: the first one migrates and takes the rollout lock
            wait(lambda n=n: self._ready(n), 90, f"controller {n}")  # type: ignore[misc]

    def _ready(self, n: int) -> bool:
        proc = self.procs[n]
        if proc.poll() is not None:
            tail = (self.tmp / f"controller-{n}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"controller {n} exited: {tail}")
        try:
            r = httpx.get(f"http://127.0.0.1:{self.ports[n]}/readyz", timeout=1)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def cpu(self) -> list[float]:
        return [cpu_s(p.pid) for p in self.procs]

    def rss_kib(self) -> list[int]:
        return [mem_kib(p.pid, "VmRSS") for p in self.procs]

    def hwm_kib(self) -> list[int]:
        return [mem_kib(p.pid, "VmHWM") for p in self.procs]

    def leaders(self) -> list[bool]:
        out = []
        for port in self.ports:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
                out.append(bool(body.get("rollout_leader")))
            except httpx.HTTPError:
                out.append(False)
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self._logs:
            log.close()
        if self.balancer is not None:
            self.balancer.kill()
            self.balancer.wait()


def database_bytes(db_url: str) -> int:
    """Bytes of the tables (with indexes and TOAST) of the schema ``db_url`` uses."""
    db = Database.from_url(db_url)
    try:
        with db.connect() as conn:
            if db.dialect != "postgresql":
                path = db.engine.url.database or ""
                return Path(path).stat().st_size if path else 0
            return int(
                conn.execute(
                    text(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                    )
                ).scalar_one()
            )
    finally:
        db.dispose()


def _telemetry_rows(db_url: str) -> int:
    db = Database.from_url(db_url)
    try:
        with db.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one())
    finally:
        db.dispose()


def _telemetry_bytes(db_url: str) -> int:
    db = Database.from_url(db_url)
    try:
        with db.connect() as conn:
            if db.dialect != "postgresql":
                return 0
            sql = "SELECT pg_total_relation_size('telemetry')"
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        db.dispose()


def ingest_rate(
    tmp: Path, db_url: str, *, replicas: int, devices: int, per_device: int, publishers: int = 3
) -> dict[str, Any]:
    """Telemetry messages/s stored by ``replicas`` controllers: ``devices`` x ``per_device``
    pre-encoded QoS 1 messages published as fast as the broker takes them over
    ``publishers`` connections, timed from the first publish to the last row committed."""
    import threading

    broker = EmbeddedBroker(workdir=tmp / "broker", port=0)
    broker.start()
    cluster = Cluster(tmp, db_url, broker, replicas)
    try:
        cluster.start()
        ids = [f"ing-{i:05d}" for i in range(devices)]
        chunks = [ids[i::publishers] for i in range(publishers)]
        payloads = [telemetry_payloads(c, per_device=per_device) for c in chunks]
        total = sum(len(p) for p in payloads)
        cpu0 = cluster.cpu()
        t0 = time.monotonic()
        threads = [
            threading.Thread(
                target=publish_load,
                kwargs={
                    "broker_url": broker.url,
                    "payloads": p,
                    "username": broker.username,
                    "password": broker.password,
                    "client_id": f"bench-load-{i}",
                },
            )
            for i, p in enumerate(payloads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        published_s = time.monotonic() - t0
        wait(lambda: _telemetry_rows(db_url) >= total, 600, f"{total} telemetry rows")
        seconds = time.monotonic() - t0
        cpu = [b - a for a, b in zip(cpu0, cluster.cpu(), strict=True)]
        row_bytes = _telemetry_bytes(db_url) / max(1, _telemetry_rows(db_url))
        return {
            "bytes_per_row": row_bytes,
            "replicas": replicas,
            "messages": total,
            "seconds": seconds,
            "published_s": published_s,
            "rate": total / seconds,
            "cpu_s": cpu,
            "rss_kib": cluster.hwm_kib(),
        }
    finally:
        cluster.stop()
        broker.stop()
