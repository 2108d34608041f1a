"""Fixtures of the console's browser tests: the system Chromium driven by Playwright, the
running controller with its devices (:class:`ConsoleStack`), and logged-in pages that record
every URL they request (no token may ever be in one) and every CSP violation or script error.

Chromium is Debian's (``make chromium``); ``playwright install`` is never run. The stack is
package-scoped: it stops after the last browser test, so its agent and simulated devices do
not load the machine for the rest of the suite. (Under ``-n 2`` these tests are the first
collected, so xdist's first batch gives all of them to one worker; ``--dist loadgroup`` cannot
pin them there: it does not group with pytest 9.2, pytest-dev/pytest-xdist#1386.)"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    ViewportSize,
    sync_playwright,
)

from tests.agent_proc import REPO
from tests.browser.console_stack import ConsoleStack

CHROMIUM = Path("/usr/bin/chromium")
IMAGES = (
    REPO / "docs" / "images"
    if os.environ.get("EDGEFLEET_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "edgefleet-console-screenshots"
)
"""Where the page screenshots go: docs/images (the README's) with
EDGEFLEET_UPDATE_SCREENSHOTS=1, else a temporary folder, so a test run leaves the tree clean."""
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
BROWSER_TESTS = [pytest.mark.slow]
"""Each test module's ``pytestmark``."""


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def chromium(playwright_driver: Playwright) -> Iterator[Browser]:
    """Headless system Chromium; missing is a failure (the tests must run), not a skip."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (Debian's chromium package)")
    browser = playwright_driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    yield browser
    browser.close()


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    """The controller (embedded Mosquitto), tokens per role, the models 1.1.0 (good) and
    1.2.0 (every simulated device fails it), the real agent and the simulated devices."""
    stack = ConsoleStack(tmp_path_factory.mktemp("console"))
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


class Session:
    """A browser context logged in (or not) to the console, and what its pages did."""

    def __init__(self, context: BrowserContext, console: ConsoleStack) -> None:
        self.context = context
        self.console = console
        self.urls: list[str] = []
        self.problems: list[str] = []
        context.set_default_timeout(15_000)
        context.on("request", lambda r: self.urls.append(r.url))
        self.page = context.new_page()
        self.page.on("dialog", lambda d: d.accept())
        self.page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        self.page.on("console", self._console_message)

    def _console_message(self, msg: object) -> None:
        text = str(getattr(msg, "text", ""))
        if "Content Security Policy" in text or "Refused to" in text:
            self.problems.append(f"CSP: {text}")

    def url(self, path: str) -> str:
        return f"{self.console.url}{path}"

    def goto(self, path: str) -> Page:
        resp = self.page.goto(self.url(path))
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        return self.page

    def login(self, role: str) -> Page:
        page = self.page
        page.goto(self.url("/ui/"))
        assert page.url.endswith("/ui/login"), page.url
        page.fill("#token", self.console.tokens[role])
        page.click("#login")
        page.wait_for_url("**/ui/fleet")
        return page

    def csrf(self) -> str:
        value = self.page.get_attribute('#logout-form input[name="csrf"]', "value")
        assert value, "the logout form carries no csrf value"
        return value

    def post_status(self, path: str, fields: dict[str, str]) -> int:
        """POST a form from inside the page (its own cookie, same origin), without following
        a redirect: the status, 0 for a redirect (an opaque answer)."""
        status = self.page.evaluate(
            """([path, fields]) => fetch(path, {method: "POST", redirect: "manual",
                 body: new URLSearchParams(fields)}).then(r => r.status)""",
            [path, fields],
        )
        return int(status)

    def screenshot(self, name: str) -> Path:
        IMAGES.mkdir(parents=True, exist_ok=True)
        path = IMAGES / f"console-{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def session(chromium: Browser, console: ConsoleStack) -> Iterator[Callable[..., Session]]:
    """``session(viewport=DESKTOP)`` opens a fresh browser context. Afterwards: no visited URL
    carried a token or the session cookie, and no page hit a CSP violation or a script error."""
    opened: list[Session] = []

    def open_session(viewport: ViewportSize = DESKTOP) -> Session:
        s = Session(chromium.new_context(viewport=viewport), console)
        opened.append(s)
        return s

    yield open_session
    secrets = list(console.tokens.values())
    for s in opened:
        secrets += [c["value"] for c in s.context.cookies() if c["name"] == "edgefleet_session"]
    try:
        for s in opened:
            leaked = [u for u in s.urls for secret in secrets if secret and secret in u]
            assert not leaked, f"a token or session id in a URL: {leaked}"
            assert not s.problems, s.problems
            assert s.urls, "no request recorded"
    finally:
        for s in opened:
            s.context.close()
