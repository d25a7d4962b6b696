"""Waiting on a condition rather than a fixed time: a test proceeds the moment what it waits
for is true, and fails naming it when it never becomes so.

>>> wait_for(lambda: True, "nothing")
>>> holds_within(lambda: False, 0.05)
False
>>> stays(lambda: True, 0.05), stays(lambda: False, 5)
(True, False)
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: How often a condition is checked.
EVERY_S = 0.02


def holds_within(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition`` holds within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(EVERY_S)
    return True


def stays(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition`` holds throughout ``seconds``: for what must not happen (an
    error logged late, a thread too many), answered the moment it does."""
    return not holds_within(lambda: not condition(), seconds)


def wait_for(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = 30
) -> None:
    """Return once ``condition`` holds; fail naming ``what`` after ``timeout`` seconds."""
    assert holds_within(condition, timeout), f"{what}: not within {timeout} s"
