"""Pairs of responses that can meet: a second fault while the first one's response is in flight.

Each scenario below leaves the job with one response in flight (a pending in-place rollback, a
healing generation that has not stepped yet, an escalated recovery, a coordinator restart being
reconciled, a wait for capacity, a bisection). Each second event is then applied to it, and the
invariants that must hold whatever the pair are checked; targeted tests below pin what each pair
must do.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from coordinator import machine as m
from coordinator.membership import NodeView
from stanchion.vocab import EventKind, RestartReason, Resume
from tests.unit.test_machine import SPEC, nodes, running

CLUSTER = nodes("a", "b", spares=("s",))
CAPACITY_SPEC = dataclasses.replace(SPEC, min_nodes=2)  # one node is not enough: losing one waits
DEADLINE = m.FIRST_STEP_FLOOR_S  # the first launches below take 2 s: the floor applies
T0 = 12.0


@dataclass(frozen=True)
class Scenario:
    job: m.Job
    cluster: dict[str, NodeView]
    now: float
    target: int | None  # the rollback target in flight: state after it must never survive


def apply(job: m.Job, events, cluster, now: float) -> m.Job:
    for ev in events:
        job = m.step(job, ev, cluster, now).job
        now += 0.25
    return job


def target_of(job: m.Job) -> int | None:
    """The lowest rollback target the job still holds (a pending request, or a restore point the
    next generation must honour)."""
    targets = [getattr(job, "restore_to", -1)]
    if job.pending_rollback is not None:
        targets.append(job.pending_rollback.to_step)
    targets = [t for t in targets if t >= 0]
    return min(targets) if targets else None


def is_open(a: m.Alarm) -> bool:
    return a.resolved_epoch < 0 and a.resolved_generation < 0


def base(spec=SPEC, cluster=CLUSTER) -> m.Job:
    """Generation 2 trains at step 55 after one healed crash; checkpoints 10 (generation 1), 30, 40, 50."""
    job = running(cluster, spec)
    job = m.step(job, m.Progress("a", 1, 1), cluster, 2.0).job  # launch -> first step: 2 s
    job = m.step(job, m.CheckpointCommitted(1, 10, "/ck/10"), cluster, 3.0).job
    job = m.step(job, m.Progress("a", 1, 25), cluster, 4.0).job
    job = m.step(job, m.WorkerFailed("b", 1, 1, "crash"), cluster, 5.0).job
    job = m.step(job, m.Progress("a", 2, 26), cluster, 7.0).job
    for i, s in enumerate((30, 40, 50)):
        job = m.step(job, m.CheckpointCommitted(2, s, f"/ck/{s}"), cluster, 8.0 + i).job
    job = m.step(job, m.Progress("a", 2, 55), cluster, 11.0).job
    assert job.state is m.JobState.RUNNING and job.generation == 2 and job.launched is None
    assert [c.step for c in job.checkpoints if c.good] == [10, 30, 40, 50]
    assert m.first_step_deadline_s(job) == DEADLINE
    return job


SPIKE = m.Detector(EventKind.SPIKE, "a", 2, step=46, data_index=46)
NONFINITE = m.Detector(EventKind.NONFINITE, "a", 2, step=46, data_index=46)
FINGERPRINT = m.Detector(
    EventKind.FINGERPRINT_MISMATCH, "a", 2, step=50, onset_step=40, detail="rank ? differs"
)
AUDIT = m.Detector(EventKind.AUDIT_MISMATCH, "a", 2, step=50, onset_step=40, detail="no rank named")


def s_steady() -> Scenario:
    return Scenario(base(), CLUSTER, T0, None)


def s_rollback_spike() -> Scenario:
    return Scenario(apply(base(), [SPIKE], CLUSTER, T0), CLUSTER, T0 + 1, 45)


def s_rollback_nonfinite() -> Scenario:
    return Scenario(apply(base(), [NONFINITE], CLUSTER, T0), CLUSTER, T0 + 1, 45)


def s_rollback_fingerprint() -> Scenario:
    return Scenario(apply(base(), [FINGERPRINT], CLUSTER, T0), CLUSTER, T0 + 1, 40)


def s_healing() -> Scenario:
    job = apply(base(), [m.WorkerFailed("b", 2, 1, "crash")], CLUSTER, T0)
    return Scenario(job, CLUSTER, T0 + 1, None)


def s_healing_rollback() -> Scenario:
    job = apply(base(), [SPIKE, m.WorkerFailed("b", 2, 1, "crash")], CLUSTER, T0)
    return Scenario(job, CLUSTER, T0 + 1, 45)


def s_escalated() -> Scenario:
    job = apply(base(), [m.WorkerFailed("b", 2, 1, "crash")], CLUSTER, T0)
    job = m.step(job, m.Tick(), CLUSTER, T0 + DEADLINE + 1).job
    assert job.rung == 1 and job.generation == 4
    return Scenario(job, CLUSTER, T0 + DEADLINE + 2, None)


def s_reconciling() -> Scenario:
    return Scenario(apply(base(), [m.CoordinatorRestarted()], CLUSTER, T0), CLUSTER, T0 + 1, None)


def s_reconciling_rollback() -> Scenario:
    job = apply(base(), [SPIKE, m.CoordinatorRestarted()], CLUSTER, T0)
    return Scenario(job, CLUSTER, T0 + 1, 45)


C2 = nodes("a", "b")
C2_LOST = nodes("a", "b", b={"ready": False})


def s_capacity() -> Scenario:
    job = apply(base(CAPACITY_SPEC, C2), [m.NodeLost("b")], C2_LOST, T0)
    assert job.awaiting_capacity
    return Scenario(job, C2_LOST, T0 + 1, None)


def s_capacity_rollback() -> Scenario:
    job = base(CAPACITY_SPEC, C2)
    job = apply(job, [SPIKE], C2, T0)
    job = apply(job, [m.NodeLost("b")], C2_LOST, T0 + 0.5)
    assert job.awaiting_capacity
    return Scenario(job, C2_LOST, T0 + 1, 45)


def s_bisecting() -> Scenario:
    job = apply(base(), [AUDIT], CLUSTER, T0)
    assert job.state is m.JobState.BISECTING
    return Scenario(job, CLUSTER, T0 + 1, 40)


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "steady": s_steady,
    "rollback_spike": s_rollback_spike,
    "rollback_nonfinite": s_rollback_nonfinite,
    "rollback_fingerprint": s_rollback_fingerprint,
    "healing": s_healing,
    "healing_rollback": s_healing_rollback,
    "escalated": s_escalated,
    "reconciling": s_reconciling,
    "reconciling_rollback": s_reconciling_rollback,
    "capacity": s_capacity,
    "capacity_rollback": s_capacity_rollback,
    "bisecting": s_bisecting,
}
_built: dict[str, Scenario] = {}


def scenario(name: str) -> Scenario:
    if name not in _built:
        _built[name] = SCENARIOS[name]()
    return _built[name]


# Second events: (event, cluster view, time) from the scenario.
OLD_ONSET = 20  # an alarm of the previous generation reaching back to step 20
CURRENT_ONSET = 35  # an alarm of the current generation reaching back before every target above


def _last(job: m.Job) -> tuple[str, int]:
    return job.members[-1], len(job.members) - 1


def e_crash(sc: Scenario):
    node, rank = _last(sc.job)
    return m.WorkerFailed(node, sc.job.generation, rank, "crash", "SIGSEGV"), sc.cluster, sc.now


def e_hang(sc: Scenario):
    node, rank = _last(sc.job)
    return m.WorkerFailed(node, sc.job.generation, rank, "hang", "no step for 60s"), sc.cluster, sc.now


def e_node_lost_member(sc: Scenario):
    node, _ = _last(sc.job)
    view = {**sc.cluster, node: dataclasses.replace(sc.cluster[node], ready=False)}
    return m.NodeLost(node, "heartbeat 5s old"), view, sc.now


def e_node_lost_other(sc: Scenario):
    return m.NodeLost("x", "heartbeat 5s old"), sc.cluster, sc.now


def e_coordinator_restarted(sc: Scenario):
    return m.CoordinatorRestarted(), sc.cluster, sc.now


def e_nonfinite_current(sc: Scenario):
    j = sc.job
    return (
        m.Detector(EventKind.NONFINITE, "a", j.generation, step=j.step + 1, data_index=j.step + 1),
        sc.cluster,
        sc.now,
    )


def e_fingerprint_current(sc: Scenario):
    j = sc.job
    ev = m.Detector(
        EventKind.FINGERPRINT_MISMATCH, "a", j.generation, step=j.step + 2, onset_step=CURRENT_ONSET
    )
    return ev, sc.cluster, sc.now


def e_nonfinite_old(sc: Scenario):
    return (
        m.Detector(EventKind.NONFINITE, "a", sc.job.generation - 1, step=28, data_index=28),
        sc.cluster,
        sc.now,
    )


def e_fingerprint_old(sc: Scenario):
    ev = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", sc.job.generation - 1, step=28, onset_step=OLD_ONSET)
    return ev, sc.cluster, sc.now


def e_stale_crash(sc: Scenario):
    return m.WorkerFailed("b", sc.job.generation - 1, 1, "crash"), sc.cluster, sc.now


def e_tick_past_deadline(sc: Scenario):
    return m.Tick(), sc.cluster, sc.now + 1000.0


def e_cancel(sc: Scenario):
    return m.Cancel(), sc.cluster, sc.now


EVENTS = {
    "crash": e_crash,
    "hang": e_hang,
    "node_lost_member": e_node_lost_member,
    "node_lost_other": e_node_lost_other,
    "coordinator_restarted": e_coordinator_restarted,
    "nonfinite_current": e_nonfinite_current,
    "fingerprint_current": e_fingerprint_current,
    "nonfinite_old": e_nonfinite_old,
    "fingerprint_old": e_fingerprint_old,
    "stale_crash": e_stale_crash,
    "tick_past_deadline": e_tick_past_deadline,
    "cancel": e_cancel,
}
STALE = ("nonfinite_old", "stale_crash", "node_lost_other")


def stopped(job: m.Job) -> bool:
    """The job's ranks were stopped (waiting for capacity, bisecting): nothing of it trains."""
    return job.awaiting_capacity or job.state is m.JobState.BISECTING


