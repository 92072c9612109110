"""`stanchion up`'s fault schedules as pure functions: the seeded schedule (short and long), the kind
filter, `--faults FILE` parsing, the spacing rules, the recovery measurement and the recovery bound.
No processes: these run in milliseconds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from diagnostics.up import (
    EXTERNAL,
    INTERNAL,
    KINDS,
    PRIMARY,
    SECOND,
    Fault,
    ScheduleError,
    chaos_schedule,
    check_recoveries,
    held_back_until,
    load_faults,
    measure_recoveries,
    nan_horizon,
    next_check,
    parse_faults,
    parse_kinds,
    restart_budget,
)

NODES = ["node-0", "node-1"]


# -- the kind filter ---------------------------------------------------------------------------------
def test_parse_kinds_keeps_canonical_order_and_drops_duplicates() -> None:
    assert parse_kinds("bitflip, agent,agent") == ("agent", "bitflip")
    assert parse_kinds("NAN") == ("nan",)
    assert parse_kinds(",".join(reversed(KINDS))) == KINDS


@pytest.mark.parametrize("text", ["", " , ", "crash,foo", "crashes"])
def test_parse_kinds_refuses_unknown_or_empty_and_names_the_valid_ones(text: str) -> None:
    with pytest.raises(ScheduleError) as e:
        parse_kinds(text)
    assert "--chaos-kinds" in str(e.value)
    assert "valid kinds: crash, hang, agent, coordinator, bitflip, nan" in str(e.value)
    if "foo" in text:
        assert "'foo'" in str(e.value)


# -- the short (demo) schedule -------------------------------------------------------------------------
def test_the_demo_schedule_is_unchanged_one_fault_of_each_kind() -> None:
    """`make demo` and the end-to-end test rely on seed 1's schedule."""
    got = [(f.kind, f.step) for f in chaos_schedule(1, 200, NODES)]
    assert got == [
        ("agent", 31),
        ("coordinator", 55),
        ("nan", 75),
        ("crash", 103),
        ("bitflip", 126),
        ("hang", 153),
    ]
    assert all(f.target in NODES and not f.during_recovery for f in chaos_schedule(1, 200, NODES))


@pytest.mark.parametrize("seed", range(20))
def test_the_kind_filter_keeps_only_the_chosen_kinds(seed: int) -> None:
    for kinds in (("crash",), ("agent", "bitflip"), ("coordinator", "hang", "nan")):
        fs = chaos_schedule(seed, 300, NODES, kinds=kinds)
        assert sorted(f.kind for f in fs) == sorted(kinds)
        steps = [f.step for f in fs]
        assert steps == sorted(steps) and steps[0] > 0 and steps[-1] < 300


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    def entries(seed: int) -> list[dict]:
        return [f.entry() for f in chaos_schedule(seed, 2000, NODES, fault_every=12)]

    assert entries(5) == entries(5)
    assert entries(5) != entries(6)


def test_no_fault_lands_between_a_bit_flip_and_the_check_that_sees_it() -> None:
    # seed 1 with 100 steps puts the hang 13 steps after the bit flip, before the check at step 80
    fs = chaos_schedule(1, 100, NODES)
    flip = next(f for f in fs if f.kind == "bitflip")
    after = [f for f in fs if f.step > flip.step]
    assert after and all(f.step >= next_check(flip.step, 20) + 3 for f in after)
    # a larger fingerprint interval pushes further; none leaves no rule
    fs = chaos_schedule(1, 100, NODES, check_every=0)
    assert [f.step for f in fs] == sorted(f.step for f in fs)


