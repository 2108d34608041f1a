"""A small certificate authority for the broker's TLS: CA, server and device certificates.

Keys are ECDSA P-256 (accepted by Mosquitto/OpenSSL 3, Python's ssl and paho). A device
certificate's common name is the device id, so Mosquitto with
``use_identity_as_username true`` maps the certificate to the device id and the ACL
patterns (``%u``) apply. Files are never overwritten; private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from controller.errors import ControllerError
from protocol.errors import ProtocolError
from protocol.topics import validate_device_id

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_SERVER_DNS = ("localhost",)
DEFAULT_SERVER_IPS = ("127.0.0.1",)

Kind = Literal["server", "device"]


class CertificateError(ControllerError):
    """A certificate or key cannot be created, read or written."""


@dataclass(frozen=True, slots=True)
class CertPair:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` (refusing to overwrite) with ``mode``, fsynced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(
            f"{path} already exists; refusing to overwrite it: move it away or choose "
            "another folder/name"
        ) from None
    except OSError as err:
        raise CertificateError(f"cannot write {path}: {err.strerror}") from err
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _refuse_existing(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            raise CertificateError(
                f"{p} already exists; refusing to overwrite it: move it away or choose "
                "another folder/name"
            )


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as err:
        raise CertificateError(
            "certificates need the 'cryptography' package: pip install cryptography"
        ) from err


def _check_days(days: int) -> None:
    _require_cryptography()
    if days < 1:
        raise CertificateError(f"days must be at least 1, not {days}")


def init_ca(
    directory: str | Path, *, common_name: str = "edgefleet CA", days: int = 3650
) -> CertPair:
    """Create ``ca.pem`` and ``ca.key`` (0600) in ``directory``; refuses to overwrite."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    _check_days(days)
    folder = Path(directory)
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    _refuse_existing(cert_path, key_path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CertificateError(f"cannot create {folder}: {err.strerror}") from err
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(key_path, _key_pem(key), mode=0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return CertPair(cert=cert_path, key=key_path)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as err:
        raise CertificateError(
            f"no CA in {ca_dir} ({err.filename} is missing): run `edgefleet certs init "
            f"--dir {ca_dir}` first"
        ) from err
    except (OSError, ValueError, TypeError) as err:
        raise CertificateError(
            f"cannot load the CA from {ca_dir}: {err}; expected the PEM files {CA_CERT} and "
            f"{CA_KEY} (unencrypted) written by `edgefleet certs init`"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"{key_path} is not an ECDSA key; use a CA made by `edgefleet certs init`"
        )
    return cert, key


def issue(
    ca_dir: str | Path,
    *,
    name: str,
    kind: Kind,
    dns: Sequence[str] | None = None,
    ips: Sequence[str] | None = None,
    days: int = 825,
    out_dir: str | Path | None = None,
) -> CertPair:
    """Sign ``{name}.pem`` / ``{name}.key`` (0600) with the CA in ``ca_dir``.

    ``kind="server"``: serverAuth, SANs ``dns``/``ips`` (default localhost, 127.0.0.1).
    ``kind="device"``: clientAuth, common name = ``name`` = the device id (validated).
    Written to ``out_dir`` (default ``ca_dir``); refuses to overwrite.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _check_days(days)
    if kind not in ("server", "device"):
        raise CertificateError(f"unknown certificate kind {kind!r}: use 'server' or 'device'")
    if kind == "device":
        try:
            validate_device_id(name)
        except ProtocolError as err:
            raise CertificateError(f"device certificate: {err}") from err
    elif not name or "/" in name or name.startswith("."):
        raise CertificateError(f"invalid certificate name {name!r}: use a plain file name")
    ca_folder = Path(ca_dir)
    folder = Path(out_dir) if out_dir is not None else ca_folder
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    _refuse_existing(cert_path, key_path)
    ca_cert, ca_key = _load_ca(ca_folder)

    sans: list[x509.GeneralName] = []
    if kind == "server":
        for d in DEFAULT_SERVER_DNS if dns is None else dns:
            sans.append(x509.DNSName(d))
        for ip in DEFAULT_SERVER_IPS if ips is None else ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as err:
                raise CertificateError(f"{ip!r} is not an IP address: {err}") from err
        if not sans:
            raise CertificateError("a server certificate needs at least one DNS name or IP address")
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        sans.extend(x509.DNSName(d) for d in dns or ())
        eku = ExtendedKeyUsageOID.CLIENT_AUTH

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CertificateError(f"cannot create {folder}: {err.strerror}") from err
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_new(key_path, _key_pem(key), mode=0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return CertPair(cert=cert_path, key=key_path)