def check_invariants(sc: Scenario, ev, d: m.Decision, now: float, event_name: str) -> None:
    old, new = sc.job, d.job
    assert new.state in m.ALLOWED[old.state], (old.state, new.state)
    starts = [a for a in d.actions if isinstance(a, m.StartGeneration)]
    rollbacks = [a for a in d.actions if isinstance(a, m.SendRollback)]

    # A generation number only grows, by one per StartGeneration, which names the job's new generation.
    assert len(starts) <= 1
    if starts:
        (start,) = starts
        assert start.generation == new.generation == old.generation + 1
        assert start.members == new.members and new.state is m.JobState.RECOVERING
        assert new.launched == now, "launched is set whenever a StartGeneration is emitted"
        assert getattr(new, "restore_to", start.rollback_to) == start.rollback_to
        if start.checkpoint:  # never a bad checkpoint, never one after the rollback target
            rec = next(c for c in new.checkpoints if c.path == start.checkpoint)
            assert rec.good and (start.rollback_to < 0 or rec.step <= start.rollback_to), rec
    else:
        assert new.generation == old.generation

    # Every decision that changes anything says why.
    changed = (
        d.actions
        or new.state != old.state
        or new.generation != old.generation
        or new.pending_rollback != old.pending_rollback
        or new.restarts != old.restarts
        or new.alarms != old.alarms
        or new.checkpoints != old.checkpoints
        or target_of(new) != target_of(old)
    )
    if changed:
        assert d.reason, f"{event_name}: a decision that changed something has no reason"

    # The rollback target in flight is never lost: state after an alarm's onset must not survive.
    if sc.target is not None:
        assert target_of(old) == sc.target
        if new.state is m.JobState.CANCELLED:
            assert not any(isinstance(a, m.StopWorkers) and a.checkpoint for a in d.actions), (
                "a final checkpoint of state a rollback was about to discard"
            )
        elif new.state is not m.JobState.FAILED:
            if starts:
                assert 0 <= starts[0].rollback_to <= sc.target, starts[0]
            else:
                t = target_of(new)
                assert t is not None and t <= sc.target, (t, sc.target)
            for rb in rollbacks:
                assert rb.to_step <= sc.target

    # Checkpoints marked bad stay bad; an alarm's onset window is honoured by the response.
    bad_before = {c.step for c in old.checkpoints if not c.good}
    assert bad_before <= {c.step for c in new.checkpoints if not c.good}
    if (
        isinstance(ev, m.Detector)
        and ev.kind != EventKind.NONFINITE
        and event_name not in STALE
        and new.state not in m.TERMINAL
    ):
        onset = ev.onset_step
        assert all(not c.good for c in new.checkpoints if c.step > onset), new.checkpoints
        honoured = (
            any(0 <= s.rollback_to <= onset for s in starts)
            or any(rb.to_step <= onset for rb in rollbacks)
            or (target_of(new) is not None and target_of(new) <= onset)
            or any(a.kind == ev.kind and a.onset_step == onset and not is_open(a) for a in new.alarms)
        )
        assert honoured, f"{event_name}: nothing restores state from before step {onset}"
        # And whatever it did, a checkpoint the old timeline writes after the onset is not good.
        late = m.step(new, m.CheckpointCommitted(ev.generation, onset + 1, "/ck/late"), sc.cluster, now)
        if late.job.checkpoints:
            rec = next(c for c in late.job.checkpoints if c.step == onset + 1)
            assert not rec.good, rec

    # Restart counters grow by one at most, and only on restarts that are counted.
    grew = new.restarts - old.restarts
    assert grew in (0, 1) and sum(n for _, n in new.restarts_by_reason) == new.restarts
    if grew:
        waiting = new.awaiting_capacity and not old.awaiting_capacity
        assert starts or waiting or new.state is m.JobState.FAILED
        assert not stopped(old) or new.state is not old.state or starts, "a restart of stopped ranks"
    if old.awaiting_capacity and event_name in ("crash", "hang", "tick_past_deadline", "node_lost_member"):
        assert grew == 0, "waiting for capacity: the generation was already stopped and counted"

    # A restart during a recovery never goes back down the ladder.
    if new.state not in m.TERMINAL:
        assert new.rung >= old.rung