def test_a_late_fault_is_held_back_out_of_a_bit_flips_check_window() -> None:
    # What made an `up --chaos 5 --chaos-kinds crash,bitflip` run report its flip undetected: the
    # crash scheduled at step 12 reached a fast model (36 steps/s) only at step 36, killing the rank
    # the flip at step 36 had hit before its check at step 37 (fingerprints every step).
    assert held_back_until(36, [36], 1, lead=10) == 40
    assert held_back_until(30, [36], 1, lead=10) == 40  # the ranks may already be 10 steps further
    assert held_back_until(25, [36], 1, lead=10) is None  # far enough before: it lands before the flip
    assert held_back_until(40, [36], 1, lead=10) is None  # checked and answered
    # the window runs to the check that sees the flip, plus its answer
    assert held_back_until(59, [45], 20, lead=2) == 63
    assert held_back_until(63, [45], 20, lead=2) is None
    # several flips: the latest end of the windows the step is in
    assert held_back_until(41, [36, 42], 1, lead=2) == 46
    # no fingerprint checks: a flip is never seen, nothing to keep apart
    assert held_back_until(36, [36], 0, lead=10) is None


# -- the long schedule ---------------------------------------------------------------------------------
def test_a_long_schedule_scales_to_hundreds_of_faults_with_every_kind_and_second_faults() -> None:
    fs = chaos_schedule(7, 3600, NODES, fault_every=10)
    assert len(fs) >= 300
    counts = Counter(f.kind for f in fs)
    assert set(counts) == set(KINDS)
    assert min(counts.values()) >= 40  # drawn in rounds: no kind starves
    seconds = [f for f in fs if f.during_recovery]
    assert len(seconds) >= 40 and {f.kind for f in seconds} == set(SECOND)
    # every second fault directly follows (among external faults) a crash, hang or agent fault
    external = [f for f in fs if f.kind in EXTERNAL]
    for prev, f in zip(external, external[1:], strict=False):
        if f.during_recovery:
            assert prev.kind in PRIMARY and not prev.during_recovery and prev.step == f.step
    assert not external[0].during_recovery
    # the mean interval is about --fault-every
    primaries = sorted({f.step for f in fs if not f.during_recovery})
    gaps = [b - a for a, b in zip(primaries, primaries[1:], strict=False)]
    assert 9 <= sum(gaps) / len(gaps) <= 12.5
    # room at the end: a bit flip meets a fingerprint check, a recovery finishes
    assert max(f.step for f in fs) <= 3600 - 25
    for f in fs:
        if f.kind == "bitflip":
            later = [g for g in fs if g.step > f.step]
            assert all(g.step >= next_check(f.step, 20) + 3 for g in later)


def test_rounds_give_every_kind_its_share_and_a_single_kind_still_gets_second_faults() -> None:
    fs = chaos_schedule(3, 1500, NODES, fault_every=8, kinds=("crash",))
    assert {f.kind for f in fs} == {"crash"}
    firsts = [f for f in fs if not f.during_recovery]
    seconds = [f for f in fs if f.during_recovery]
    assert seconds and len(firsts) >= 6 * len(seconds) - 6  # one second fault per round of six


def test_no_second_faults_when_asked_or_when_no_kind_can_pair() -> None:
    assert not any(
        f.during_recovery for f in chaos_schedule(3, 1500, NODES, fault_every=8, recovery_faults=False)
    )
    # a coordinator kill does not start a recovery, and trainer faults cannot be timed to one
    for kinds in (("coordinator", "nan"), INTERNAL, ("hang",)):
        fs = chaos_schedule(3, 1500, NODES, fault_every=8, kinds=kinds)
        assert fs and not any(f.during_recovery for f in fs), kinds


def test_a_run_too_short_for_its_fault_interval_is_refused() -> None:
    with pytest.raises(ScheduleError, match="--steps 60 is too short for --fault-every 50"):
        chaos_schedule(1, 60, NODES, fault_every=50)
    with pytest.raises(ScheduleError, match="--fault-every 1: must be at least 2"):
        chaos_schedule(1, 600, NODES, fault_every=1)


