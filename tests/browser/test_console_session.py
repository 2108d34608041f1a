"""The console's session in a real browser: logging in per role, the cookie's flags, the
security headers, a refused login, and the server refusing a viewer's (or a forged) POST."""

from __future__ import annotations

from collections.abc import Callable

from tests.browser.conftest import BROWSER_TESTS, Session
from tests.browser.console_stack import GOOD, MODEL, ConsoleStack

pytestmark = BROWSER_TESTS

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def test_viewer_and_operator_log_in_with_a_strict_http_only_cookie_and_the_csp(
    session: Callable[..., Session],
) -> None:
    for role in ("viewer", "operator"):
        s = session()
        page = s.login(role)
        assert page.inner_text("#whoami").strip() == f"{role} ({role})"
        (cookie,) = [c for c in s.context.cookies() if c["name"] == "edgefleet_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
        assert cookie["path"] == "/ui" and not cookie["secure"], cookie  # plain http here
        resp = page.goto(s.url("/ui/rollouts"))
        assert resp is not None and resp.status == 200
        headers = resp.headers
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        for nav in ("#nav-fleet", "#nav-models", "#nav-rollouts"):
            assert page.locator(nav).is_visible(), nav
        # Action controls are rendered for operators only.
        assert page.locator("#new-rollout").count() == (1 if role == "operator" else 0)
        # Logging out ends the session: the next page asks to log in again.
        page.click("#logout")
        page.goto(s.url("/ui/fleet"))
        assert page.url.endswith("/ui/login"), page.url


def test_a_bad_token_is_refused_with_401_and_says_so(session: Callable[..., Session]) -> None:
    s = session()
    page = s.page
    page.goto(s.url("/ui/fleet"))
    assert page.url.endswith("/ui/login"), page.url  # not logged in: to the login page
    assert page.get_attribute("#token", "type") == "password"
    assert page.locator('label[for="token"]').inner_text().strip() == "API token"
    page.fill("#token", "efc_not-a-real-token")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("#login")
    assert answer.value.status == 401
    error = page.locator("#error")
    assert error.get_attribute("role") == "alert"
    assert "token" in error.inner_text().lower(), error.inner_text()
    assert not [c for c in s.context.cookies() if c["name"] == "edgefleet_session"]


def test_the_server_refuses_a_viewers_action_post_and_one_without_the_csrf_value(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    created = console.api(
        "operator",
        "/api/v1/rollouts",
        method="POST",
        body={
            "model": f"{MODEL}@{GOOD}",
            "select": ["sim-0019", "sim-0020"],
            "stages": "1,100%",
            "bake_s": 600,  # stage 2 waits: the rollout stays active
        },
    )
    rid = int(created["id"])
    action = f"/ui/rollouts/{rid}/pause"
    form = {
        "model": f"{MODEL}@{GOOD}",
        "select": "sim-0018",
        "stream": "*",
        "stages": "1",
        "bake": "0s",
        "max-failures": "0",
        "confirm": "on",
    }
    before = len(console.api("viewer", "/api/v1/rollouts")["rollouts"])

    viewer = session()
    viewer.login("viewer")
    csrf = viewer.csrf()  # a valid value from the viewer's own session
    viewer.goto(f"/ui/rollouts/{rid}")
    assert viewer.page.locator("#pause, #resume, #abort, #rollback").count() == 0
    for path, fields in [
        (action, {"csrf": csrf}),
        (f"/ui/rollouts/{rid}/abort", {"csrf": csrf}),
        ("/ui/rollouts", {**form, "csrf": csrf}),
    ]:
        assert viewer.post_status(path, fields) == 403, path
    assert console.rollout(rid)["state"] == "active"
    assert len(console.api("viewer", "/api/v1/rollouts")["rollouts"]) == before

    operator = session()
    operator.login("operator")
    assert operator.post_status(action, {}) == 403
    assert operator.post_status(action, {"csrf": csrf}) == 403  # the viewer's value
    assert console.rollout(rid)["state"] == "active"
    # With its own value the operator's POST is taken (303 back to the rollout).
    assert operator.post_status(f"/ui/rollouts/{rid}/abort", {"csrf": operator.csrf()}) == 0
    assert console.rollout(rid)["state"] in {"aborted", "rolled_back"}