@pytest.mark.parametrize(("scenario_name", "event_name"), list(itertools.product(SCENARIOS, EVENTS)))
def test_pair_invariants(scenario_name: str, event_name: str) -> None:
    sc = scenario(scenario_name)
    ev, view, now = EVENTS[event_name](sc)
    d = m.step(sc.job, ev, view, now)
    check_invariants(dataclasses.replace(sc, cluster=view), ev, d, now, event_name)
    # Whatever the pair, the decision survives a coordinator restart unchanged.
    assert m.from_json(json.loads(json.dumps(m.to_json(d.job))), d.job.spec) == d.job


@pytest.mark.parametrize("scenario_name", list(SCENARIOS))
def test_every_scenario_round_trips_through_json(scenario_name: str) -> None:
    job = scenario(scenario_name).job
    assert m.from_json(json.loads(json.dumps(m.to_json(job))), job.spec) == job


# ---------------------------------------------------------------------------------------------
# What each pair must do


def only(actions, kind):
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


@pytest.mark.parametrize("event_name", ["crash", "hang", "node_lost_member", "tick_past_deadline"])
def test_a_restart_before_the_rollback_generation_steps_restores_from_the_same_target(event_name) -> None:
    sc = scenario("healing_rollback")  # generation 3 launched with rollback_to=45, not stepped yet
    assert sc.job.restore_to == 45
    ev, view, now = EVENTS[event_name](sc)
    d = m.step(sc.job, ev, view, now)
    start = only(d.actions, m.StartGeneration)
    assert start.rollback_to == 45 and start.checkpoint == "/ck/40", start
    # Once the new generation steps, the target is applied and the next fault starts afresh.
    job = m.step(d.job, m.Progress("a", d.job.generation, 46), view, now + 1).job
    assert job.restore_to == -1 and job.launched is None
    d = m.step(job, m.WorkerFailed("a", job.generation, 0, "crash"), view, now + 2)
    assert only(d.actions, m.StartGeneration).rollback_to == -1


