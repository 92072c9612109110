"""The bisection planner against a simulated cluster: faulty nodes, intermittent shows, failed trials."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.bisection.planner import (
    BisectConfig,
    Round,
    TrialResult,
    Verdict,
    clearing_error,
    plan,
    required_streak,
)

GOOD = "good"  # the trace every healthy group produces


def nodes(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


class Cluster:
    """Simulated trial runs: a group's trace is GOOD unless a faulty member shows (with probability
    ``p_show`` per trial) or a bad pair shares the group; a wrong trace names what showed, so wrong
    traces of disjoint groups differ. ``broken`` nodes make every trial they are in fail to run, and
    ``fail_rate`` makes any trial fail at random."""

    def __init__(
        self,
        faulty: Collection[str] = (),
        *,
        p_show: float = 1.0,
        seed: int = 0,
        pairs: Sequence[tuple[str, str]] = (),
        broken: Collection[str] = (),
        fail_rate: float = 0.0,
    ):
        self.faulty, self.p_show, self.pairs = set(faulty), p_show, list(pairs)
        self.broken, self.fail_rate = set(broken), fail_rate
        self.rng = random.Random(seed)

    def trace(self, group: tuple[str, ...]) -> str | None:
        if self.broken & set(group) or (self.fail_rate and self.rng.random() < self.fail_rate):
            return None
        showing = sorted(n for n in group if n in self.faulty and self.rng.random() < self.p_show)
        links = sorted(f"{a}-{b}" for a, b in self.pairs if a in group and b in group)
        return "bad:" + ",".join(showing + links) if showing or links else GOOD


def drive(
    suspects: Sequence[str],
    cluster: Cluster,
    cfg: BisectConfig,
    *,
    reference_trace: str | None = None,
    known_good: Sequence[str] = (),
) -> tuple[Verdict, list[Round]]:
    """Call plan, run its rounds on the cluster, until a verdict; check every round is runnable."""
    results: list[TrialResult] = []
    rounds: list[Round] = []
    for _ in range(cfg.max_rounds + 1):
        out = plan(suspects, results, cfg, reference_trace=reference_trace, known_good=known_good)
        if isinstance(out, Verdict):
            assert out.rounds == len(rounds)
            assert sorted(out.faulty + out.cleared + out.inconclusive) == sorted(suspects), out
            assert 0.0 <= out.confidence <= 1.0
            # The naming rule: a named node sat in a disagreeing trial whose other members are all cleared.
            cleared = set(out.cleared) | set(known_good)
            for bad in out.faulty:
                assert any(
                    bad in r.group and r.trace not in (None, GOOD) and set(r.group) - {bad} <= cleared
                    for r in results
                ), f"{bad} named without a trial that implicates it: {out}"
            return out, rounds
        assert out.index == len(rounds) + 1 and out.groups and out.reason
        members = [n for group in out.groups for n in group]
        assert len(members) == len(set(members)), f"a node in two groups of one round: {out}"
        assert set(members) <= set(suspects) | set(known_good)
        assert all(len(group) == cfg.group_size for group in out.groups)
        if cfg.max_parallel is not None:
            assert len(out.groups) <= cfg.max_parallel
        rounds.append(out)
        results += [TrialResult(out.index, group, cluster.trace(group)) for group in out.groups]
    raise AssertionError("plan kept returning rounds past max_rounds")


def log2_ceil(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


# One deterministic fault, every position, N = 2..64 -------------------------------------------------

KG2 = ("k0", "k1")
KG4 = ("k0", "k1", "k2", "k3")
KG8 = tuple(nodes(8, "k"))

# (name, config, reference_trace, known_good, smallest N, expected reference, bound on rounds)
ONE_FAULT_CASES = [
    ("g1 reference trace", BisectConfig(), GOOD, (), 2, "known-good", lambda n: 1),
    ("g1 majority", BisectConfig(), None, (), 3, "majority", lambda n: 1),
    ("g1 known-good group", BisectConfig(), None, ("k0",), 2, "known-good", lambda n: 1),
    ("g2 reference trace + padding", BisectConfig(group_size=2), GOOD, KG2, 2, "known-good", log2_ceil),
    ("g2 reference trace, no padding", BisectConfig(group_size=2), GOOD, (), 4, "known-good", log2_ceil),
    ("g2 majority", BisectConfig(group_size=2), None, (), 6, "majority", log2_ceil),
    ("g2 known-good group", BisectConfig(group_size=2), None, KG4, 2, "known-good", log2_ceil),
    ("g4 reference trace + padding", BisectConfig(group_size=4), GOOD, KG8, 2, "known-good", log2_ceil),
    ("g2 two groups per round", BisectConfig(group_size=2, max_parallel=2), GOOD, KG2, 2, "known-good", None),
]


@pytest.mark.parametrize("case", ONE_FAULT_CASES, ids=[c[0] for c in ONE_FAULT_CASES])
def test_one_deterministic_fault_is_found_at_every_position(case) -> None:  # noqa: ANN001
    _, cfg, reference_trace, known_good, smallest, kind, bound = case
    for n in range(smallest, 65 if bound else 33):  # no bound: slow by design, so fewer sizes
        suspects = nodes(n)
        for bad in suspects:
            verdict, rounds = drive(
                suspects, Cluster({bad}), cfg, reference_trace=reference_trace, known_good=known_good
            )
            assert verdict.faulty == (bad,), (n, bad, verdict)
            assert verdict.cleared == tuple(s for s in suspects if s != bad) and not verdict.inconclusive
            assert verdict.reference == kind and verdict.confidence == 1.0
            if bound is not None:
                assert verdict.rounds <= max(1, bound(n)), (n, bad, verdict.rounds, rounds)


def test_one_round_suffices_with_single_node_groups() -> None:
    verdict, rounds = drive(nodes(8), Cluster({"n5"}), BisectConfig())
    assert [r.groups for r in rounds] == [tuple((s,) for s in nodes(8))]
    assert verdict.faulty == ("n5",) and verdict.rounds == 1 and verdict.reference == "majority"


@pytest.mark.parametrize("n", range(1, 65))
def test_sequential_halving_with_one_group_per_round(n: int) -> None:
    """max_parallel=1: one agree/disagree bit per round. The path on which every trial agrees names
    nobody, so a tree of depth d names at most 2**d - 1 nodes through a trial that held them:
    ceil(log2(N + 1)) rounds, which is ceil(log2 N) unless N is a power of two. With the premise that
    at most one suspect is faulty the planner meets that bound; without it, clearing the rest costs up to
    two more rounds."""
    suspects, known_good = nodes(n), nodes(n, "k")  # a group as big as N, padded with known-good nodes
    bound = math.ceil(math.log2(n + 1))
    for premise, slack in ((True, 0), (False, 2)):
        cfg = BisectConfig(group_size=n, max_parallel=1, at_most_one_fault=premise)
        for bad in suspects:
            verdict, rounds = drive(
                suspects, Cluster({bad}), cfg, reference_trace=GOOD, known_good=known_good
            )
            assert verdict.faulty == (bad,) and not verdict.inconclusive, (premise, bad, verdict)
            assert verdict.rounds <= bound + slack, (premise, bad, verdict.rounds)
            if premise and n & (n - 1):  # not a power of two: the ceil(log2 N) claim holds
                assert verdict.rounds <= log2_ceil(n)
        verdict, _ = drive(suspects, Cluster(), cfg, reference_trace=GOOD, known_good=known_good)
        assert verdict.faulty == () and verdict.cleared == tuple(suspects)


def test_rounds_for_eight_nodes() -> None:
    """The numbers quoted in the design: N = 8, one deterministic fault, worst position."""
    suspects = nodes(8)

    def worst(cfg: BisectConfig, **kw) -> int:  # noqa: ANN003
        return max(drive(suspects, Cluster({bad}), cfg, **kw)[0].rounds for bad in suspects)

    assert worst(BisectConfig(), reference_trace=GOOD) == 1
    assert worst(BisectConfig()) == 1  # majority
    assert worst(BisectConfig(group_size=2), reference_trace=GOOD) == 2
    seq = {"reference_trace": GOOD, "known_good": nodes(8, "k")}
    assert worst(BisectConfig(group_size=8, max_parallel=1, at_most_one_fault=True), **seq) == 4
    assert worst(BisectConfig(group_size=8, max_parallel=1), **seq) == 5


# Several faults, and never a healthy node ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    mode=st.sampled_from(["g1 reference", "g1 majority", "g2 reference", "g2 majority", "g3 padding"]),
)
def test_two_deterministic_faults_are_both_found(data: st.DataObject, mode: str) -> None:
    smallest = {"g1 majority": 5, "g2 majority": 10}.get(mode, 4)
    n = data.draw(st.integers(smallest, 40), label="n")
    suspects = nodes(n)
    bad = set(
        data.draw(st.lists(st.sampled_from(suspects), min_size=2, max_size=2, unique=True), label="bad")
    )
    cfg = BisectConfig(group_size=int(mode[1]))
    kw = {
        "reference_trace": None if "majority" in mode else GOOD,
        "known_good": KG4 if "padding" in mode else (),
    }
    verdict, _ = drive(suspects, Cluster(bad), cfg, **kw)
    assert set(verdict.faulty) == bad and not verdict.inconclusive, verdict


def test_two_faults_in_one_group_are_both_named() -> None:
    verdict, rounds = drive(nodes(8), Cluster({"n2", "n3"}), BisectConfig(group_size=2), reference_trace=GOOD)
    assert verdict.faulty == ("n2", "n3") and verdict.rounds == 2
    assert ("n2", "n3") in rounds[0].groups and all(len({"n2", "n3"} & set(g)) <= 1 for g in rounds[1].groups)


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    group_size=st.integers(1, 3),
    max_parallel=st.sampled_from([None, 1, 2, 3]),
    p_show=st.sampled_from([1.0, 0.5]),
    reference=st.sampled_from(["trace", "known-good nodes", "majority"]),
    fail_rate=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_healthy_node_is_never_named(
    data: st.DataObject,
    group_size: int,
    max_parallel: int | None,
    p_show: float,
    reference: str,
    fail_rate: float,
    seed: int,
) -> None:
    n = data.draw(st.integers(1, 12 if p_show < 1 else 24), label="n")
    suspects = nodes(n)
    bad = set(data.draw(st.lists(st.sampled_from(suspects), max_size=n, unique=True), label="bad"))
    premise = len(bad) <= 1 and data.draw(st.booleans(), label="at_most_one_fault")
    cfg = BisectConfig(
        group_size=group_size, max_parallel=max_parallel, p_show=p_show, delta=1e-6, at_most_one_fault=premise
    )
    kw = {
        "reference_trace": GOOD if reference == "trace" else None,
        "known_good": nodes(3, "k") if reference == "known-good nodes" else (),
    }
    verdict, _ = drive(suspects, Cluster(bad, p_show=p_show, seed=seed, fail_rate=fail_rate), cfg, **kw)
    assert set(verdict.faulty) <= bad, verdict
    if not bad:
        assert verdict.faulty == ()
    if p_show == 1.0 and fail_rate == 0.0 and not verdict.inconclusive:
        assert set(verdict.faulty) == bad  # a complete deterministic verdict is exact


def test_no_fault_names_nobody() -> None:
    for cfg, kw in [
        (BisectConfig(), {"reference_trace": GOOD}),
        (BisectConfig(), {}),
        (BisectConfig(group_size=2), {}),
        (BisectConfig(p_show=0.5), {"reference_trace": GOOD}),
    ]:
        verdict, _ = drive(nodes(7), Cluster(), cfg, **kw)
        assert verdict.faulty == () and verdict.cleared == tuple(nodes(7)) and not verdict.inconclusive
        assert "Named no node" in verdict.reason


# Intermittent faults -------------------------------------------------------------------------------


def test_clearing_rule() -> None:
    # One node, p = 0.5, delta = 1e-3: 2**-11 <= 1e-3 / 2 < 2**-10.
    assert required_streak(0.5, 1e-3, 0) == 11
    assert required_streak(0.5, 1e-3, 3) == 14  # each earlier disagreement halves the allowance
    assert required_streak(1.0, 1e-3, 5) == 1
    for p in (0.05, 0.3, 0.5, 0.9):
        for delta_node in (1e-2, 1e-4, 1e-7):
            assert clearing_error(p, delta_node) <= delta_node
            assert (1 - p) ** required_streak(p, delta_node, 0) <= delta_node / 2


@pytest.mark.parametrize("group_size", [1, 2])
def test_intermittent_fault_reaches_delta(seed: int, group_size: int) -> None:
    cfg = BisectConfig(group_size=group_size, p_show=0.5, delta=1e-3)
    rng = random.Random(seed)
    for _ in range(20):
        run_seed = rng.randrange(2**32)
        suspects = nodes(8)
        bad = rng.choice(suspects)
        verdict, _ = drive(suspects, Cluster({bad}, p_show=0.5, seed=run_seed), cfg, reference_trace=GOOD)
        assert verdict.confidence >= 1 - cfg.delta, f"run seed {run_seed}: {verdict}"
        by_trial = len(verdict.cleared)  # each cleared by its own trials: its error bound counts
        assert verdict.confidence == pytest.approx(1 - by_trial * clearing_error(0.5, cfg.delta / 8))
        assert set(verdict.faulty) <= {bad}, f"run seed {run_seed}: {verdict}"
        assert not verdict.inconclusive, f"run seed {run_seed}: {verdict}"
        assert "matching trials in a row" in verdict.reason


def test_intermittent_wrong_verdict_rate_is_within_delta(seed: int) -> None:
    """A loose delta makes wrong verdicts common enough to count: the rate stays below both delta and
    the per-node bound the confidence is built from (plus three standard deviations)."""
    cfg = BisectConfig(p_show=0.5, delta=0.2)
    suspects = nodes(4)
    rng = random.Random(seed)
    runs, wrong = 600, 0
    for _ in range(runs):
        bad = rng.choice(suspects)
        verdict, _ = drive(
            suspects, Cluster({bad}, p_show=0.5, seed=rng.randrange(2**32)), cfg, reference_trace=GOOD
        )
        assert verdict.confidence >= 1 - cfg.delta
        wrong += verdict.faulty != (bad,)
    bound = clearing_error(0.5, cfg.delta / len(suspects))  # one faulty node per run
    assert bound <= cfg.delta / len(suspects)
    slack = 3 * math.sqrt(runs * bound * (1 - bound))
    assert wrong <= runs * bound + slack, f"{wrong} wrong verdicts in {runs} runs (seed {seed})"


def test_max_rounds_leaves_the_rest_inconclusive() -> None:
    cfg = BisectConfig(p_show=0.5, max_rounds=3)
    verdict, _ = drive(nodes(4), Cluster({"n1"}, p_show=1.0), cfg, reference_trace=GOOD)
    assert verdict.faulty == ("n1",) and verdict.rounds == 3
    assert verdict.inconclusive == ("n0", "n2", "n3") and "max_rounds=3" in verdict.reason


# Failed trials and retries -------------------------------------------------------------------------


def test_a_failed_trial_is_retried_and_implicates_nobody() -> None:
    suspects, cfg = nodes(4), BisectConfig()
    first = plan(suspects, [], cfg, reference_trace=GOOD)
    assert isinstance(first, Round) and first.groups == (("n0",), ("n1",), ("n2",), ("n3",))
    results = [
        TrialResult(1, g, None if g == ("n1",) else ("bad" if g == ("n2",) else GOOD)) for g in first.groups
    ]
    second = plan(suspects, results, cfg, reference_trace=GOOD)
    assert isinstance(second, Round) and second.groups == (("n1",),)
    verdict = plan(suspects, [*results, TrialResult(2, ("n1",), GOOD)], cfg, reference_trace=GOOD)
    assert isinstance(verdict, Verdict)
    assert verdict.faulty == ("n2",) and verdict.cleared == ("n0", "n1", "n3") and verdict.rounds == 2


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_a_node_whose_trials_never_run_is_inconclusive_not_faulty(group_size: int) -> None:
    cfg = BisectConfig(group_size=group_size, max_retries=2)
    verdict, _ = drive(nodes(9), Cluster({"n6"}, broken={"n4"}), cfg, reference_trace=GOOD, known_good=KG4)
    assert verdict.faulty == ("n6",) and verdict.inconclusive == ("n4",)
    assert "ran out of retries" in verdict.reason


def test_random_failures_do_not_change_the_answer(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(30):
        run_seed = rng.randrange(2**32)
        bad = rng.choice(nodes(10))
        cluster = Cluster({bad}, seed=run_seed, fail_rate=0.3)
        verdict, _ = drive(
            nodes(10), cluster, BisectConfig(group_size=2, max_retries=5), reference_trace=GOOD
        )
        assert set(verdict.faulty) <= {bad}, f"run seed {run_seed}: {verdict}"
        assert verdict.faulty == (bad,) or bad in verdict.inconclusive, f"run seed {run_seed}: {verdict}"


# References ----------------------------------------------------------------------------------------


def test_verdict_names_its_reference() -> None:
    suspects = nodes(5)
    assert drive(suspects, Cluster({"n0"}), BisectConfig(), reference_trace=GOOD)[0].reference == "known-good"
    assert drive(suspects, Cluster({"n0"}), BisectConfig())[0].reference == "majority"
    verdict, rounds = drive(suspects, Cluster({"n0"}), BisectConfig(group_size=2), known_good=KG4)
    assert verdict.reference == "known-good" and verdict.faulty == ("n0",)
    assert ("k0", "k1") in rounds[0].groups  # the known-good group that set the reference
    assert "known-good reference" in verdict.reason


def test_two_suspects_without_a_reference_cannot_be_told_apart() -> None:
    verdict, rounds = drive(nodes(2), Cluster({"n1"}), BisectConfig())
    assert len(rounds) == 1 and verdict.faulty == () and verdict.inconclusive == ("n0", "n1")
    assert verdict.reference == "none" and "reference_trace" in verdict.reason
    verdict, _ = drive(nodes(2), Cluster({"n1"}), BisectConfig(), known_good=["k0"])
    assert verdict.faulty == ("n1",) and verdict.reference == "known-good"


def test_one_group_per_round_cannot_hold_a_majority() -> None:
    verdict = plan(nodes(8), [], BisectConfig(max_parallel=1))
    assert isinstance(verdict, Verdict) and verdict.rounds == 0 and verdict.reference == "none"
    assert "no majority" in verdict.reason


def test_majority_found_in_a_later_round_when_groups_are_few() -> None:
    # Two groups per round: the first holds the faulty node, so the second round sets the majority.
    verdict, rounds = drive(nodes(6), Cluster({"n0"}), BisectConfig(max_parallel=2))
    assert verdict.faulty == ("n0",) and verdict.reference == "majority" and len(rounds) == 3


def test_known_good_groups_that_disagree_stop_the_bisection() -> None:
    results = [TrialResult(1, ("k0",), GOOD), TrialResult(1, ("n0",), GOOD), TrialResult(2, ("k0",), "other")]
    verdict = plan(nodes(2), results, BisectConfig(), known_good=["k0"])
    assert isinstance(verdict, Verdict) and verdict.faulty == () and verdict.inconclusive == ("n0", "n1")
    assert "not deterministic" in verdict.reason


# Multi-node faults ---------------------------------------------------------------------------------


def test_a_fault_between_two_nodes_is_reported_not_blamed_on_either() -> None:
    verdict, _ = drive(
        nodes(8), Cluster(pairs=[("n0", "n1")]), BisectConfig(group_size=2), reference_trace=GOOD
    )
    assert verdict.faulty == () and verdict.inconclusive == ("n0", "n1")
    assert verdict.unexplained == (("n0", "n1"),) and "link" in verdict.reason


def test_a_bad_nic_shows_in_every_multi_node_group() -> None:
    # A node-local fault that only shows across nodes behaves like any fault in groups of two or more.
    verdict, _ = drive(nodes(16), Cluster({"n9"}), BisectConfig(group_size=4), reference_trace=GOOD)
    assert verdict.faulty == ("n9",) and verdict.rounds == 2


# The premise ---------------------------------------------------------------------------------------


def test_at_most_one_fault_is_checked_against_the_evidence() -> None:
    cfg = BisectConfig(group_size=2, at_most_one_fault=True)
    verdict, _ = drive(nodes(8), Cluster({"n0", "n5"}), cfg, reference_trace=GOOD)
    assert verdict.faulty == () and "at_most_one_fault does not hold" in verdict.reason


# Inputs and purity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"group_size": 0}, "group_size"),
        ({"max_parallel": 0}, "max_parallel"),
        ({"p_show": 0.0}, "p_show"),
        ({"p_show": 5e-324}, "p_show"),  # 1 - p_show == 1.0: the streak would divide by log(1)
        ({"p_show": 0.009}, "p_show"),
        ({"p_show": 1.5}, "p_show"),
        ({"delta": 1.0}, "delta"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        BisectConfig(**kwargs)


def test_the_least_p_show_allowed_has_a_finite_streak() -> None:
    from coordinator.bisection.planner import MIN_P_SHOW, required_streak

    BisectConfig(p_show=MIN_P_SHOW)
    assert 1 < required_streak(MIN_P_SHOW, 1e-6, 0) < 2000


@pytest.mark.parametrize(
    ("suspects", "results", "known_good", "match"),
    [
        (["a", "a"], [], [], "suspects"),
        (["a", "b"], [], ["b"], "known_good"),
        (["a", "b"], [TrialResult(1, ("a", "b"), GOOD)], [], "group"),
        (["a", "b"], [TrialResult(1, ("c",), GOOD)], [], "neither"),
        (["a", "b"], [TrialResult(1, ("a",), GOOD), TrialResult(1, ("a",), GOOD)], [], "two groups"),
        (["a", "b"], [TrialResult(0, ("a",), GOOD)], [], "round"),
    ],
)
def test_bad_inputs_are_rejected(suspects, results, known_good, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        plan(suspects, results, BisectConfig(), known_good=known_good)


def test_plan_is_a_pure_function_of_its_inputs(seed: int) -> None:
    rng = random.Random(seed)
    suspects, cfg = nodes(12), BisectConfig(group_size=2, p_show=0.5)
    cluster = Cluster({"n3", "n8"}, p_show=0.5, seed=seed, fail_rate=0.1)
    results: list[TrialResult] = []
    for _ in range(6):
        out = plan(suspects, results, cfg, reference_trace=GOOD)
        assert isinstance(out, Round)
        results += [TrialResult(out.index, g, cluster.trace(g)) for g in out.groups]
        shuffled = rng.sample(results, len(results))
        again = plan(suspects, shuffled, cfg, reference_trace=GOOD)
        assert again == plan(suspects, results, cfg, reference_trace=GOOD)


def test_edge_cases() -> None:
    verdict = plan([], [], BisectConfig())
    assert isinstance(verdict, Verdict) and verdict.faulty == verdict.cleared == verdict.inconclusive == ()
    verdict = plan(nodes(2), [], BisectConfig(group_size=4), reference_trace=GOOD)
    assert (
        isinstance(verdict, Verdict)
        and verdict.inconclusive == ("n0", "n1")
        and "needs 4 nodes" in verdict.reason
    )
    # One suspect, groups of two, no padding: the group can never be split.
    verdict, _ = drive(nodes(2), Cluster({"n0"}), BisectConfig(group_size=2), reference_trace=GOOD)
    assert verdict.faulty == () and verdict.inconclusive == ("n0", "n1") and "known_good" in verdict.reason
