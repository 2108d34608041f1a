"""controller.certs: a CA, server and device certificates that TLS stacks accept."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.certs import CertificateError, init_ca, issue
from controller.cli.security import certs
from controller.errors import ControllerError


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_init_ca_writes_a_p256_ca_with_a_private_key_file(tmp_path: Path) -> None:
    pair = init_ca(tmp_path / "ca", common_name="fleet CA", days=30)
    assert pair.cert == tmp_path / "ca" / "ca.pem" and pair.key == tmp_path / "ca" / "ca.key"
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    cert = _load(pair.cert)
    assert _cn(cert) == "fleet CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_init_ca_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    first = init_ca(tmp_path, days=1).cert.read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        init_ca(tmp_path, days=1)
    assert (tmp_path / "ca.pem").read_bytes() == first


def test_server_certificate_has_server_auth_and_default_sans(tmp_path: Path) -> None:
    ca = init_ca(tmp_path, days=1)
    pair = issue(tmp_path, name="server", kind="server", days=1, out_dir=tmp_path / "srv")
    cert = _load(pair.cert)
    cert.verify_directly_issued_by(_load(ca.cert))
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600


def test_server_certificate_takes_the_given_sans(tmp_path: Path) -> None:
    init_ca(tmp_path, days=1)
    pair = issue(tmp_path, name="mqtt", kind="server", dns=["mqtt.example"], ips=["10.0.0.5"])
    sans = _load(pair.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mqtt.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_device_certificate_has_the_device_id_as_common_name_and_client_auth(
    tmp_path: Path,
) -> None:
    ca = init_ca(tmp_path, days=1)
    pair = issue(tmp_path, name="cam-07", kind="device", days=1)
    cert = _load(pair.cert)
    cert.verify_directly_issued_by(_load(ca.cert))
    assert _cn(cert) == "cam-07"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_device_certificate_rejects_an_invalid_device_id(tmp_path: Path) -> None:
    init_ca(tmp_path, days=1)
    with pytest.raises(CertificateError, match="invalid device id"):
        issue(tmp_path, name="Cam/7", kind="device")
    assert not list(tmp_path.glob("Cam*"))


def test_issue_without_a_ca_says_to_run_certs_init(tmp_path: Path) -> None:
    with pytest.raises(ControllerError, match="certs init"):
        issue(tmp_path, name="server", kind="server")


def test_issue_refuses_to_overwrite_a_certificate(tmp_path: Path) -> None:
    init_ca(tmp_path, days=1)
    issue(tmp_path, name="cam-1", kind="device")
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        issue(tmp_path, name="cam-1", kind="device")


def test_certs_cli_creates_a_ca_and_issues_a_server_certificate(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(certs, ["init", "--dir", str(tmp_path), "--days", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        certs,
        ["issue", "broker", "--ca-dir", str(tmp_path), "--kind", "server", "--dns", "mqtt.lan"],
    )
    assert res.exit_code == 0, res.output
    sans = _load(tmp_path / "broker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["mqtt.lan"]