def test_waiting_for_capacity_keeps_an_explicit_rollback_target_and_restores_a_checkpoint() -> None:
    job = base(CAPACITY_SPEC, C2)
    audit = m.Detector(EventKind.AUDIT_MISMATCH, "a", 2, step=52, suspect_ranks=(1,), onset_step=40)
    d = m.step(job, audit, C2, T0)  # b is named and left out; a alone is not enough: wait
    assert d.job.awaiting_capacity and d.job.restore_to == 40 and d.job.restarts == job.restarts + 1
    assert [c.step for c in d.job.checkpoints if not c.good] == [50]
    grown = {**nodes("a", "b", b={"cordoned": True}), "c": NodeView("c", store_port=1002)}  # b: Cordon
    d2 = m.step(d.job, m.NodeChanged("c"), grown, T0 + 5)
    start = only(d2.actions, m.StartGeneration)
    assert start.rollback_to == 40 and start.checkpoint == "/ck/40" and start.members == ("a", "c")
    # a's ranks were stopped when the job began waiting: nobody is left to heal from.
    assert start.resume == Resume.CHECKPOINT and "live peer" not in d2.reason
    assert d2.job.restarts == d.job.restarts and not any(is_open(a) for a in d2.job.alarms)


def test_a_detection_reaching_back_before_a_pending_rollback_is_not_ignored() -> None:
    sc = scenario("rollback_spike")  # pending: back to 45
    # A spike whose window lies after the target: those steps are recomputed anyway.
    late_spike = m.Detector(EventKind.SPIKE, "b", 2, step=52, data_index=52)
    assert m.step(sc.job, late_spike, CLUSTER, sc.now).job == sc.job
    # A divergence whose onset is before it: rolling back to 45 would keep it.
    fp = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 2, step=60, onset_step=CURRENT_ONSET)
    d = m.step(sc.job, fp, CLUSTER, sc.now)
    assert only(d.actions, m.SendRollback).to_step == CURRENT_ONSET
    assert [c.step for c in d.job.checkpoints if not c.good] == [40, 50]
    # The superseded request's completion changes nothing; the new one's ends the rollback.
    old_id = sc.job.pending_rollback.request_id
    assert m.step(d.job, m.RollbackDone(2, old_id, 45), CLUSTER, sc.now + 1).job == d.job
    done = m.step(d.job, m.RollbackDone(2, d.job.pending_rollback.request_id, 35), CLUSTER, sc.now + 1)
    assert done.job.pending_rollback is None


