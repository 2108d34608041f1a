"""The HTTP API's TLS files (``api.tls_*``), resolved and checked before the server starts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from controller.config import LoadedConfig
from controller.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ApiTls:
    """The HTTP API's TLS files, resolved and checked (they load into an SSL context)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None


def check_api_tls(loaded: LoadedConfig) -> ApiTls | None:
    """The API's TLS settings, None for plain HTTP; ConfigError if the files do not load."""
    api = loaded.config.api
    if api.tls_cert_file is None or api.tls_key_file is None:
        return None
    tls = ApiTls(
        cert_file=loaded.resolve(api.tls_cert_file),
        key_file=loaded.resolve(api.tls_key_file),
        client_ca_file=loaded.resolve(api.tls_client_ca_file) if api.tls_client_ca_file else None,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"api.tls_cert_file {tls.cert_file} / api.tls_key_file {tls.key_file} cannot be "
            f"loaded ({getattr(err, 'strerror', None) or err}): use a PEM certificate and its "
            "unencrypted key, e.g. from `edgefleet certs issue NAME --kind server --ca-dir DIR`"
        ) from err
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"api.tls_client_ca_file {tls.client_ca_file} cannot be loaded "
                f"({getattr(err, 'strerror', None) or err}): use the PEM CA certificate that "
                "signs the client certificates (e.g. the ca.pem of `edgefleet certs init`)"
            ) from err
    return tls
