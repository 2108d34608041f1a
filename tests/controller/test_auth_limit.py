"""Failed bearer-token attempts are limited per client address, over real HTTP: clients on
distinct loopback source addresses (127.0.0.2, 127.0.0.3) against a real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from controller.api import create_app
from controller.api.auth import AuthLimiter
from controller.config import parse_config
from controller.db.session import Database
from controller.errors import ConfigError
from controller.fleet.tokens import create_token
from controller.service import build_controller
from tests.controller.conftest import Cli, Clock, serving

WRONG = {"Authorization": "Bearer efc_wrong-token"}


@pytest.fixture
def tokens(database: Database, clock: Clock) -> dict[str, str]:
    with database.begin() as conn:
        _, viewer = create_token(conn, name="v", role="viewer", now=clock())
        _, admin = create_token(conn, name="a", role="admin", now=clock())
    return {"viewer": viewer, "admin": admin}


@pytest.fixture
def monotonic() -> Clock:
    """The limiter's (monotonic) clock, advanced by the test."""
    return Clock(1000.0)


@contextmanager
def _served(database: Database, clock: Clock, limiter: AuthLimiter) -> Iterator[str]:
    with serving(create_app(db=database, clock=clock, auth_limiter=limiter)) as url:
        yield url


def _from(address: str, url: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127/8 address is loopback)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_address_with_too_many_failed_tokens_gets_429_for_the_window_even_with_a_valid_one(
    database: Database, clock: Clock, monotonic: Clock, tokens: dict[str, str]
) -> None:
    limiter = AuthLimiter(max_failures=3, window_s=60, clock=monotonic)
    with (
        _served(database, clock, limiter) as url,
        _from("127.0.0.2", url) as a,
        _from("127.0.0.3", url) as b,
    ):
        for _ in range(3):
            assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        blocked = a.get("/api/v1/devices", headers=WRONG)
        assert blocked.status_code == 429
        assert blocked.headers["retry-after"] == "60"
        detail = blocked.json()["detail"]
        assert "too many failed token attempts from 127.0.0.2" in detail
        assert "refused for 60s" in detail
        # Blocked means blocked: a valid token, or none, is not even looked up.
        assert a.get("/api/v1/devices", headers=_bearer(tokens["viewer"])).status_code == 429
        assert a.get("/api/v1/whoami").status_code == 429
        # Endpoints without authentication still answer.
        assert a.get("/healthz").status_code == 200

        # Another address is not affected.
        assert b.get("/api/v1/devices", headers=_bearer(tokens["viewer"])).status_code == 200
        assert b.get("/api/v1/devices", headers=WRONG).status_code == 401

        monotonic.advance(30)
        later = a.get("/api/v1/devices", headers=_bearer(tokens["viewer"]))
        assert later.status_code == 429 and later.headers["retry-after"] == "30"
        monotonic.advance(30.5)
        assert a.get("/api/v1/devices", headers=_bearer(tokens["viewer"])).status_code == 200
        # The block ended with a clean slate: the next failure is the first again.
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401

        metrics = a.get("/metrics").text
    assert "edgefleet_api_auth_failures_total 5.0" in metrics
    assert "edgefleet_api_auth_refused_total 4.0" in metrics
    assert "edgefleet_api_auth_blocked_addresses 0.0" in metrics


def test_only_failures_count_and_they_expire_after_the_window(
    database: Database, clock: Clock, monotonic: Clock, tokens: dict[str, str]
) -> None:
    limiter = AuthLimiter(max_failures=3, window_s=60, clock=monotonic)
    with _served(database, clock, limiter) as url, _from("127.0.0.2", url) as a:
        # Successes, missing tokens and too small a role (403) are not failures ...
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        for _ in range(10):
            assert a.get("/api/v1/devices", headers=_bearer(tokens["viewer"])).status_code == 200
            assert a.get("/api/v1/devices").status_code == 401
            assert a.get("/api/v1/tokens", headers=_bearer(tokens["viewer"])).status_code == 403
        # ... and do not clear earlier failures: the third one blocks.
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        assert a.get("/api/v1/tokens", headers=_bearer(tokens["admin"])).status_code == 429
        assert limiter.blocked_addresses() == 1

        # A sliding window: failures older than window_s no longer count.
        monotonic.advance(61)
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        monotonic.advance(59)
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        monotonic.advance(2)  # the first of these two is now out of the window
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        assert a.get("/api/v1/devices", headers=_bearer(tokens["viewer"])).status_code == 200
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 401
        assert a.get("/api/v1/devices", headers=WRONG).status_code == 429


def test_the_cli_shows_the_429_as_one_line_with_the_wait(
    database: Database, clock: Clock, monotonic: Clock, tmp_path: Path
) -> None:
    limiter = AuthLimiter(max_failures=1, window_s=120, clock=monotonic)
    cli = Cli(tmp_path)
    with _served(database, clock, limiter) as url:
        first = cli("--url", url, "--token", "efc_wrong", "devices", "list")
        assert first.exit_code == 1 and "401" in first.stderr
        second = cli("--url", url, "--token", "efc_wrong", "devices", "list")
    assert second.exit_code == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: request refused (429): too many failed token attempts")
    assert "refused for 120s" in lines[0] and "check the token" in lines[0]


def test_zero_max_failures_turns_the_limit_off(
    database: Database, clock: Clock, monotonic: Clock
) -> None:
    limiter = AuthLimiter(max_failures=0, clock=monotonic)
    with _served(database, clock, limiter) as url, _from("127.0.0.2", url) as a:
        assert all(a.get("/api/v1/devices", headers=WRONG).status_code == 401 for _ in range(30))
    assert limiter.failures_total == 30 and limiter.refused_total == 0


def test_memory_stays_bounded_under_many_addresses_and_is_pruned_by_time() -> None:
    clock = Clock(0.0)
    limiter = AuthLimiter(max_failures=2, window_s=10, max_addresses=100, clock=clock)
    for i in range(5000):
        address = f"10.0.{i // 256}.{i % 256}"
        limiter.failed(address)
        limiter.failed(address)  # blocks it
        limiter.failed(f"172.16.{i // 256}.{i % 256}")  # one failure, tracked
    assert limiter.tracked_addresses() <= 200
    assert limiter.retry_after("10.0.19.135") is not None  # the newest block is kept
    assert limiter.retry_after("10.0.0.0") is None  # the oldest was forgotten
    clock.advance(10)
    assert limiter.tracked_addresses() == 0


def test_the_limit_comes_from_the_api_config(tmp_path: Path) -> None:
    cfg = parse_config("[api]\nauth_max_failures = 4\nauth_window_s = 5\n")
    assert (cfg.api.auth_max_failures, cfg.api.auth_window_s) == (4, 5)
    defaults = parse_config("")
    assert (defaults.api.auth_max_failures, defaults.api.auth_window_s) == (10, 60)
    ctl = build_controller(
        {
            "data_dir": str(tmp_path / "data"),
            "broker": {"url": "mqtt://127.0.0.1:1"},
            "api": {"auth_max_failures": 4},
        }
    )
    try:
        limiter = ctl.app.state.auth_limiter
        assert (limiter.max_failures, limiter.window_s) == (4, 60)
    finally:
        ctl.db.dispose()
    with pytest.raises(ConfigError, match=r"api\.auth_max_failures must be >= 0"):
        parse_config("[api]\nauth_max_failures = -1\n")
    with pytest.raises(ConfigError, match=r"api\.auth_window_s must be > 0"):
        parse_config("[api]\nauth_window_s = 0\n")