def test_a_later_detection_never_moves_a_pending_rollback_later() -> None:
    sc = scenario("rollback_fingerprint")  # pending: back to 40
    spike = m.Detector(EventKind.SPIKE, "a", 2, step=44, data_index=44, onset_step=30)
    d = m.step(sc.job, spike, CLUSTER, sc.now)
    rb = only(d.actions, m.SendRollback)
    assert rb.to_step == 30 and d.job.pending_rollback.to_step == 30 and "earlier target" in d.reason


def test_coordinator_restart_while_waiting_for_capacity_is_not_a_restart() -> None:
    sc = scenario("capacity")
    d = m.step(sc.job, m.CoordinatorRestarted(), sc.cluster, sc.now)
    assert d.job == sc.job and d.actions == ()
    later = m.step(d.job, m.Tick(), sc.cluster, sc.now + m.RECONCILE_GRACE_S + 1)
    assert later.job.restarts == sc.job.restarts and later.actions == ()


def test_no_decision_while_reconciling_and_a_missed_deadline_escalates_when_it_ends() -> None:
    sc = scenario("healing")  # generation 3 launched at T0, deadline 30 s
    t = sc.now + 100  # the coordinator was down past the deadline
    job = m.step(sc.job, m.CoordinatorRestarted(), CLUSTER, t).job
    # Progress may already be on its way: nothing is decided before the members report.
    assert m.step(job, m.Tick(), CLUSTER, t + 1).job == job
    waiting = m.step(job, m.PeerWaiting("a", 3, 55), CLUSTER, t + 1).job
    assert m.step(waiting, m.Tick(), CLUSTER, t + m.PEER_WAIT_GRACE_S + 2).actions == ()
    # Nobody reported generation 3 training and its deadline passed: escalate, never repeat the plan.
    d = m.step(job, m.Tick(), CLUSTER, t + m.RECONCILE_GRACE_S)
    start = only(d.actions, m.StartGeneration)
    assert d.job.rung == 1 and start.fresh_processes and "did not complete its first step" in d.reason
    # A generation that did step while the coordinator was down is reconciled, not escalated.
    job2 = m.step(job, m.Reported("a", 3, True), CLUSTER, t + 1).job
    job2 = m.step(job2, m.Reported("b", 3, True), CLUSTER, t + 1).job
    job2 = m.step(job2, m.Progress("a", 3, 56), CLUSTER, t + 1).job
    assert job2.state is m.JobState.RUNNING and m.step(job2, m.Tick(), CLUSTER, t + 50).actions == ()


