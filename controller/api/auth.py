"""Bearer-token authentication with roles: viewer < operator < admin.

Failed token attempts are limited per client address (``AuthLimiter``): after
``max_failures`` unknown or revoked tokens within ``window_s`` (each answered 401) the
address gets 429 with ``Retry-After`` on every authenticated endpoint for ``window_s``,
without the token being looked up, even for a valid token
(otherwise a guesser would learn from a 200 among the 429s that it hit). Only presented
tokens that fail count: missing tokens, 403s and successes do not, and a success does not
clear earlier failures (a valid viewer token must not reset the count for guessing others).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.fleet.tokens import Role, TokenInfo, role_allows, verify_token

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="a token from `edgefleet tokens create`")

HOW_TO_CREATE = (
    "create one on the controller host with `edgefleet tokens create --role {role} "
    "--name NAME` and pass it with --token or EDGEFLEET_TOKEN"
)

DEFAULT_MAX_FAILURES = 10
DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_ADDRESSES = 10_000


class AuthLimiter:
    """Counts failed token attempts per client address in a sliding window; thread-safe.

    Memory is bounded: at most ``max_addresses`` addresses are tracked (least recently
    failing ones are forgotten first, and entries older than the window are pruned), each
    with at most ``max_failures`` timestamps. ``max_failures = 0`` disables the limit.
    ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_s: float = DEFAULT_WINDOW_S,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 0 or window_s <= 0 or max_addresses < 1:
            raise ValueError("max_failures >= 0, window_s > 0 and max_addresses >= 1 are needed")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.clock = clock
        self._lock = threading.Lock()
        # address -> recent failure times (oldest first); ordered by last failure.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # address -> monotonic time its block ends.
        self._blocked: OrderedDict[str, float] = OrderedDict()
        self.failures_total = 0
        """Unknown or revoked tokens presented (for /metrics)."""
        self.refused_total = 0
        """Requests answered 429 because their address was blocked (for /metrics)."""

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def blocked_addresses(self) -> int:
        with self._lock:
            self._prune(self.clock())
            return len(self._blocked)

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again if it is blocked now (counted as refused)."""
        if not self.enabled:
            return None
        with self._lock:
            now = self.clock()
            until = self._blocked.get(address)
            if until is None:
                return None
            if until <= now:
                del self._blocked[address]
                return None
            self.refused_total += 1
            return until - now

    def failed(self, address: str) -> bool:
        """Record a failed attempt; True if it was the one that blocks ``address``."""
        with self._lock:
            self.failures_total += 1
            if not self.enabled:
                return False
            now = self.clock()
            self._prune(now)
            times = self._failures.pop(address, None)
            if times is None:
                times = deque(maxlen=self.max_failures)
            times.append(now)
            if len(times) >= self.max_failures and now - times[0] < self.window_s:
                self._blocked.pop(address, None)
                self._blocked[address] = now + self.window_s
                while len(self._blocked) > self.max_addresses:
                    self._blocked.popitem(last=False)
                return True
            self._failures[address] = times
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
            return False

    def tracked_addresses(self) -> int:
        """Addresses with recent failures or a block (bounded by 2 x ``max_addresses``)."""
        with self._lock:
            self._prune(self.clock())
            return len(self._failures) + len(self._blocked)

    def _prune(self, now: float) -> None:
        """Forget failures older than the window and blocks that ended.

        Both maps are ordered by time (last failure; block end, as every block lasts
        ``window_s``), so pruning stops at the first entry that is still current.
        """
        horizon = now - self.window_s
        while self._failures:
            address, times = next(iter(self._failures.items()))
            if times[-1] > horizon:
                break
            del self._failures[address]
        while self._blocked:
            address, until = next(iter(self._blocked.items()))
            if until > now:
                break
            del self._blocked[address]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _too_many(address: str, seconds: float) -> HTTPException:
    wait = max(1, math.ceil(seconds))
    return HTTPException(
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        detail=(
            f"too many failed token attempts from {address}: refused for {wait}s "
            "(Retry-After); check the token (`edgefleet tokens list` on the controller host) "
            "before trying again"
        ),
        headers={"Retry-After": str(wait)},
    )


def client_address(request: Request) -> str:
    """The client's address (uvicorn takes it from X-Forwarded-For for trusted proxies)."""
    return request.client.host if request.client is not None else "unknown"


def require(role: Role) -> Callable[..., TokenInfo]:
    """A dependency that authenticates the request and checks it has at least ``role``."""

    def check(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> TokenInfo:
        limiter: AuthLimiter | None = getattr(request.app.state, "auth_limiter", None)
        address = client_address(request)
        if limiter is not None:
            wait = limiter.retry_after(address)
            if wait is not None:
                raise _too_many(address, wait)
        if creds is None or not creds.credentials:
            raise _unauthorized(
                "missing bearer token (Authorization: Bearer TOKEN); "
                + HOW_TO_CREATE.format(role=role)
            )
        db = request.app.state.db
        with db.begin() as conn:
            info = verify_token(conn, creds.credentials, now=request.app.state.clock())
        if info is None:
            if limiter is not None and limiter.failed(address):
                log.warning(
                    "API: %d failed token attempts from %s within %.0fs; refusing it (429) "
                    "for %.0fs",
                    limiter.max_failures,
                    address,
                    limiter.window_s,
                    limiter.window_s,
                )
            raise _unauthorized(
                "the token is unknown or revoked; " + HOW_TO_CREATE.format(role=role)
            )
        if not role_allows(info.role, role):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=(
                    f"token {info.name!r} has role {info.role}; this needs {role} or higher: "
                    f"ask an admin for a token with `edgefleet tokens create --role {role}`"
                ),
            )
        return info

    return check


Viewer = Annotated[TokenInfo, Depends(require("viewer"))]
Operator = Annotated[TokenInfo, Depends(require("operator"))]
Admin = Annotated[TokenInfo, Depends(require("admin"))]
