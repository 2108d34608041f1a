"""Enroll a device: broker credentials (password and/or certificate) and a ready agent config.

``enroll()`` validates the device id, adds/updates the device's line in a Mosquitto
password file (``$7$`` PBKDF2-SHA512 hashes, like ``mosquitto_passwd``) and/or signs a
device certificate (CN = device id) with the CA, and returns the agent's TOML config
with the matching ``[broker]`` section. Mosquitto rereads the password file on SIGHUP.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text
from controller.broker import password_hash
from controller.certs import CA_CERT, CertPair, issue
from controller.errors import ControllerError
from protocol.errors import ProtocolError
from protocol.topics import validate_device_id

DEFAULT_BROKER_URL = "mqtts://localhost:8883"
DEFAULT_SOURCE = "v4l2:0"
DEFAULT_MODEL = "builtin:blazeface-short-int8"


class EnrollError(ControllerError):
    """A device cannot be enrolled (bad id, no credentials asked for, unwritable files)."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What ``enroll`` created: the credentials and the agent config text."""

    device_id: str
    username: str | None
    password: str | None
    cert: CertPair | None
    config: str


def set_password(password_file: str | Path, username: str, password: str) -> None:
    """Add or replace ``username``'s line in a Mosquitto password file (written 0600)."""
    path = Path(password_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except OSError as err:
        raise EnrollError(f"cannot read the password file {path}: {err.strerror}") from err
    entry = f"{username}:{password_hash(password)}"
    kept = [ln for ln in lines if ln.strip() and ln.split(":", 1)[0] != username]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join([*kept, entry]) + "\n", mode=0o600)
    except OSError as err:
        raise EnrollError(
            f"cannot write the password file {path}: {err.strerror}; check the folder's "
            "permissions or pass another --password-file"
        ) from err


def _q(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def agent_config(
    device_id: str,
    *,
    broker_url: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    state_dir: str = "/var/lib/edgefleet",
    source: str = DEFAULT_SOURCE,
    trusted_keys: list[str] | None = None,
) -> str:
    """The agent's TOML config for ``device_id`` with the given broker credentials
    (and ``[ota] trusted_keys``, the controller's signing keys, when given)."""
    broker = [f"url = {_q(broker_url)}"]
    for key, value in (
        ("username", username),
        ("password", password),
        ("ca_file", ca_file),
        ("cert_file", cert_file),
        ("key_file", key_file),
    ):
        if value is not None:
            broker.append(f"{key} = {_q(value)}")
    if trusted_keys:
        ota = f"\n[ota]\ntrusted_keys = [{', '.join(_q(k) for k in trusted_keys)}]\n"
    else:
        ota = (
            "\n[ota]\n# No trusted signing key: every model update is refused (no_trusted_keys)\n"
            "# until the public key that signs the bundles is listed here, e.g.\n"
            '# trusted_keys = ["signing.pub"]\n'
        )
    return (
        "# edgefleet agent configuration written by `edgefleet devices enroll`.\n"
        "# Validate with:  edgefleet-agent check-config FILE\n"
        "config_version = 1\n"
        f"device_id = {_q(device_id)}\n"
        f"state_dir = {_q(state_dir)}\n"
        "\n[broker]\n" + "\n".join(broker) + "\n" + ota + "\n[[streams]]\n"
        'name = "front"\n'
        f"source = {_q(source)}\n"
        f"model = {_q(DEFAULT_MODEL)}\n"
    )


def enroll(
    device_id: str,
    *,
    broker_url: str = DEFAULT_BROKER_URL,
    ca_file: str | Path | None = None,
    cert_dir: str | Path | None = None,
    password_file: str | Path | None = None,
    state_dir: str = "/var/lib/edgefleet",
    source: str = DEFAULT_SOURCE,
) -> Enrollment:
    """Create the device's broker credentials and its agent config.

    ``password_file``: a random password for user ``device_id`` is added/updated there.
    ``cert_dir``: a device certificate ``{device_id}.pem``/``.key`` is signed by the CA
    ``ca_file`` (its folder must hold ``ca.key``, as ``edgefleet certs init`` writes it).
    At least one of the two is required. ``ca_file`` also goes into the agent config,
    so the agent verifies the broker's certificate.
    """
    try:
        validate_device_id(device_id)
    except ProtocolError as err:
        raise EnrollError(str(err)) from err
    if password_file is None and cert_dir is None:
        raise EnrollError(
            "no credentials asked for: pass --password-file (a Mosquitto password file to "
            "add the device to) and/or --cert-dir (where to write a device certificate)"
        )
    if not broker_url.startswith(("mqtt://", "mqtts://")):
        raise EnrollError(f"broker url {broker_url!r}: use mqtts://host:8883 or mqtt://host:port")
    ca = Path(ca_file).resolve() if ca_file is not None else None
    if ca is not None and not ca.is_file():
        raise EnrollError(f"CA certificate {ca} not found: run `edgefleet certs init` first")
    cert: CertPair | None = None
    if cert_dir is not None:
        if ca is None:
            raise EnrollError(
                "--cert-dir needs --ca: the CA certificate (its folder must hold ca.key) that "
                "signs the device certificate"
            )
        if ca.name != CA_CERT:
            raise EnrollError(
                f"--ca {ca}: to sign device certificates pass the {CA_CERT} written by "
                "`edgefleet certs init` (with ca.key next to it)"
            )
        cert = issue(ca.parent, name=device_id, kind="device", out_dir=Path(cert_dir).resolve())
    password: str | None = None
    if password_file is not None:
        password = secrets.token_urlsafe(24)
        set_password(password_file, device_id, password)
    config = agent_config(
        device_id,
        broker_url=broker_url,
        username=device_id if password is not None else None,
        password=password,
        ca_file=str(ca) if ca is not None else None,
        cert_file=str(cert.cert) if cert else None,
        key_file=str(cert.key) if cert else None,
        state_dir=state_dir,
        source=source,
    )
    return Enrollment(
        device_id=device_id,
        username=device_id if password is not None else None,
        password=password,
        cert=cert,
        config=config,
    )


def write_config(path: str | Path, text: str) -> None:
    """Write the agent config (it may hold a password: 0600); refuses to overwrite."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EnrollError(
            f"{p} already exists; refusing to overwrite it: pass another --out"
        ) from None
    except OSError as err:
        raise EnrollError(f"cannot write {p}: {err.strerror}") from err
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
