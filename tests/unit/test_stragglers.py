"""The straggler detector's decisions (stanchion/sdk/stragglers.py)."""

from __future__ import annotations

import pytest

from stanchion.sdk.stragglers import StragglerDetector

BASE = 0.100  # a healthy rank's compute time per step


def times(world: int, slow: dict[int, float]) -> list[float]:
    return [BASE * slow.get(r, 1.0) for r in range(world)]


def warmed(window: int, world: int, threshold: float = 1.2) -> StragglerDetector:
    """A detector past the first ``window`` steps of its generation, which it does not count."""
    d = StragglerDetector(threshold=threshold, window=window)
    for step in range(1, window + 1):
        assert d.observe(step, times(world, {0: 3.0})) == ([], []), "a step of the warm-up was counted"
    return d


def test_the_first_window_of_a_generation_is_not_counted() -> None:
    d = warmed(5, 3)  # rank 0 three times slower through the warm-up: nobody named
    assert d.ratio(0) is None
    for step in range(6, 10):
        d.observe(step, times(3, {}))
    assert d.observe(10, times(3, {}))[0] == [] and d.ratio(0) == pytest.approx(1.0)
    d.reset()  # a new generation warms up again
    assert all(d.observe(s, times(3, {1: 3.0})) == ([], []) for s in range(11, 16)) and d.ratio(1) is None


def test_a_consistently_slow_rank_is_named_once_its_window_fills_and_no_one_else_is() -> None:
    d = warmed(5, 4)
    for step in range(6, 10):
        assert d.observe(step, times(4, {2: 1.3})) == ([], []), f"named before its window filled ({step})"
    started, ended = d.observe(10, times(4, {2: 1.3}))
    (s,) = started
    assert (s.rank, s.step, s.window) == (2, 10, 5) and ended == []
    assert (
        s.ratio == pytest.approx(1.3) and s.own_s == pytest.approx(0.13) and s.peers_s == pytest.approx(0.1)
    )
    assert d.stragglers == {2}
    # named once: the next slow steps report nothing new
    assert d.observe(11, times(4, {2: 1.3})) == ([], [])


def test_one_slow_step_or_a_small_slowdown_names_no_one() -> None:
    d = warmed(5, 4)
    for step in range(6, 30):
        slow = {1: 3.0} if step == 12 else {3: 1.15}  # a page fault once; a rank 15% slower always
        assert d.observe(step, times(4, slow)) == ([], [])
    assert d.ratio(3) == pytest.approx(1.15)


def test_with_two_ranks_the_slow_one_is_named_not_its_faster_peer() -> None:
    d = warmed(3, 2)
    results = [d.observe(step, times(2, {0: 1.5})) for step in (4, 5, 6)]
    assert [s.rank for s in results[-1][0]] == [0]
    assert d.ratio(1) == pytest.approx(1 / 1.5)


def test_a_straggler_that_recovers_is_cleared_once_its_window_median_falls_back() -> None:
    d = warmed(5, 3)
    for step in range(6, 11):
        d.observe(step, times(3, {0: 1.5}))
    assert d.stragglers == {0}
    cleared_at = None
    for step in range(11, 17):
        _, ended = d.observe(step, times(3, {}))
        if ended:
            assert ended == [0]
            cleared_at = step
            break
    assert cleared_at == 13, "the median of 5 ratios falls to 1.0 once 3 of them are healthy"
    assert d.stragglers == set()


def test_steps_without_times_are_skipped_and_a_new_world_starts_afresh() -> None:
    d = warmed(3, 3)
    d.observe(4, times(3, {1: 2.0}))
    d.observe(5, [0.0, 0.2, 0.1])  # a rank with nothing to report (the first step of a generation)
    assert d.ratio(1) is None
    d.observe(6, times(3, {1: 2.0}))
    assert d.observe(7, times(3, {1: 2.0}))[0][0].rank == 1
    # the job re-formed on 2 ranks: what was seen on 3 says nothing about them
    assert d.observe(8, times(2, {})) == ([], [])
    assert d.stragglers == set() and d.ratio(0) is None


def test_a_window_of_zero_disables_it() -> None:
    d = StragglerDetector(threshold=1.2, window=0)
    assert all(d.observe(s, times(2, {0: 5.0})) == ([], []) for s in range(1, 50))
