"""HTTP client of the controller API, used by the operator CLI.

Every failure becomes a ControllerError subclass whose message says what to do: the
server's own explanation for 401/403/404, how to start or find the controller when it
cannot be reached.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from controller.errors import (
    ApiError,
    AuthError,
    ConfigError,
    ConnectionFailedError,
    ControllerError,
    NotFoundError,
)

DEFAULT_URL = "http://127.0.0.1:8080"
HOW_TO_TRUST = (
    "pass the CA certificate that signed it with --ca-file (or EDGEFLEET_CA_FILE, or "
    "ca_file in ~/.config/edgefleet/cli.toml), e.g. the ca.pem of `edgefleet certs init`"
)
HOW_TO_PRESENT = (
    "pass a certificate signed by the CA of the controller's api.tls_client_ca_file with "
    "--client-cert/--client-key (or EDGEFLEET_CLIENT_CERT/EDGEFLEET_CLIENT_KEY, or "
    "client_cert_file/client_key_file in ~/.config/edgefleet/cli.toml)"
)


def tls_context(
    *,
    ca_file: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
) -> ssl.SSLContext | None:
    """A client TLS context trusting only ``ca_file`` (system CAs without it), presenting
    ``client_cert_file``/``client_key_file`` when given; None when nothing is set."""
    if ca_file is None and client_cert_file is None and client_key_file is None:
        return None
    if (client_cert_file is None) != (client_key_file is None):
        raise ConfigError(
            "a client certificate needs its key: pass both --client-cert and --client-key "
            "(or neither)"
        )
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"cannot load the CA certificate {ca_file}: {getattr(err, 'strerror', None) or err}; "
            "--ca-file must be a PEM file such as the ca.pem of `edgefleet certs init`"
        ) from err
    if client_cert_file is not None:
        try:
            ctx.load_cert_chain(client_cert_file, client_key_file)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"cannot load the client certificate {client_cert_file} / key "
                f"{client_key_file}: {getattr(err, 'strerror', None) or err}; pass PEM files "
                "that belong together (e.g. from `edgefleet certs issue NAME --kind device`)"
            ) from err
    return ctx


def _ssl_cause(err: BaseException) -> BaseException | None:
    """The ssl error under an httpx error, if any (httpx chains httpcore's, which chains it)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _tls_problem(url: str, cause: BaseException | None, text: str) -> str | None:
    """What went wrong in the TLS handshake and what to do, or None if it was not TLS."""
    upper = text.upper()
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or text
        if "mismatch" in reason.lower():
            return (
                f"the controller's TLS certificate is not valid for the host in {url} "
                f"({reason}): use a host name or IP address its certificate lists in --url, "
                "or issue one with `edgefleet certs issue NAME --kind server --dns HOST --ip IP`"
            )
        return (
            f"the controller at {url} presented a TLS certificate this client does not trust "
            f"({reason}); {HOW_TO_TRUST}"
        )
    if "CERTIFICATE_REQUIRED" in upper or "CERTIFICATE REQUIRED" in upper:
        return f"the controller at {url} requires a client certificate (mTLS); {HOW_TO_PRESENT}"
    if any(s in upper for s in ("UNKNOWN_CA", "BAD_CERTIFICATE", "UNSUPPORTED_CERTIFICATE")):
        return (
            f"the controller at {url} refused this client's certificate ({text}); {HOW_TO_PRESENT}"
        )
    if any(s in upper for s in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH")):
        return (
            f"the controller at {url} does not speak TLS ({text}); use http:// in --url, or "
            "set api.tls_cert_file/api.tls_key_file on the controller to serve HTTPS"
        )
    return None


def transport_error(
    url: str, err: httpx.HTTPError, *, doing: str = "request", client_cert: bool = False
) -> ControllerError:
    """A one-line, actionable error for an httpx failure to talk to the controller at ``url``.

    ``client_cert``: whether a client certificate was presented (with TLS 1.3 a controller
    that refuses or misses one just closes the connection after the handshake).
    """
    cause = _ssl_cause(err)
    problem = _tls_problem(url, cause, str(cause if cause is not None else err))
    if problem is not None:
        return ConnectionFailedError(problem)
    if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
        return ConnectionFailedError(
            f"cannot reach the controller at {url} ({err}); start it with "
            "`edgefleet controller serve`, or pass --url / set EDGEFLEET_URL"
        )
    hint = ""
    if isinstance(err, httpx.RemoteProtocolError | httpx.ReadError):
        if url.startswith("http://"):
            hint = "; if the controller serves HTTPS (api.tls_cert_file), use https:// in --url"
        elif client_cert:
            hint = (
                "; the controller may have refused this client certificate (mTLS): use one "
                "signed by the CA of its api.tls_client_ca_file"
            )
        else:
            hint = "; the controller may require a client certificate (mTLS): " + HOW_TO_PRESENT
    return ApiError(f"{doing} to {url} failed: {str(err).rstrip('.')}{hint}")


class ControllerClient:
    """A thin typed wrapper over the /api/v1 endpoints; returns the decoded JSON."""

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
    ) -> None:
        """``ca_file``: trust only this CA for https:// (default: the system's CAs);
        ``client_cert_file``/``client_key_file``: present a client certificate (mTLS)."""
        self.url = url.rstrip("/")
        self.client_cert = client_cert_file is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ctx = tls_context(
            ca_file=ca_file, client_cert_file=client_cert_file, client_key_file=client_key_file
        )
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=ctx if ctx is not None else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != []}
        try:
            resp = self._http.request(method, path, params=clean, json=json)
        except httpx.HTTPError as err:
            raise transport_error(self.url, err, client_cert=self.client_cert) from err
        if resp.is_success:
            try:
                return resp.json()
            except ValueError as err:
                raise ApiError(
                    f"{self.url}{path} answered with something that is not JSON; is --url "
                    "pointing at the edgefleet controller?"
                ) from err
        detail = _detail(resp)
        code = resp.status_code
        if code in (401, 403):
            raise AuthError(f"{code}: {detail}", status=code)
        if code == 404:
            if path.startswith("/api/") and "detail" not in _json_or_empty(resp):
                detail = f"{self.url}{path} does not exist; is --url the edgefleet controller?"
            raise NotFoundError(detail, status=code)
        if code >= 500:
            raise ApiError(f"the controller failed with {code}: {detail}; see its log", status=code)
        raise ApiError(f"request refused ({code}): {detail}", status=code)

    # --- endpoints ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/healthz")
        return result

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/api/v1/whoami")
        return result

    def devices(
        self,
        *,
        tags: list[str] | None = None,
        online: bool | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        params = {"tag": tags or [], "online": online, "model": model, "limit": limit}
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/devices", params=params)[
            "devices"
        ]
        return result

    def device(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/api/v1/devices/{device_id}")
        return result

    def change_tags(self, device_id: str, *, add: list[str], remove: list[str]) -> list[str]:
        body = {"add": add, "remove": remove}
        result: list[str] = self._request("POST", f"/api/v1/devices/{device_id}/tags", json=body)[
            "tags"
        ]
        return result

    def telemetry(
        self,
        device_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        params = {"since": since, "until": until, "limit": limit}
        result: list[dict[str, Any]] = self._request(
            "GET", f"/api/v1/devices/{device_id}/telemetry", params=params
        )["samples"]
        return result

    def events(self, *, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params = {"device": device_id, "limit": limit}
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/events", params=params)[
            "events"
        ]
        return result

    def tokens(self, *, include_revoked: bool = False) -> list[dict[str, Any]]:
        params = {"include_revoked": include_revoked or None}
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/tokens", params=params)[
            "tokens"
        ]
        return result

    def create_token(self, *, name: str, role: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST", "/api/v1/tokens", json={"name": name, "role": role}
        )
        return result

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/api/v1/tokens/{token_id}")
        return result

    # --- rollouts -------------------------------------------------------------------------

    def create_credentials(self, device_id: str) -> dict[str, Any]:
        """Enrol ``device_id`` on the embedded broker: a new password, broker URL, keys."""
        result: dict[str, Any] = self._request("POST", f"/api/v1/devices/{device_id}/credentials")
        return result

    def revoke_credentials(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/api/v1/devices/{device_id}/credentials")
        return result

    def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/api/v1/rollouts", json=body)
        return result

    def rollouts(
        self, *, states: list[str] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params = {"state": states or [], "limit": limit}
        result: list[dict[str, Any]] = self._request("GET", "/api/v1/rollouts", params=params)[
            "rollouts"
        ]
        return result

    def rollout(self, rollout_id: int, *, devices: bool = True) -> dict[str, Any]:
        params = {"devices": None if devices else "false"}
        result: dict[str, Any] = self._request(
            "GET", f"/api/v1/rollouts/{rollout_id}", params=params
        )
        return result

    def rollout_action(
        self, rollout_id: int, action: str, *, reason: str | None = None
    ) -> dict[str, Any]:
        """``action``: pause, resume, abort or rollback."""
        body = {"reason": reason} if reason else None
        result: dict[str, Any] = self._request(
            "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body
        )
        return result


def _json_or_empty(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _detail(resp: httpx.Response) -> str:
    detail = _json_or_empty(resp).get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}")
        return "; ".join(parts) or resp.text[:300]
    return resp.text[:300] or resp.reason_phrase
