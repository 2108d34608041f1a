"""tests/waiting.py: the one wait helper returns what it waited for and fails at its deadline."""

from __future__ import annotations

import threading
import time

import pytest

from tests.waiting import wait_for


def test_returns_the_first_truthy_value() -> None:
    calls = iter([None, 0, "", "found"])
    assert wait_for(lambda: next(calls), timeout=5, interval=0, what="a value") == "found"


def test_fails_at_the_deadline_saying_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the door"):
        wait_for(lambda: False, timeout=0.2, interval=0.01, what="the door")
    assert 0.2 <= time.monotonic() - started < 2.0


def test_describes_late_with_a_callable() -> None:
    seen: list[int] = []

    def poll() -> bool:
        seen.append(len(seen))
        return False

    with pytest.raises(AssertionError, match=r"waiting for 3 polls; saw [1-9]\d*"):
        wait_for(poll, timeout=0.1, interval=0.01, what=lambda: f"3 polls; saw {len(seen)}")


def test_exceptions_from_the_predicate_propagate_at_once() -> None:
    def broken() -> bool:
        raise RuntimeError("the process died")

    with pytest.raises(RuntimeError, match="the process died"):
        wait_for(broken, timeout=10, what="never")


def test_waits_on_a_condition_until_notified() -> None:
    cond = threading.Condition()
    items: list[str] = []

    def produce() -> None:
        time.sleep(0.05)
        with cond:
            items.append("x")
            cond.notify_all()

    thread = threading.Thread(target=produce)
    thread.start()
    # interval is ignored with a condition: a notification wakes the waiter at once.
    got = wait_for(lambda: list(items), timeout=5, interval=60, what="an item", condition=cond)
    thread.join()
    assert got == ["x"]