@pytest.mark.parametrize("scenario_name", ["capacity", "capacity_rollback", "bisecting"])
def test_events_of_stopped_ranks_count_no_restart_and_end_no_wait(scenario_name: str) -> None:
    sc = scenario(scenario_name)
    g = sc.job.generation
    for ev in (m.WorkerFailed("a", g, 0, "crash"), m.WorkerFailed("a", g, 0, "hang"), m.Progress("a", g, 60)):
        d = m.step(sc.job, ev, sc.cluster, sc.now)
        assert d.job == sc.job and d.actions == () and d.reason == "", ev


def test_a_node_lost_while_waiting_for_capacity_is_retried_not_counted() -> None:
    sc = scenario("capacity")
    d = m.step(sc.job, m.NodeLost("a"), nodes("a", "b", a={"ready": False}, b={"ready": False}), sc.now)
    assert d.job.restarts == sc.job.restarts and d.job.awaiting_capacity and d.actions == ()


def test_an_alarm_of_an_older_generation_is_not_forgotten() -> None:
    sc = scenario("steady")  # generation 2 healed from generation 1's survivors
    ev = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=28, suspect_ranks=(1,), onset_step=OLD_ONSET)
    d = m.step(sc.job, ev, CLUSTER, sc.now)
    assert [c.step for c in d.job.checkpoints if c.good] == [10]
    cordon = only(d.actions, m.Cordon)
    start = only(d.actions, m.StartGeneration)
    assert cordon.node_id == "b" and start.members == ("a", "s")
    assert start.rollback_to == OLD_ONSET and start.checkpoint == "/ck/10"
    assert (
        "reported by generation 1" in d.reason
        and d.job.restarts_by_reason[-1][0] == RestartReason.FINGERPRINT
    )
    # A later checkpoint of the new generation is good again; the old timeline's are not.
    job = m.step(d.job, m.CheckpointCommitted(3, 25, "/ck/25"), CLUSTER, sc.now + 1).job
    assert next(c for c in job.checkpoints if c.step == 25).good
    # Nonfinite: the update was never applied, so a late one leaves nothing to undo.
    late = m.Detector(EventKind.NONFINITE, "a", 1, step=28, data_index=28)
    assert m.step(sc.job, late, CLUSTER, sc.now).job == sc.job


def test_an_older_alarm_within_what_the_healing_generation_already_undoes_is_only_recorded() -> None:
    sc = scenario("healing_rollback")  # generation 3 restores from step 45 or earlier
    ev = m.Detector(EventKind.SPIKE, "a", 2, step=48, data_index=48)  # onset after 47
    d = m.step(sc.job, ev, CLUSTER, sc.now)
    assert not any(isinstance(a, m.StartGeneration) for a in d.actions)
    assert [c.step for c in d.job.checkpoints if not c.good] == [50]
    assert not any(is_open(a) for a in d.job.alarms) and "already restores" in d.reason


def test_a_bisection_restores_from_before_its_own_onset_not_an_older_alarms() -> None:
    job = base()
    fp = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 2, step=50, onset_step=40)
    job = m.step(job, fp, CLUSTER, T0).job
    job = m.step(job, m.RollbackDone(2, job.pending_rollback.request_id, 40), CLUSTER, T0).job
    job = apply(
        job, [m.Progress("a", 2, 66), m.CheckpointCommitted(2, 65, "/ck/65", request_epoch=1)], CLUSTER, T0
    )
    d = m.step(job, m.Detector(EventKind.NONFINITE, "a", 2, step=67, data_index=67), CLUSTER, T0 + 2)
    job = m.step(d.job, m.RollbackDone(2, d.job.pending_rollback.request_id, 66), CLUSTER, T0 + 2).job
    d = m.step(job, m.Detector(EventKind.NONFINITE, "a", 2, step=70, data_index=70), CLUSTER, T0 + 3)
    assert d.job.state is m.JobState.BISECTING and d.job.restore_to == 69
    d = m.step(d.job, m.BisectionDone("bi-1", ("b",), "b computes wrong"), CLUSTER, T0 + 9)
    start = only(d.actions, m.StartGeneration)
    assert start.rollback_to == 69 and start.checkpoint == "/ck/65" and start.members == ("a", "s")


