"""The HTTP API over TLS: a real controller serving HTTPS (and mTLS) with certificates from
``controller.certs``, the CLI trusting the CA, and one-line errors for clients that do not."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller import certs
from controller.config import parse_config
from controller.errors import ConfigError
from controller.service import Controller, build_controller
from tests.broker import Mosquitto
from tests.controller.conftest import Cli

pytestmark = pytest.mark.slow


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A CA plus a server certificate for localhost/127.0.0.1, written by `edgefleet certs`."""
    folder = tmp_path / "ca"
    cli = Cli(tmp_path)
    made = cli("certs", "init", "--dir", str(folder))
    assert made.exit_code == 0, made.output
    issued = cli("certs", "issue", "api", "--ca-dir", str(folder), "--kind", "server")
    assert issued.exit_code == 0, issued.output
    return folder


def _controller(
    tmp_path: Path, mosquitto: Mosquitto, name: str, **api: Any
) -> Iterator[tuple[Controller, str]]:
    ctl = build_controller(
        {
            "data_dir": str(tmp_path / name),
            "broker": {"url": mosquitto.url, "client_id": f"ctl-{name}"},
            "api": {"port": 0, **api},
        }
    )
    ctl.start()
    try:
        token = Cli(tmp_path).json(
            "tokens", "create", "--role", "admin", "--data-dir", str(tmp_path / name)
        )["token"]
        yield ctl, token
    finally:
        ctl.stop()


@pytest.fixture
def https(tmp_path: Path, mosquitto: Mosquitto, ca: Path) -> Iterator[tuple[Controller, str]]:
    yield from _controller(
        tmp_path,
        mosquitto,
        "https",
        tls_cert_file=str(ca / "api.pem"),
        tls_key_file=str(ca / "api.key"),
    )


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return str(lines[0])


