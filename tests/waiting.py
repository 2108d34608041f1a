"""Waiting in tests: poll (or wait on a condition) until something holds, with a deadline.

Every wait in the tests goes through :func:`wait_for`, so none can spin forever and every
timeout says what it was waiting for; :func:`stop_process` waits for a child process to
exit, with a deadline too.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _describe(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
    condition: threading.Condition | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that value.

    Between calls it sleeps ``interval`` seconds or, given a ``condition``, waits on it (the
    predicate then runs with the condition's lock held; whoever changes what it reads must
    ``notify_all`` under that lock). Exceptions from ``predicate`` propagate at once. After
    ``timeout`` seconds it raises ``AssertionError("timed out after {timeout}s waiting for
    {what}")``; ``what`` may be a callable, evaluated only then (e.g. to show what was seen).
    """
    deadline = time.monotonic() + timeout
    with condition if condition is not None else contextlib.nullcontext():
        while not (value := predicate()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {_describe(what)}")
            if condition is None:
                time.sleep(min(interval, left))
            else:
                condition.wait(left)
        return value


def stop_process(
    proc: subprocess.Popen[bytes], *, timeout: float, sig: int = signal.SIGTERM
) -> bool:
    """Send ``sig`` to ``proc`` (if it still runs) and wait ``timeout`` seconds for it to exit.

    One still running then is killed (and reaped). Returns whether it exited in time.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True