def test_nan_horizon_and_restart_budget() -> None:
    fs = [Fault("nan", 40), Fault("crash", 50), Fault("nan", 47), Fault("nan", 90)]
    assert nan_horizon(fs) == 6  # the closest two NaNs are 7 steps apart
    assert nan_horizon([Fault("nan", 3)]) is None
    assert nan_horizon([Fault("nan", 3), Fault("nan", 4)]) == 1
    assert restart_budget(fs) == 50
    assert restart_budget([Fault("crash", i) for i in range(400)]) == 1210
    assert restart_budget([Fault("crash", i) for i in range(5000)]) == 10_000


# -- --faults FILE ---------------------------------------------------------------------------------
ALL_NODES = [*NODES, "spare-0"]


def parse(entries: object, steps: int = 100) -> list[Fault]:
    return parse_faults(entries, steps=steps, nodes=ALL_NODES)


def test_a_fault_file_parses_sorts_by_step_and_round_trips_through_the_summary_format() -> None:
    entries = [
        {"kind": "bitflip", "step": 30, "target": "node-1"},
        {"kind": "agent", "step": 10, "target": "node-0"},
        {"kind": "coordinator", "step": 10, "during_recovery": True},
        {"kind": "nan", "step": 20},
    ]
    fs = parse(entries)
    assert [(f.kind, f.step, f.during_recovery) for f in fs] == [
        ("agent", 10, False),
        ("coordinator", 10, True),
        ("nan", 20, False),
        ("bitflip", 30, False),
    ]
    again = parse(json.loads(json.dumps([f.entry() for f in fs])))
    assert [f.entry() for f in again] == [f.entry() for f in fs]


def test_a_seeded_schedule_replays_from_its_summary_entries() -> None:
    fs = chaos_schedule(11, 900, NODES, fault_every=9)
    replay = parse([f.entry() for f in fs], steps=900)
    assert [f.entry() for f in replay] == [f.entry() for f in fs]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"kind": "crash", "step": 1}, "faults: expected a JSON list of fault entries, got dict"),
        (["crash"], "faults[0]: expected an object with kind and step, got str"),
        (
            [{"step": 3}],
            "faults[0].kind: missing; valid kinds: crash, hang, agent, coordinator, bitflip, nan",
        ),
        (
            [{"kind": "crash", "step": 3}, {"kind": "oom", "step": 4}],
            "faults[1].kind: 'oom' is not a fault kind",
        ),
        ([{"kind": "crash"}], "faults[0].step: missing"),
        ([{"kind": "crash", "step": "5"}], "faults[0].step: expected an integer, got '5'"),
        ([{"kind": "crash", "step": True}], "faults[0].step: expected an integer, got True"),
        (
            [{"kind": "crash", "step": 100}],
            "faults[0].step: 100 is outside the run (0 <= step < --steps 100)",
        ),
        ([{"kind": "crash", "step": -1}], "faults[0].step: -1 is outside the run"),
        (
            [{"kind": "crash", "step": 5, "target": "node-9"}],
            "faults[0].target: 'node-9' is not a node of this run",
        ),
        ([{"kind": "crash", "step": 5, "target": 3}], "faults[0].target: 3 is not a node"),
        (
            [{"kind": "crash", "step": 5, "rank": 0}],
            "faults[0]: unknown field 'rank'; fields: kind, step, target",
        ),
        (
            [{"kind": "crash", "step": 5}, {"kind": "crash", "step": 5, "during_recovery": "yes"}],
            "faults[1].during_recovery: expected true or false, got 'yes'",
        ),
        (
            [{"kind": "crash", "step": 5}, {"kind": "hang", "step": 5, "during_recovery": True}],
            "faults[1].during_recovery: a hang fault cannot be timed to a recovery",
        ),
        (
            [{"kind": "crash", "step": 5}, {"kind": "nan", "step": 5, "during_recovery": True}],
            "faults[1].during_recovery: a nan fault cannot be timed",
        ),
        (
            [{"kind": "crash", "step": 5, "during_recovery": True}],
            "faults[0].during_recovery: must follow a crash",
        ),
        (
            [{"kind": "coordinator", "step": 5}, {"kind": "crash", "step": 6, "during_recovery": True}],
            "faults[1].during_recovery: must follow a crash, hang or agent fault at or before step 6 "
            "(it follows faults[0]",
        ),
        (
            [
                {"kind": "crash", "step": 5},
                {"kind": "agent", "step": 5, "during_recovery": True},
                {"kind": "crash", "step": 5, "during_recovery": True},
            ],
            "faults[2].during_recovery: must follow",
        ),
    ],
)
def test_a_bad_fault_file_names_the_entry_and_the_field(entries: object, message: str) -> None:
    with pytest.raises(ScheduleError) as e:
        parse(entries)
    assert message in str(e.value)