def test_https_controller_works_with_the_ca_and_refuses_clients_without_it(
    https: tuple[Controller, str], ca: Path, tmp_path: Path
) -> None:
    ctl, token = https
    url = ctl.api_url
    assert url.startswith("https://127.0.0.1:")
    assert url in ctl.describe() and "--ca-file" in ctl.describe()
    cli = Cli(tmp_path)

    # --ca-file, EDGEFLEET_CA_FILE and ca_file in cli.toml (relative to the file) all work.
    assert cli.json(
        "--url", url, "--token", token, "--ca-file", str(ca / "ca.pem"), "tokens", "list"
    )
    cli.env["EDGEFLEET_CA_FILE"] = str(ca / "ca.pem")
    assert cli("--url", url, "--token", token, "devices", "list").exit_code == 0
    del cli.env["EDGEFLEET_CA_FILE"]
    conf = tmp_path / "edgefleet" / "cli.toml"
    conf.parent.mkdir()
    (conf.parent / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    conf.write_text(f'url = "{url}"\ntoken = "{token}"\nca_file = "ca.pem"\n')
    whoami = cli("devices", "list", "--json")
    assert whoami.exit_code == 0 and json.loads(whoami.stdout) == []
    conf.unlink()

    # Without the CA: the TLS verify error becomes one line saying to pass the CA.
    line = _one_line_error(cli("--url", url, "--token", token, "devices", "list"))
    assert f"the controller at {url} presented a TLS certificate this client does not trust" in (
        line
    )
    assert "--ca-file" in line and "EDGEFLEET_CA_FILE" in line
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz")
    trusting = ssl.create_default_context(cafile=ca / "ca.pem")
    assert httpx.get(f"{url}/healthz", verify=trusting).status_code == 200

    # Plain HTTP to the HTTPS port: no answer, and the hint to use https://.
    plain = url.replace("https://", "http://")
    line = _one_line_error(cli("--url", plain, "--token", token, "devices", "list"))
    assert "use https://" in line

    # A CA file that is not a certificate: a config error naming it.
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    line = _one_line_error(
        cli("--url", url, "--token", token, "--ca-file", str(bogus), "devices", "list")
    )
    assert f"cannot load the CA certificate {bogus}" in line


def test_a_certificate_for_another_host_is_refused_with_what_to_do(
    tmp_path: Path, mosquitto: Mosquitto, ca: Path
) -> None:
    certs.issue(ca, name="ip-only", kind="server", dns=[], ips=["127.0.0.1"])
    for ctl, token in _controller(
        tmp_path,
        mosquitto,
        "ip-only",
        tls_cert_file=str(ca / "ip-only.pem"),
        tls_key_file=str(ca / "ip-only.key"),
    ):
        by_name = ctl.api_url.replace("127.0.0.1", "localhost")
        line = _one_line_error(
            Cli(tmp_path)(
                "--url",
                by_name,
                "--token",
                token,
                "--ca-file",
                str(ca / "ca.pem"),
                "devices",
                "list",
            )
        )
        assert "not valid for the host" in line and "--dns" in line


def test_mtls_needs_a_client_certificate_signed_by_the_configured_ca(
    tmp_path: Path, mosquitto: Mosquitto, ca: Path
) -> None:
    client = certs.issue(ca, name="operator-1", kind="device", out_dir=tmp_path / "client")
    other = tmp_path / "other-ca"
    certs.init_ca(other)
    stranger = certs.issue(other, name="stranger", kind="device")
    for ctl, token in _controller(
        tmp_path,
        mosquitto,
        "mtls",
        tls_cert_file=str(ca / "api.pem"),
        tls_key_file=str(ca / "api.key"),
        tls_client_ca_file=str(ca / "ca.pem"),
    ):
        assert "client certificate (mTLS)" in ctl.describe()
        cli = Cli(tmp_path)
        base = ["--url", ctl.api_url, "--token", token, "--ca-file", str(ca / "ca.pem")]
        line = _one_line_error(cli(*base, "devices", "list"))
        assert "may require a client certificate (mTLS)" in line and "--client-cert" in line
        line = _one_line_error(
            cli(
                *base,
                "--client-cert",
                str(stranger.cert),
                "--client-key",
                str(stranger.key),
                "devices",
                "list",
            )
        )
        assert "may have refused this client certificate" in line
        ok = cli(
            *base,
            "--client-cert",
            str(client.cert),
            "--client-key",
            str(client.key),
            "tokens",
            "list",
        )
        assert ok.exit_code == 0, ok.output
        cli.env["EDGEFLEET_CLIENT_CERT"] = str(client.cert)
        line = _one_line_error(cli(*base, "devices", "list"))
        assert "needs its key" in line


def test_tls_config_keys_go_together_and_bad_files_are_named(tmp_path: Path, ca: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert_file and api\.tls_key_file go together"):
        parse_config('[api]\ntls_cert_file = "api.pem"\n')
    with pytest.raises(ConfigError, match="go together"):
        parse_config('[api]\ntls_key_file = "api.key"\n')
    with pytest.raises(
        ConfigError, match=r"tls_client_ca_file \(client certificates\) needs HTTPS"
    ):
        parse_config('[api]\ntls_client_ca_file = "ca.pem"\n')
    cfg = parse_config(
        '[api]\ntls_cert_file = "a.pem"\ntls_key_file = "a.key"\ntls_client_ca_file = "ca.pem"\n'
    )
    assert cfg.api.tls_client_ca_file == "ca.pem"

    # The files are loaded when the controller is built: a wrong key is named before anything runs.
    certs.issue(ca, name="other", kind="server")
    base = {"data_dir": str(tmp_path / "d"), "broker": {"url": "mqtt://127.0.0.1:1"}}
    with pytest.raises(ConfigError, match=r"api\.tls_cert_file .*api\.pem .* cannot be loaded"):
        build_controller(
            {
                **base,
                "api": {
                    "tls_cert_file": str(ca / "api.pem"),
                    "tls_key_file": str(ca / "other.key"),
                },
            }
        )
    with pytest.raises(ConfigError, match=r"api\.tls_client_ca_file .*missing\.pem cannot be"):
        build_controller(
            {
                **base,
                "api": {
                    "tls_cert_file": str(ca / "api.pem"),
                    "tls_key_file": str(ca / "api.key"),
                    "tls_client_ca_file": str(tmp_path / "missing.pem"),
                },
            }
        )
