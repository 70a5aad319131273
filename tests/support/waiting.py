"""Await a condition with a deadline instead of sleeping a fixed time."""

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    check: Callable[[], Any], *, timeout: float = 5.0, what: str = "condition", every: float = 0.02
) -> Any:
    """Poll `check` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
