"""The kernel's one wait and one backoff."""

from __future__ import annotations

import random

import pytest

from stanchion.waiting import Backoff, wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", "ready"])
    assert wait_until(lambda: next(values), 10, "a value", interval_s=0) == "ready"


def test_a_timeout_names_what_was_awaited_and_the_last_transient_error() -> None:
    def flaky() -> None:
        raise ConnectionError("coordinator restarting")

    with pytest.raises(TimeoutError, match=r"waiting for the job \(last error: coordinator restarting\)"):
        wait_until(flaky, 0.05, "the job", interval_s=0.01, transient=(ConnectionError,))


def test_errors_that_are_not_transient_propagate_at_once() -> None:
    def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_until(broken, 60, "anything", transient=(ConnectionError,))


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter_and_resets() -> None:
    b = Backoff(0.1, 1.0, rng=random.Random(0))
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for want in nominal:
        got = b.next()
        assert 0.8 * want <= got <= 1.2 * want, (got, want)
    b.reset()
    assert 0.08 <= b.next() <= 0.12


def test_a_predicate_gives_up_early_by_raising_and_may_report_on_each_poll() -> None:
    polls: list[int] = []

    def watched_process_ok() -> None:
        polls.append(len(polls))
        if len(polls) == 3:
            raise RuntimeError("the process exited with 1")

    with pytest.raises(RuntimeError, match="exited with 1"):
        wait_until(watched_process_ok, 60, "the process", interval_s=0)
    assert polls == [0, 1, 2]  # stopped at the third poll, long before the deadline
