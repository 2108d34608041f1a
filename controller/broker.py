"""The embedded MQTT broker for zero-config runs: a Mosquitto child process on loopback.

amqtt (the pure-Python broker) was tried first: amqtt 0.12 speaks MQTT 3.1.1 only and
refuses the MQTT v5 CONNECT of paho clients ("Unsupported protocol version"), and the
agents and the controller use MQTT v5. So the embedded broker is the ``mosquitto``
binary started as a child process with a generated config: password authentication
(anonymous off), persistence for QoS 1 sessions, packets capped at :data:`MAX_PACKET_SIZE`,
its files under ``{data_dir}/broker``. Production points ``broker.url`` at Mosquitto/EMQX
instead (``packaging/mosquitto``).

Users: the controller's own login (``embedded_broker.username``, its password generated
once) and one login per enrolled device (``edgefleet devices enroll``: username = device
id, the hashes come from the database through ``device_users``). The password file is
rewritten on every start and by :meth:`EmbeddedBroker.refresh_users`, which reloads the
broker (SIGHUP). Device users get the ACL patterns of ``packaging/mosquitto/acl``
(:data:`DEVICE_ACL`): each device publishes only its own topics and reads only its own
desired state. The controller's login keeps read/write on ``edgefleet/v1/#`` because agents
set up before enrolment (and ``tools/demo.py``) still log in with it; for the same reason
``use_username_as_clientid`` stays off here (agents sharing one username would disconnect
each other and the controller); the shipped config has it (packaging/mosquitto/README.md).

When ``port_fallback`` is set (the port was not configured explicitly) and the default
port is taken — typically by a system Mosquitto on 1883 — the broker takes a free port,
remembered in ``{workdir}/port`` so that agents configured with it reconnect after a
restart, and logs which one.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from controller.errors import BrokerError
from protocol.limits import BROKER_MESSAGE_SIZE_LIMIT

log = logging.getLogger(__name__)

PACKET_HEADROOM = 1024
"""Bytes of an MQTT PUBLISH besides its payload that :data:`MAX_PACKET_SIZE` allows for: the
fixed header (≤ 5), the longest edgefleet topic (153: ``edgefleet/v1/{64}/detections/{64}``
with its 2-byte length), the packet id and MQTT v5 properties."""
MAX_PACKET_SIZE = BROKER_MESSAGE_SIZE_LIMIT + PACKET_HEADROOM
"""``max_packet_size`` of the embedded broker and of ``packaging/mosquitto/edgefleet.conf``:
the largest edgefleet message goes through, a larger packet is dropped and its sender
disconnected. (Mosquitto 2.0 asks to replace ``message_size_limit``, the payload-only limit,
with this whole-packet one.)"""

DEFAULT_PORT = 1883
DEVICE_ACL = (
    "pattern write edgefleet/v1/%u/status",
    "pattern write edgefleet/v1/%u/telemetry",
    "pattern write edgefleet/v1/%u/reported",
    "pattern write edgefleet/v1/%u/events",
    "pattern write edgefleet/v1/%u/detections/#",
    "pattern write edgefleet/v1/%u/snapshot/#",
    "pattern read edgefleet/v1/%u/desired",
    "pattern write homeassistant/+/%u/+/config",
)
"""What an enrolled device may do: the patterns of ``packaging/mosquitto/acl``."""

_PR_SET_PDEATHSIG = 1
_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto(explicit: str | None = None) -> str:
    """The mosquitto executable, or BrokerError saying how to get one."""
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise BrokerError(f"embedded_broker.mosquitto {explicit!r} is not an executable file")
    found = shutil.which("mosquitto") or next((p for p in _SEARCH if os.access(p, os.X_OK)), None)
    if found is None:
        raise BrokerError(
            "no MQTT broker configured and mosquitto is not installed: install it "
            "(apt-get install mosquitto / brew install mosquitto) for the embedded broker, "
            "or set broker.url to an existing broker"
        )
    return found


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2.x password-file hash (``$7$``: PBKDF2-HMAC-SHA512), like mosquitto_passwd."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_configured(config_file: Path | None) -> bool:
    """Whether the controller's config file sets ``embedded_broker.port`` itself."""
    if config_file is None:
        return False
    from protocol.config_file import ConfigSource, parse_toml
    from protocol.errors import ProtocolError

    try:
        raw = parse_toml(ConfigSource(str(config_file), config_file.read_text(encoding="utf-8")))
    except (OSError, ProtocolError):
        return True  # the config loader has read it; if in doubt, treat it as explicit
    table = raw.get("embedded_broker")
    return isinstance(table, dict) and "port" in table


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: the broker gets SIGTERM when the controller dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_pdeathsig


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class EmbeddedBroker:
    """Start/stop a password-protected Mosquitto on ``host:port`` with files in ``workdir``."""

    def __init__(
        self,
        *,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str = "edgefleet",
        password: str | None = None,
        mosquitto: str | None = None,
        port_fallback: bool = False,
        device_users: Callable[[], list[tuple[str, str]]] | None = None,
    ) -> None:
        """``port_fallback``: take a free port when ``port`` is taken (it was not configured
        explicitly); ``device_users``: the enrolled devices' (username, password hash)."""
        self.workdir = workdir
        self.port_fallback = port_fallback
        self._device_users = device_users
        self._users_lock = threading.Lock()  # API requests rewrite the password file
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self._mosquitto = mosquitto
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104
        return f"mqtt://{host}:{self.port}"

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = self._load_or_create_password()
        return self._password

    def _load_or_create_password(self) -> str:
        path = self.workdir / "password"
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
        password = secrets.token_urlsafe(18)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return password

    def _write_config(self) -> Path:
        persist = self.workdir / "persist"
        persist.mkdir(parents=True, exist_ok=True)
        passwd = self._write_users()
        acl = self.workdir / "acl"
        rules = [
            "# Written by the edgefleet controller on every start; edits are overwritten.",
            *DEVICE_ACL,
            f"user {self.username}",
            "topic readwrite edgefleet/v1/#",
            "topic readwrite edgefleet/controllers/#",  # replicas' presence (controller.replicas)
            "topic readwrite homeassistant/#",
        ]
        acl.write_text("\n".join(rules) + "\n", encoding="utf-8")
        conf = self.workdir / "mosquitto.conf"
        lines = [
            "# Written by the edgefleet controller on every start; edits are overwritten.",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            "persistence true",
            f"persistence_location {persist}/",
            "autosave_interval 30",
            "max_queued_messages 100000",
            f"max_packet_size {MAX_PACKET_SIZE}",
            # Telemetry is QoS 0: keep it queued for the controller's persistent session
            # while the controller restarts, like QoS 1 messages.
            "queue_qos0_messages true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto would switch to the 'mosquitto' user and lose access
            # to these files; keep the controller's own privileges instead.
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it listens.

        On Linux the child gets SIGTERM when the thread that started it ends (prctl
        PDEATHSIG), so a SIGKILLed controller leaves no broker behind: start it from a
        thread that lives as long as the controller (the main thread, normally).
        """
        exe = find_mosquitto(self._mosquitto)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._choose_port()
        conf = self._write_config()
        log.info(
            "starting the embedded MQTT broker (mosquitto %s; amqtt cannot serve MQTT v5 clients)",
            exe,
        )
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only a prctl call in the child
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                logged = self.log_path.read_text() if self.log_path.exists() else ""
                self.proc = None
                raise BrokerError(
                    f"the embedded mosquitto exited at start: {(err + logged).strip()[-800:]}; "
                    f"check {conf}"
                )
            if _port_in_use(self.url.split("//")[1].split(":")[0], self.port):
                log.info("embedded MQTT broker listening on %s", self.url)
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded mosquitto did not listen on {self.url} within {timeout}s")

    def _choose_port(self) -> None:
        probe = self.host if self.host != "0.0.0.0" else "127.0.0.1"  # noqa: S104
        if self.port == 0:
            self.port = free_port(self.host)
            return
        if not _port_in_use(probe, self.port):
            return
        if not self.port_fallback:
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use (another MQTT broker?): "
                "pass --mqtt-port 0 (any free port) or set embedded_broker.port, or point "
                "broker.url at that broker"
            )
        taken, remembered = self.port, self.workdir / "port"
        try:
            last = int(remembered.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            last = 0
        self.port = last if last and not _port_in_use(probe, last) else free_port(self.host)
        remembered.write_text(f"{self.port}\n", encoding="utf-8")
        log.warning(
            "port %d on %s is taken (another MQTT broker?): the embedded MQTT broker uses port "
            "%d instead (kept for the next start); set embedded_broker.port or --mqtt-port to "
            "choose one",
            taken,
            self.host,
            self.port,
        )

    def _write_users(self) -> Path:
        """The password file: the controller's login and every enrolled device's."""
        users = [(self.username, password_hash(self.password))]
        if self._device_users is not None:
            users += [(u, h) for u, h in self._device_users() if u != self.username]
        passwd = self.workdir / "passwd"
        tmp = passwd.with_name("passwd.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{u}:{h}\n" for u, h in users))
        tmp.replace(passwd)
        return passwd

    def refresh_users(self) -> None:
        """Rewrite the password file from ``device_users`` and make mosquitto reread it."""
        with self._users_lock:
            self._write_users()
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)
                log.info("embedded MQTT broker reloaded its users")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def agent_config(self) -> str:
        """A ``[broker]`` TOML section for agents that connect to this broker."""
        return (
            "[broker]\n"
            f'url = "{self.url}"\n'
            f'username = "{self.username}"\n'
            f'password = "{self.password}"\n'
        )
