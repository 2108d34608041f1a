"""The console by keyboard: every form control on the pages has a label (``label for=`` or
aria-label), and the control with keyboard focus shows an outline."""

from __future__ import annotations

from collections.abc import Callable

from tests.browser.conftest import BROWSER_TESTS, Session

pytestmark = BROWSER_TESTS

UNLABELLED = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button')].filter(el =>
      !(el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`))
      && !el.getAttribute('aria-label') && !(el.tagName === 'BUTTON' && el.textContent.trim())
    ).map(el => el.outerHTML.slice(0, 120))"""


def test_every_control_is_labelled_and_keyboard_focus_is_visible(
    session: Callable[..., Session],
) -> None:
    s = session()
    page = s.login("operator")
    for path in ("/ui/fleet", "/ui/models", "/ui/rollouts", "/ui/rollouts/new"):
        s.goto(path)
        assert page.evaluate(UNLABELLED) == [], path
    s.goto("/ui/fleet")
    seen: list[str] = []
    for _ in range(40):  # tab through the page until the filter's Apply button
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if seen[-1] == "apply":
            break
    assert seen[-1] == "apply", f"Apply not reachable by Tab: {seen}"
    outline = page.evaluate(
        """() => { const s = getComputedStyle(document.activeElement);
                   return [s.outlineStyle, s.outlineWidth]; }"""
    )
    assert outline[0] != "none" and outline[1] != "0px", outline