def test_load_faults_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"kind": "hang", "step": 12, "target": "spare-0"}]))
    assert [f.entry() for f in load_faults(good, steps=50, nodes=ALL_NODES)] == [
        {"kind": "hang", "step": 12, "target": "spare-0"}
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[{kind: crash}]")
    with pytest.raises(ScheduleError, match=r"--faults .*bad.json: not valid JSON"):
        load_faults(bad, steps=50, nodes=ALL_NODES)
    with pytest.raises(ScheduleError, match=r"--faults .*missing.json: cannot read it"):
        load_faults(tmp_path / "missing.json", steps=50, nodes=ALL_NODES)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"kind": "crash", "step": 99}]))
    with pytest.raises(ScheduleError, match=r"wrong.json: faults\[0\].step: 99 is outside the run"):
        load_faults(wrong, steps=50, nodes=ALL_NODES)


# -- recoveries and their bound ------------------------------------------------------------------------
def injected(kind: str, at: float, gen: int, **kw: object) -> Fault:
    f = Fault(kind, 0, "node-0", injected_at=at, generation_before=gen)
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def records(*pairs: tuple[float, int]) -> list[dict]:
    return [{"t": t, "generation": g, "step": i, "rank": 0} for i, (t, g) in enumerate(pairs)]


def test_recovery_is_injection_to_the_first_step_of_a_newer_generation() -> None:
    crash = injected("crash", 10.0, 1)
    coord = injected("coordinator", 20.0, 2, back_at=21.5)
    idle = injected("hang", 30.0, 2, effect=False)
    recs = records((9.0, 1), (10.5, 1), (13.0, 2), (14.0, 2), (25.0, 2), (31.0, 2))
    measure_recoveries([crash, coord, idle, Fault("nan", 5)], recs)
    assert crash.recovery_s == 3.0  # the step at 10.5 was still generation 1
    assert coord.recovery_s == 1.5  # the coordinator answered again
    assert idle.recovery_s is None  # nothing was hit


def test_a_second_fault_during_recovery_extends_the_first_ones_recovery() -> None:
    first = injected("crash", 10.0, 1)
    second = injected("agent", 11.0, 2, during_recovery=True)  # generation 2 was forming
    third = injected("crash", 40.0, 3)
    recs = records((9.0, 1), (15.0, 3), (16.0, 3), (45.0, 4))
    measure_recoveries([first, second, third], recs)
    assert second.recovery_s == 4.0
    assert first.recovery_s == 5.0  # to the first step after both
    assert third.recovery_s == 5.0


def test_a_fault_never_recovered_from_before_the_next_one_has_no_recovery() -> None:
    a = injected("crash", 10.0, 1)
    b = injected("crash", 20.0, 1)
    measure_recoveries([a, b], records((9.0, 1), (25.0, 2)))
    assert a.recovery_s is None and b.recovery_s == 5.0