def test_a_detection_during_a_bisection_starts_no_second_bisection() -> None:
    sc = scenario("bisecting")  # stopped to bisect; restores from 40 or earlier afterwards
    ev = m.Detector(EventKind.AUDIT_MISMATCH, "b", sc.job.generation, step=52, onset_step=CURRENT_ONSET)
    d = m.step(sc.job, ev, CLUSTER, sc.now)
    assert d.job.state is m.JobState.BISECTING and d.job.restore_to == CURRENT_ONSET
    assert not any(isinstance(a, (m.StartBisection, m.SendRollback, m.StopWorkers)) for a in d.actions)
    d = m.step(d.job, m.BisectionDone("bi-1", (), "nothing found"), CLUSTER, sc.now + 5)
    start = only(d.actions, m.StartGeneration)
    assert (
        start.rollback_to == CURRENT_ONSET
        and start.checkpoint == "/ck/30"
        and start.resume == Resume.CHECKPOINT
    )


def test_coordinator_restart_resends_a_pending_rollback() -> None:
    job = base()
    spike = m.Detector(EventKind.SPIKE, "a", 2, step=46, data_index=46)
    job = m.step(job, spike, CLUSTER, T0).job
    job = m.step(job, m.RollbackDone(2, job.pending_rollback.request_id, 45), CLUSTER, T0).job
    job = m.step(job, spike, CLUSTER, T0 + 1).job  # the same data again: skip the window
    pending = job.pending_rollback
    assert pending.skip == ((45, SPEC.skip_batches),)
    d = m.step(job, m.CoordinatorRestarted(), CLUSTER, T0 + 2)
    rb = only(d.actions, m.SendRollback)
    assert (rb.request_id, rb.to_step, rb.skip) == (pending.request_id, 45, pending.skip)
    assert d.job.pending_rollback == pending and "sent again" in d.reason
    assert m.from_json(json.loads(json.dumps(m.to_json(d.job))), SPEC) == d.job


@pytest.mark.parametrize(
    ("scenario_name", "clean"),
    [
        ("steady", True),
        ("healing", True),
        ("rollback_spike", False),
        ("healing_rollback", False),
        ("bisecting", False),
    ],
)
def test_cancel_asks_for_a_final_checkpoint_only_of_clean_state(scenario_name: str, clean: bool) -> None:
    sc = scenario(scenario_name)
    d = m.step(sc.job, m.Cancel(), sc.cluster, sc.now)
    assert d.job.state is m.JobState.CANCELLED and only(d.actions, m.StopWorkers).checkpoint is clean


def test_the_job_does_not_succeed_with_a_rollback_pending() -> None:
    sc = scenario("rollback_spike")
    job = m.step(sc.job, m.RankFinished(2, 0, "f"), CLUSTER, sc.now).job
    d = m.step(job, m.RankFinished(2, 1, "f"), CLUSTER, sc.now)
    assert d.job.state is m.JobState.RECOVERING and "every rank finished before" in d.reason
    start = only(d.actions, m.StartGeneration)
    assert start.rollback_to == 45 and start.resume == Resume.CHECKPOINT and start.checkpoint == "/ck/40"
    assert d.job.finished_ranks == ()


TERMINAL_EVENTS = [
    m.Tick(),
    m.WorkerFailed("a", 2, 0, "crash"),
    m.NodeLost("a"),
    m.CoordinatorRestarted(),
    m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 2, step=60, onset_step=20),
    m.Progress("a", 2, 70),
    m.CheckpointCommitted(2, 70, "/ck/70"),
    m.Cancel(),
    m.Submitted(),
]


@pytest.mark.parametrize("how", ["cancel", "fail", "succeed"])
def test_a_terminal_job_stays_terminal(how: str) -> None:
    job = base()
    if how == "cancel":
        job = m.step(job, m.Cancel(), CLUSTER, T0).job
    elif how == "fail":
        job = m.step(job, m.WorkerFailed("a", 2, 0, "config", "bad key"), CLUSTER, T0).job
    else:
        job = apply(job, [m.RankFinished(2, 0), m.RankFinished(2, 1)], CLUSTER, T0)
    assert job.state in m.TERMINAL
    for ev in TERMINAL_EVENTS:
        d = m.step(job, ev, CLUSTER, T0 + 1000)
        assert d.job == job and d.actions == () and d.reason == "", ev


