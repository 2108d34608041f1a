"""HTTP client of the controller API, used by the operator CLI.

Every failure becomes a ControllerError subclass whose message says what to do: the
server's own explanation for 401/403/404, how to start or find the controller when it
cannot be reached.
"""

from __future__ import annotations

from typing import Any

import httpx

from controller.errors import (
    ApiError,
    AuthError,
    ConnectionFailedError,
    NotFoundError,
)

DEFAULT_URL = "http://127.0.0.1:8080"


class ControllerClient:
    """A thin typed wrapper over the /api/v1 endpoints; returns the decoded JSON."""

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
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
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise ConnectionFailedError(
                f"cannot reach the controller at {self.url} ({err}); start it with "
                "`edgefleet controller serve`, or pass --url / set EDGEFLEET_URL"
            ) from err
        except httpx.HTTPError as err:
            raise ApiError(f"request to {self.url}{path} failed: {err}") from err
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