def test_the_recovery_bound_invariant() -> None:
    faults = [
        injected("crash", 0.0, 1, recovery_s=3.0),
        injected("agent", 0.0, 1, recovery_s=61.0, step=40),
        injected("hang", 0.0, 1),  # injected, had an effect, never measured
        Fault("crash", 90),  # never injected
    ]
    got = check_recoveries(faults, 60.0)
    assert got["ok"] is False and got["worst_s"] == 61.0 and got["measured"] == 2
    assert got["over"] == [{"kind": "agent", "step": 40, "target": "node-0", "recovery_s": 61.0}]
    assert [u["kind"] for u in got["unmeasured"]] == ["hang"]
    assert check_recoveries(faults, 61.0)["ok"] is True
    assert check_recoveries([], 60.0) == {
        "ok": True,
        "bound_s": 60.0,
        "measured": 0,
        "worst_s": None,
        "over": [],
        "unmeasured": [],
    }


def test_a_layout_that_does_not_fit_is_refused_before_anything_starts(tmp_path) -> None:
    """`stanchion up --nodes 3` with the tiny preset's batch of 16: refused in the constructor,
    naming the key, before data preparation or any daemon."""
    from diagnostics.up import Up, UpOptions
    from stanchion.settings import ConfigError

    with pytest.raises(ConfigError, match=r"global_batch_size: 16 sequences do not divide over 3"):
        Up(UpOptions(run_dir=tmp_path / "up", nodes=3), console=None)
    assert not (tmp_path / "up" / "logs").exists() or not any((tmp_path / "up" / "logs").iterdir())


def test_a_nan_fired_while_the_coordinator_restarts_does_not_hide_the_restarts_answer():
    """A fast job's rank fires its NaN between the coordinator's kill and its answer: each fault is
    matched to its own kind of decision, bounded only by the next fault of its own family."""
    from types import SimpleNamespace

    from diagnostics.up import Fault, Up

    faults = [
        Fault("coordinator", 79, injected_at=100.0),
        Fault("nan", 104, injected_at=100.5),
        Fault("crash", 150, injected_at=110.0),
        Fault("crash", 170, injected_at=120.0),
    ]
    decisions = [
        SimpleNamespace(time=101.0, reason="coordinator restarted: waiting up to 10s for members"),
        SimpleNamespace(time=101.1, reason="nonfinite at step 104: rolling back in place"),
        SimpleNamespace(time=110.5, reason="rank 0 on node-0 crashed: signal SIGKILL"),
    ]
    seen = Up._detected(SimpleNamespace(faults=faults), decisions)
    assert [(f["kind"], f["detected"]) for f in seen] == [
        ("coordinator", True),
        ("nan", True),
        ("crash", True),
        ("crash", False),  # the first crash's answer came before it: it was not seen
    ]


def test_a_reason_quoting_an_error_in_brackets_is_printed_as_it_is():
    """Decision reasons quote backend errors such as "[/__w/pytorch/.../pair.cc:537] Connection
    closed": they are text, never console markup."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from diagnostics.up import Up

    out = io.StringIO()
    text = "rank 1 crashed: [/__w/pytorch/gloo/pair.cc:537] Connection closed by peer [bold]"
    Up.say(SimpleNamespace(console=Console(file=out, width=300)), text)
    assert out.getvalue() == text + "\n"


def test_a_bit_flip_seen_by_the_ranks_while_an_earlier_rollback_is_pending_counts_as_detected():
    from types import SimpleNamespace

    from diagnostics.up import Fault, Up

    faults = [Fault("nan", 52, injected_at=10.0), Fault("bitflip", 61, injected_at=11.0)]
    decisions = [SimpleNamespace(time=12.0, reason="nonfinite at step 52: rolling back in place")]
    alarms = [
        {"event": "fingerprint_mismatch", "step": 60, "rank": 0, "t": 10.9},  # before the flip: not it
        {"event": "fingerprint_mismatch", "step": 61, "rank": 1, "t": 11.1},
    ]
    fake = SimpleNamespace(faults=faults)
    assert [f["detected"] for f in Up._detected(fake, decisions)] == [True, False]
    nan, flip = Up._detected(fake, decisions, alarms)
    assert nan["detected"] and flip["detected"]
    assert flip["decision"].startswith("detected by rank 1: fingerprint_mismatch at step 61")