@pytest.mark.parametrize("scenario_name", list(SCENARIOS))
def test_stale_events_change_nothing(scenario_name: str) -> None:
    sc = scenario(scenario_name)
    old = sc.job.generation - 1
    for ev in (
        m.WorkerFailed("b", old, 1, "crash"),
        m.WorkerFailed("b", old, 1, "config", "stale"),
        m.PeerWaiting("a", old, 20),
        m.Progress("a", old, 99),
        m.RankJoined("a", old, 0),
        m.RankFinished(old, 0),
        m.Detector(EventKind.NONFINITE, "a", old, step=28, data_index=28),
        m.RollbackDone(old, 999, 10),
        m.RollbackUnavailable(old, 999),
        m.NodeLost("x"),
        m.Reported("a", old, True),
    ):
        d = m.step(sc.job, ev, sc.cluster, sc.now)
        assert d.job == sc.job and d.actions == () and d.reason == "", ev


@pytest.mark.parametrize("scenario_name", ["healing", "healing_rollback", "escalated"])
def test_launched_is_cleared_by_the_first_progress_of_its_own_generation_only(scenario_name: str) -> None:
    sc = scenario(scenario_name)
    assert sc.job.launched is not None
    assert m.step(sc.job, m.Progress("a", sc.job.generation - 1, 90), CLUSTER, sc.now).job == sc.job
    job = m.step(sc.job, m.Progress("a", sc.job.generation, 40), CLUSTER, sc.now).job
    assert job.launched is None and job.restore_to == -1 and job.rung == 0 and job.tried == ()


@pytest.mark.parametrize("scenario_name", ["healing", "healing_rollback", "escalated"])
def test_a_missed_deadline_always_climbs_the_ladder(scenario_name: str) -> None:
    sc = scenario(scenario_name)
    d = m.step(sc.job, m.Tick(), sc.cluster, sc.job.launched + DEADLINE + 0.5)
    assert d.job.rung == sc.job.rung + 1 or d.job.state is m.JobState.FAILED
    if d.job.state is not m.JobState.FAILED:
        start = only(d.actions, m.StartGeneration)
        assert (
            start.fresh_processes and start.resume != Resume.PEER and start.rollback_to == (sc.target or -1)
        )


def test_a_late_detection_names_its_ranks_by_its_own_generations_members() -> None:
    # Replica fingerprints at step 21 name rank 0 (node a): generation 2 replaces a with the spare,
    # which takes rank 0. A second mismatch about the same divergence, written by generation 1 at
    # step 22 before it stopped, still means node a: it must neither cordon the spare nor shrink
    # the job, and generation 2 (without a, restoring from step 21) already answers it.
    spec = dataclasses.replace(SPEC, nodes=3)
    cluster = nodes("a", "b", "c", spares=("s",))
    job = apply(running(cluster, spec), [m.Progress("a", 1, 1), m.Progress("a", 1, 21)], cluster, 1.0)
    first = m.Detector(
        EventKind.FINGERPRINT_MISMATCH,
        "b",
        1,
        step=21,
        suspect_ranks=(0,),
        onset_step=20,
        detail="rank 0 differs",
    )
    d = m.step(job, first, cluster, 3.0)
    start = only(d.actions, m.StartGeneration)
    assert "a" not in start.members and "s" in start.members and start.rollback_to == 21
    assert d.job.node_of_rank(0) == "s"  # the spare took rank 0
    late = m.Detector(
        EventKind.FINGERPRINT_MISMATCH,
        "c",
        1,
        step=22,
        suspect_ranks=(0,),
        onset_step=20,
        detail="rank 0 differs",
    )
    d2 = m.step(d.job, late, cluster, 3.5)
    assert not any(isinstance(a, (m.Cordon, m.StartGeneration)) for a in d2.actions), d2.reason
    assert d2.job.members == d.job.members and d2.job.generation == 2
    assert d2.job.restarts == d.job.restarts and "already" in d2.reason
    # The same late report naming a rank whose node generation 2 still trains with is answered.
    other = dataclasses.replace(late, suspect_ranks=(1,))  # node b in generation 1
    d3 = m.step(d.job, other, cluster, 3.5)
    assert only(d3.actions, m.Cordon).node_id == "b"
    assert "b" not in only(d3.actions, m.StartGeneration).members
