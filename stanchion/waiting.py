"""Waiting for a condition with a deadline, and retrying with backoff: one of each for all of
Stanchion (daemons, the CLI, benchmarks and tests)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    transient: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``what`` after ``timeout_s``. Exceptions of the ``transient`` types
    (say, RPC errors while a server restarts) count as "not yet"; the last one is named in the error.
    Any other exception propagates at once: a predicate gives up early by raising (say, when the
    process it waits on has exited), and may do other work on each poll, such as reporting progress.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except transient as e:
            last_error = f" (last error: {e})"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{last_error}")
        time.sleep(interval_s)


class Backoff:
    """Exponential backoff with jitter: ``initial_s`` doubling up to ``max_s``, each delay scaled by
    a random factor in [0.8, 1.2] so that many clients retrying together spread out."""

    def __init__(self, initial_s: float = 0.1, max_s: float = 2.0, rng: random.Random | None = None):
        self.initial_s, self.max_s = initial_s, max_s
        self._rng = rng or random.Random()
        self._next = initial_s

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = min(self._next, self.max_s) * self._rng.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts from ``initial_s`` again."""
        self._next = self.initial_s
