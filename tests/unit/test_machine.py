"""The job state machine is a pure function: every policy is tested without sleeping."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator import machine as m
from coordinator.jobspec import JobSpec
from coordinator.membership import NodeView
from stanchion.vocab import EventKind, RestartReason, Resume

SPEC = JobSpec(
    name="t",
    nodes=2,
    min_nodes=1,
    workers_per_node=1,
    trainer={"preset": "tiny", "data": {"path": "d", "global_batch_size": 16, "micro_batch_size": 8}},
)


def nodes(*ids: str, spares: tuple[str, ...] = (), **flags) -> dict[str, NodeView]:
    out = {i: NodeView(i, store_port=1000 + n) for n, i in enumerate(ids)}
    out.update({i: NodeView(i, spare=True) for i in spares})
    for i, f in flags.items():
        out[i] = dataclasses.replace(out[i], **f)
    return out


def running(cluster, spec=SPEC, now=0.0) -> m.Job:
    d = m.step(m.new_job("j1", spec, now), m.Submitted(), cluster, now)
    assert d.job.state is m.JobState.RUNNING, d.reason
    return d.job


def test_pending_until_enough_nodes_then_first_generation_without_spares() -> None:
    job = m.new_job("j1", SPEC, 0.0)
    d = m.step(job, m.Submitted(), nodes("a", spares=("s",)), 1.0)
    assert d.job.state is m.JobState.PENDING and not d.actions
    d = m.step(d.job, m.NodeChanged("b"), nodes("a", "b", spares=("s",)), 2.0)
    assert d.job.state is m.JobState.RUNNING
    (start,) = d.actions
    assert isinstance(start, m.StartGeneration) and start.members == ("a", "b") and start.generation == 1
    assert "rendezvous complete" in d.reason


def test_rendezvous_timeout_fails_with_too_few_nodes() -> None:
    spec = dataclasses.replace(SPEC, nodes=3, min_nodes=3, rendezvous_timeout_s=10)
    job = m.new_job("j1", spec, 0.0)
    d = m.step(job, m.Tick(), nodes("a", "b"), 11.0)
    assert d.job.state is m.JobState.FAILED and "at least 3" in d.reason


def test_a_sharded_job_heals_in_place_at_the_same_size_and_reshards_from_a_checkpoint_when_smaller() -> None:
    """Under FSDP a survivor keeps its shard only where its rank keeps its place in the mesh."""
    spec = dataclasses.replace(SPEC, trainer={**SPEC.trainer, "parallel": "fsdp"})
    cluster = nodes("a", "b")
    job = running(cluster, spec)
    d = m.step(job, m.WorkerFailed("b", 1, rank=1, kind="crash", detail="signal SIGKILL"), cluster, 5.0)
    (start,) = d.actions
    assert start.resume == Resume.PEER and start.members == ("a", "b") and not start.fresh_processes
    d = m.step(running(cluster, spec), m.NodeLost("b"), nodes("a", "b", b={"ready": False}), 3.0)
    (start,) = d.actions
    assert start.members == ("a",) and start.resume == Resume.CHECKPOINT and start.fresh_processes, d.reason
    # Saved by an older coordinator, a job may carry the flag it once had for sharded programs.
    assert m.from_json({**m.to_json(d.job), "in_place": False}, spec).generation == d.job.generation


def test_crash_restarts_with_peer_healing_and_keeps_ranks() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    d = m.step(job, m.WorkerFailed("b", 1, rank=1, kind="crash", detail="signal SIGKILL"), cluster, 5.0)
    assert d.job.state is m.JobState.RECOVERING and d.job.generation == 2
    (start,) = d.actions
    assert start.members == ("a", "b") and start.resume == Resume.PEER
    assert "rank 1 on b crashed" in d.reason and d.job.restarts == 1
    # The first step of generation 2 ends the recovery and records its duration.
    d2 = m.step(d.job, m.Progress("a", 2, 1), cluster, 5.75)
    assert d2.job.state is m.JobState.RUNNING
    assert d2.actions == () and d2.job.recoveries == (0.75,)


def test_a_recovery_is_measured_from_the_fault_its_agent_reports_not_from_the_report() -> None:
    """A frozen rank is reported 0.3 s after its last heartbeat: that time is the recovery's too."""
    cluster = nodes("a", "b")
    hang = m.WorkerFailed(
        "b", 1, rank=1, kind="hang", detail="killed by the agent: stopped", fault_age_s=0.25
    )
    d = m.step(running(cluster), hang, cluster, 5.0)
    assert d.job.fault_time == 4.75 and "rank 1 on b hung" in d.reason
    d2 = m.step(d.job, m.Progress("a", 2, 1), cluster, 5.5)
    assert d2.job.recoveries == (0.75,) and "recovered in 0.75s" in d2.reason
    # A second fault while recovering keeps the first one's time: the job is down since then.
    again = m.WorkerFailed("a", 2, rank=0, kind="crash", detail="signal SIGKILL", fault_age_s=0.05)
    assert m.step(d.job, again, cluster, 5.2).job.fault_time == 4.75


def test_stale_events_of_an_old_generation_are_ignored() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    job = m.step(job, m.WorkerFailed("b", 1, 1, "crash"), cluster, 1.0).job
    d = m.step(job, m.WorkerFailed("a", 1, 0, "crash"), cluster, 1.1)
    assert d.job == job and d.actions == () and d.reason == ""


def test_node_loss_uses_a_spare_in_the_lost_slot() -> None:
    cluster = nodes("a", "b", spares=("s",))
    job = running(cluster)
    lost = nodes("a", "b", spares=("s",), b={"ready": False})
    d = m.step(job, m.NodeLost("b", "heartbeat 5.0s old"), lost, 3.0)
    (start,) = d.actions
    assert start.members == ("a", "s") and start.resume == Resume.PEER and "b replaced by s" in d.reason


def test_node_loss_without_spare_shrinks_when_the_batch_divides_else_waits() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    d = m.step(job, m.NodeLost("b"), nodes("a", "b", b={"ready": False}), 3.0)
    (start,) = d.actions
    assert start.members == ("a",) and "shrinks from 2 to 1" in d.reason and d.job.world_size == 1

    # 3 nodes, global batch 24 with micro batch 8: 2 nodes cannot divide it, so the job waits.
    spec = dataclasses.replace(
        SPEC,
        nodes=3,
        trainer={"preset": "tiny", "data": {"path": "d", "global_batch_size": 24, "micro_batch_size": 8}},
    )
    c3 = nodes("a", "b", "c")
    job3 = running(c3, spec)
    d = m.step(job3, m.NodeLost("c"), nodes("a", "b", "c", c={"ready": False}), 3.0)
    assert d.job.state is m.JobState.RECOVERING and d.job.awaiting_capacity
    assert isinstance(d.actions[0], m.StopWorkers) and "waiting for nodes" in d.reason
    # A node registering later lets it start without counting another restart.
    d2 = m.step(d.job, m.NodeChanged("d"), {**nodes("a", "b", "d"), "c": NodeView("c", ready=False)}, 9.0)
    assert isinstance(d2.actions[0], m.StartGeneration) and d2.actions[0].members == ("a", "b", "d")
    assert d2.job.restarts == d.job.restarts


def test_replay_first_then_skip_same_data_then_suspect_hardware() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    ev = m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49)
    d = m.step(job, ev, cluster, 1.0)
    (rb,) = d.actions
    assert isinstance(rb, m.SendRollback) and rb.skip == () and rb.to_step == 49 and "replaying" in d.reason
    job = m.step(d.job, m.RollbackDone(1, rb.request_id, 40), cluster, 1.5).job
    # It recurs at the same data: skip the window.
    d = m.step(job, m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49), cluster, 2.0)
    (rb2,) = d.actions
    assert rb2.skip == ((49, SPEC.skip_batches),) and "the data is the cause" in d.reason
    assert d.job.skip_windows == ((49, SPEC.skip_batches),)
    job = m.step(d.job, m.RollbackDone(1, rb2.request_id, 40), cluster, 2.5).job
    # A new anomaly at other data: after another replay at different data -> hardware suspect.
    d = m.step(job, m.Detector(EventKind.NONFINITE, "a", 1, step=80, data_index=87), cluster, 3.0)
    assert d.actions[0].skip == ()  # first occurrence at this data: replay
    job = m.step(d.job, m.RollbackDone(1, d.actions[0].request_id, 70), cluster, 3.2).job
    d = m.step(job, m.Detector(EventKind.NONFINITE, "a", 1, step=90, data_index=97), cluster, 3.5)
    assert d.job.state is m.JobState.BISECTING
    assert any(isinstance(a, m.StartBisection) for a in d.actions)


def test_detectors_during_a_pending_rollback_are_ignored() -> None:
    cluster = nodes("a", "b")
    job = m.step(
        running(cluster), m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49), cluster, 1.0
    ).job
    d = m.step(job, m.Detector(EventKind.SPIKE, "b", 1, step=52, data_index=51), cluster, 1.1)
    assert d.actions == () and d.job == job


def test_fingerprint_mismatch_named_cordons_and_replaces_unnamed_rolls_back() -> None:
    cluster = nodes("a", "b", "c", spares=("s",))
    spec = dataclasses.replace(
        SPEC,
        nodes=3,
        trainer={"preset": "tiny", "data": {"path": "d", "global_batch_size": 24, "micro_batch_size": 8}},
    )
    job = running(cluster, spec)
    d = m.step(
        job,
        m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=40, suspect_ranks=(2,), onset_step=30),
        cluster,
        1.0,
    )
    kinds = [type(a).__name__ for a in d.actions]
    assert kinds == ["Cordon", "StartGeneration"] and d.actions[0].node_id == "c"
    assert d.actions[1].members == ("a", "b", "s") and d.actions[1].resume == Resume.PEER
    assert d.actions[1].rollback_to == 40  # the odd replica's gradients reached the average until it left

    job2 = running(nodes("a", "b"))
    d = m.step(
        job2,
        m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=40, suspect_ranks=(), onset_step=30),
        nodes("a", "b"),
        1.0,
    )
    (rb,) = d.actions
    assert isinstance(rb, m.SendRollback) and rb.to_step == 30


def test_a_mismatch_the_ranks_rolled_back_in_place_needs_no_second_rollback() -> None:
    """Two replicas that disagree roll back at their verdict, before the report reaches the
    coordinator: a request to the same step would send them back again over the steps redone."""
    cluster = nodes("a", "b")
    job = running(cluster)
    for step in (20, 40):
        job = m.step(job, m.CheckpointCommitted(1, step, f"/ck/{step}"), cluster, 1.0).job
    ev = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=36, onset_step=30, rolls_back_to=30)
    d = m.step(job, ev, cluster, 2.0)
    assert [type(a).__name__ for a in d.actions] == ["MarkCheckpoint"]  # the step-40 one: after the onset
    assert d.actions[0].step == 40 and not d.actions[0].good
    assert "rolled back in place to step 30" in d.reason and d.job.pending_rollback is None
    assert d.job.state is job.state and d.job.generation == job.generation
    assert not [a for a in d.job.alarms if a.resolved_epoch < 0 and a.resolved_generation < 0]
    # A checkpoint written after the rollback, in the same generation and request epoch, is good.
    after = m.step(d.job, m.CheckpointCommitted(1, 34, "/ck/34"), cluster, 3.0)
    assert after.actions[0].good, after.reason


@pytest.mark.parametrize("earlier", ["alarm", "rollback"])
def test_a_mismatch_rolled_back_in_place_still_gets_a_request_when_something_needs_earlier_state(
    earlier: str,
) -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    if earlier == "alarm":  # an open alarm from before the ranks' target (a NaN still replaying)
        job = dataclasses.replace(job, alarms=(m.Alarm(EventKind.SPIKE, 20, 22, job.generation),))
    else:  # a rollback in flight to before it
        job = m.step(
            job, m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=25, onset_step=20), cluster, 1.0
        ).job
        assert job.pending_rollback is not None and job.pending_rollback.to_step == 20
    ev = m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=36, onset_step=30, rolls_back_to=30)
    d = m.step(job, ev, cluster, 2.0)
    if earlier == "alarm":  # one request goes back past both
        (rb,) = [a for a in d.actions if isinstance(a, m.SendRollback)]
        assert rb.to_step == 20, d.reason
    else:  # the request in flight already goes back past it: nothing more
        assert d.actions == () and d.job.pending_rollback.to_step == 20, d.reason


def test_audit_mismatch_rolls_survivors_back_past_the_onset_and_marks_checkpoints_bad() -> None:
    cluster = nodes("a", "b", "c", spares=("s",))
    spec = dataclasses.replace(
        SPEC,
        nodes=3,
        trainer={"preset": "tiny", "data": {"path": "d", "global_batch_size": 24, "micro_batch_size": 8}},
    )
    job = running(cluster, spec)
    for step in (20, 40):
        job = m.step(job, m.CheckpointCommitted(1, step, f"/ck/{step}"), cluster, 1.0).job
    d = m.step(
        job,
        m.Detector(EventKind.AUDIT_MISMATCH, "a", 1, step=45, suspect_ranks=(1,), onset_step=25),
        cluster,
        2.0,
    )
    marks = [a for a in d.actions if isinstance(a, m.MarkCheckpoint)]
    assert [(x.step, x.good) for x in marks] == [(40, False)]
    start = next(a for a in d.actions if isinstance(a, m.StartGeneration))
    assert start.rollback_to == 25 and start.members == ("a", "s", "c") and start.checkpoint == "/ck/20"
    assert d.job.last_good.step == 20


def test_checkpoint_after_an_alarm_onset_is_not_good() -> None:
    cluster = nodes("a", "b")
    job = m.step(
        running(cluster), m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49), cluster, 1.0
    ).job
    d = m.step(job, m.CheckpointCommitted(1, 60, "/ck/60"), cluster, 2.0)
    assert not d.job.checkpoints[-1].good and "onset window" in d.reason


def test_restart_loop_guards() -> None:
    cluster = nodes("a", "b")
    spec = dataclasses.replace(SPEC, max_restarts_without_progress=2)
    job = running(cluster, spec)
    for i in range(2):
        job = m.step(job, m.WorkerFailed("b", job.generation, 1, "crash"), cluster, float(i)).job
        assert job.state is m.JobState.RECOVERING
    d = m.step(job, m.WorkerFailed("b", job.generation, 1, "crash"), cluster, 5.0)
    assert d.job.state is m.JobState.FAILED and "without progress" in d.reason

    spec = dataclasses.replace(SPEC, max_restarts=1)
    job = running(cluster, spec)
    job = m.step(job, m.WorkerFailed("b", 1, 1, "crash"), cluster, 1.0).job
    job = m.step(job, m.Progress("a", 2, 10), cluster, 2.0).job
    d = m.step(job, m.WorkerFailed("b", 2, 1, "crash"), cluster, 3.0)
    assert d.job.state is m.JobState.FAILED and "max_restarts=1" in d.reason


def test_config_error_fails_without_restarting() -> None:
    cluster = nodes("a", "b")
    d = m.step(
        running(cluster), m.WorkerFailed("a", 1, 0, "config", "model.n_layerz: unknown key"), cluster, 1.0
    )
    assert d.job.state is m.JobState.FAILED and "n_layerz" in d.reason


def test_all_ranks_finished_succeeds_and_cancel_stops() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    job = m.step(job, m.RankFinished(1, 0, "abc", 3.2), cluster, 1.0).job
    assert job.state is m.JobState.RUNNING
    d = m.step(job, m.RankFinished(1, 1, "abc", 3.2), cluster, 1.0)
    assert d.job.state is m.JobState.SUCCEEDED and d.job.final_fingerprint == "abc"
    d = m.step(running(cluster), m.Cancel(), cluster, 1.0)
    assert d.job.state is m.JobState.CANCELLED and d.actions[0].checkpoint is True
    assert m.step(d.job, m.WorkerFailed("a", 1, 0, "crash"), cluster, 2.0).job.state is m.JobState.CANCELLED


def test_a_finished_job_reports_the_step_its_ranks_finished_at() -> None:
    """A fast job finishes between two progress reports: the finish event's step is the job's."""
    cluster = nodes("a", "b")
    job = dataclasses.replace(running(cluster), step=153)
    job = m.step(job, m.RankFinished(1, 0, "abc", 3.2, 200), cluster, 1.0).job
    assert job.step == 200
    d = m.step(job, m.RankFinished(1, 1, "abc", 3.2, 200), cluster, 1.0)
    assert d.job.state is m.JobState.SUCCEEDED and d.job.step == 200


def test_coordinator_restart_reconciles_without_restarting() -> None:
    cluster = nodes("a", "b")
    job = running(cluster)
    d = m.step(job, m.CoordinatorRestarted(), cluster, 10.0)
    job = d.job
    job = m.step(job, m.Reported("a", 1, True), cluster, 11.0).job
    d = m.step(job, m.Reported("b", 1, True), cluster, 11.5)
    assert d.job.reconcile_until is None and d.actions == () and "nothing restarted" in d.reason
    # A member that never reports in gets the job restarted after the grace period.
    job = m.step(running(cluster), m.CoordinatorRestarted(), cluster, 10.0).job
    job = m.step(job, m.Reported("a", 1, True), cluster, 11.0).job
    d = m.step(job, m.Tick(), cluster, 10.0 + m.RECONCILE_GRACE_S)
    assert isinstance(d.actions[0], m.StartGeneration) and "did not report" in d.reason


def test_peer_waiting_without_a_failure_report_restarts_after_grace() -> None:
    cluster = nodes("a", "b")
    job = m.step(running(cluster), m.PeerWaiting("a", 1), cluster, 1.0).job
    assert m.step(job, m.Tick(), cluster, 1.0 + m.PEER_WAIT_GRACE_S / 2).actions == ()
    d = m.step(job, m.Tick(), cluster, 1.0 + m.PEER_WAIT_GRACE_S)
    assert isinstance(d.actions[0], m.StartGeneration) and d.actions[0].members == ("a", "b")


def test_a_silent_member_is_taken_for_the_vanished_peer() -> None:
    cluster = nodes("a", "b", spares=("s",))
    job = m.step(running(cluster), m.PeerWaiting("a", 1), cluster, 1.0).job
    quiet = {**cluster, "b": dataclasses.replace(cluster["b"], heartbeat_age_s=m.QUIET_S + 0.5)}
    d = m.step(job, m.Tick(), quiet, 1.0 + m.PEER_WAIT_GRACE_S)
    assert d.actions[0].members == ("a", "s") and "b went silent" in d.reason


def test_illegal_transitions_are_refused() -> None:
    assert m.JobState.RUNNING not in m.ALLOWED[m.JobState.SUCCEEDED]
    with pytest.raises(TypeError):
        m.step(running(nodes("a", "b")), object(), {}, 0.0)


def test_job_round_trips_through_json() -> None:
    cluster = nodes("a", "b")
    job = m.step(
        running(cluster), m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49), cluster, 1.0
    ).job
    job = m.step(job, m.CheckpointCommitted(1, 60, "/ck/60"), cluster, 2.0).job
    import json

    assert m.from_json(json.loads(json.dumps(m.to_json(job))), SPEC) == job


def test_an_unhealthy_node_is_left_out_of_the_next_generation() -> None:
    cluster = nodes("a", "b", spares=("s",))
    job = running(cluster)
    sick = {**cluster, "b": dataclasses.replace(cluster["b"], healthy=False)}
    d = m.step(job, m.WorkerFailed("a", 1, 0, "crash"), sick, 2.0)
    (start,) = d.actions
    assert start.members == ("a", "s") and "b replaced by s" in d.reason


def test_checkpoints_are_tainted_only_until_the_response_restores_clean_state() -> None:
    cluster = nodes("a", "b")
    job = m.step(
        running(cluster), m.Detector(EventKind.SPIKE, "a", 1, step=50, data_index=49), cluster, 1.0
    ).job
    rid = job.pending_rollback.request_id
    # Written before the rollback took effect (old request epoch): tainted.
    before = m.step(job, m.CheckpointCommitted(1, 55, "/ck/55", request_epoch=rid - 1), cluster, 2.0)
    assert not before.job.checkpoints[-1].good
    # Written after the ranks handled the rollback (request epoch rid): clean again.
    job = m.step(before.job, m.RollbackDone(1, rid, 40), cluster, 3.0).job
    after = m.step(job, m.CheckpointCommitted(1, 60, "/ck/60", request_epoch=rid), cluster, 4.0)
    assert after.job.checkpoints[-1].good
    # And an unresolved alarm keeps tainting until something restores state from before its onset.
    job = m.step(
        after.job, m.Detector(EventKind.FINGERPRINT_MISMATCH, "a", 1, step=70, onset_step=60), cluster, 5.0
    ).job
    d = m.step(job, m.CheckpointCommitted(1, 72, "/ck/72", request_epoch=rid), cluster, 6.0)
    assert not d.job.checkpoints[-1].good


# ---------------------------------------------------------------------------------------------
# Bounded recoveries: the first-step deadline and the escalation ladder


def test_the_first_step_deadline_is_derived_from_the_jobs_own_launches() -> None:
    cluster = nodes("a", "b")
    job = running(cluster, now=100.0)
    assert job.launched == 100.0
    assert m.first_step_deadline_s(job) == m.COLD_START_S  # nothing measured yet
    job = m.step(job, m.Progress("a", 1, 1), cluster, 102.0).job
    assert job.launched is None and job.first_step_s == (2.0,)
    assert m.first_step_deadline_s(job) == m.FIRST_STEP_FLOOR_S  # 4 x 2 s is under the floor
    job = dataclasses.replace(job, first_step_s=(2.0, 12.5))
    assert m.first_step_deadline_s(job) == m.FIRST_STEP_FACTOR * 12.5
    fixed = dataclasses.replace(job, spec=dataclasses.replace(SPEC, first_step_timeout_s=7))
    assert m.first_step_deadline_s(fixed) == 7


def _crashed_and_launched(cluster) -> m.Job:
    job = running(cluster)
    job = m.step(job, m.Progress("a", 1, 1), cluster, 2.0).job  # first launch took 2 s: deadline 30 s
    d = m.step(job, m.WorkerFailed("b", 1, rank=1, kind="crash", detail="signal SIGKILL"), cluster, 10.0)
    assert d.actions[0].resume == Resume.PEER and not d.actions[0].fresh_processes
    return d.job


def test_a_generation_that_never_steps_escalates_one_rung_at_a_time_then_fails_naming_the_plans() -> None:
    cluster = nodes("a", "b", spares=("s",))
    job = _crashed_and_launched(cluster)
    job = m.step(job, m.RankJoined("a", 2, 0), cluster, 10.5).job  # b's rank never joins
    assert m.step(job, m.Tick(), cluster, 10.0 + 29.9).actions == ()

    # Rung 1: never the same plan again: new processes restored from the last good checkpoint.
    d = m.step(job, m.Tick(), cluster, 10.0 + 30.1)
    assert d.job.generation == 3 and d.job.rung == 1 and d.job.state is m.JobState.RECOVERING
    (start,) = d.actions
    assert start.fresh_processes and start.resume != Resume.PEER
    assert (
        "generation 2 did not complete its first step within 30s of its launch (b never joined)" in d.reason
    )
    assert "escalating to fresh processes" in d.reason and d.job.restarts_by_reason[-1] == (
        RestartReason.FIRST_STEP_TIMEOUT,
        1,
    )

    # Rung 2: the node whose rank did not join is left out (a spare takes its place) and cordoned.
    job = m.step(d.job, m.RankJoined("a", 3, 0), cluster, 41.0).job
    d = m.step(job, m.Tick(), cluster, 40.1 + 30.1)
    cordon, start = d.actions
    assert cordon == m.Cordon("b", "its rank did not join generation 3 within 30s")
    assert start.members == ("a", "s") and start.fresh_processes and d.job.generation == 4
    assert "leaving out b" in d.reason

    # Rung 3: every rank joined and still no step: nothing stronger is left, the job fails and says
    # what it tried.
    job = m.step(d.job, m.RankJoined("a", 4, 0), cluster, 71.0).job
    job = m.step(job, m.RankJoined("s", 4, 1), cluster, 71.0).job
    d = m.step(job, m.Tick(), cluster, 70.2 + 30.1)
    assert d.job.state is m.JobState.FAILED
    assert "(every rank joined)" in d.reason and "giving up after trying" in d.reason
    for plan in (
        "generation 2 on a, b: survivors keep",
        "generation 3 on a, b: new processes",
        "generation 4 on a, s",
    ):
        assert plan in d.reason, d.reason


def test_when_every_rank_joined_the_ladder_skips_leaving_out_nodes() -> None:
    cluster = nodes("a", "b")
    job = _crashed_and_launched(cluster)
    d = m.step(job, m.Tick(), cluster, 41.0)  # rung 1 (nobody joined)
    job = m.step(d.job, m.RankJoined("a", 3, 0), cluster, 42.0).job
    job = m.step(job, m.RankJoined("b", 3, 1), cluster, 42.0).job
    d = m.step(job, m.Tick(), cluster, 41.0 + 30.1)
    assert d.job.state is m.JobState.FAILED and "(every rank joined)" in d.reason


def test_a_recovery_that_works_resets_the_ladder_and_a_fault_during_an_escalated_one_keeps_its_rung() -> None:
    cluster = nodes("a", "b")
    job = _crashed_and_launched(cluster)
    job = m.step(job, m.Tick(), cluster, 41.0).job  # rung 1, generation 3
    # A second fault during the escalated recovery: still new processes, never back to in place.
    d = m.step(job, m.WorkerFailed("a", 3, rank=0, kind="crash", detail="standby died"), cluster, 43.0)
    assert d.job.rung == 1 and d.actions[0].fresh_processes and d.actions[0].resume != Resume.PEER
    # Generation 4 steps: the recovery worked; the next fault starts from the bottom rung again.
    job = m.step(d.job, m.Progress("a", 4, 2), cluster, 45.0).job
    assert job.rung == 0 and job.tried == () and job.launched is None and job.first_step_s[-1] == 2.0
    d = m.step(job, m.WorkerFailed("b", 4, rank=1, kind="crash"), cluster, 50.0)
    assert d.actions[0].resume == Resume.PEER and not d.actions[0].fresh_processes


def test_no_escalation_while_waiting_for_capacity_or_once_the_generation_stepped() -> None:
    cluster = nodes("a", "b")
    job = _crashed_and_launched(cluster)
    stepped = m.step(job, m.Progress("a", 2, 2), cluster, 12.0).job
    assert m.step(stepped, m.Tick(), cluster, 1000.0).actions == ()
    waiting = dataclasses.replace(job, awaiting_capacity=True, spec=dataclasses.replace(SPEC, min_nodes=2))
    d = m.step(waiting, m.Tick(), nodes("a", "b", b={"ready": False}), 1000.0)
    assert d.job.rung == 0 and d.job.awaiting_capacity and d.actions == ()


def test_the_ladder_survives_a_coordinator_restart() -> None:
    cluster = nodes("a", "b")
    job = m.step(_crashed_and_launched(cluster), m.Tick(), cluster, 41.0).job
    back = m.from_json(m.to_json(job), job.spec)
    assert back == job


def test_an_unnamed_audit_rollback_that_cannot_be_applied_restarts_for_reason_audit() -> None:
    """Every restart is counted under a RestartReason: an audit mismatch without a named rank rolls back
    in place (no bisection); without a snapshot that old, the restart is counted as ``audit``."""
    cluster = nodes("a", "b")
    spec = dataclasses.replace(SPEC, bisect_on_suspect=False)
    job = running(cluster, spec)
    d = m.step(job, m.Detector(EventKind.AUDIT_MISMATCH, "a", 1, step=45, onset_step=25), cluster, 1.0)
    (send,) = [a for a in d.actions if isinstance(a, m.SendRollback)]
    assert d.job.pending_rollback.purpose is RestartReason.AUDIT
    d = m.step(d.job, m.RollbackUnavailable(1, send.request_id), cluster, 2.0)
    assert d.job.generation == 2 and d.job.restarts_by_reason == (("audit", 1),)
    # A pending rollback saved with the old purpose reads back as the restart reason.
    saved = m.to_json(job) | {
        "pending_rollback": {"request_id": 3, "to_step": 25, "since": 1.0, "purpose": "audit_mismatch"}
    }
    assert m.from_json(saved, spec).pending_rollback.purpose is RestartReason.AUDIT


# ---------------------------------------------------------------------------------------------
# Stragglers: recorded, or replaced by a spare under straggler_policy = "replace"

SLOW = "its own compute took 1.52x its peers' median over 20 steps (0.1510s against 0.0993s)"


def test_a_straggler_is_recorded_and_stays_under_the_default_policy() -> None:
    cluster = nodes("a", "b", spares=("s",))
    job = running(cluster)
    d = m.step(job, m.StragglerSeen("b", 1, step=40, rank=1, detail=SLOW), cluster, 5.0)
    assert d.actions == () and d.job.generation == 1 and d.job.state is m.JobState.RUNNING
    assert d.reason == f"rank 1 on b is a straggler at step 40: {SLOW}; straggler_policy report: it stays"
    d = m.step(
        d.job, m.StragglerSeen("b", 1, step=60, rank=1, detail="ratio 1.0", cleared=True), cluster, 6.0
    )
    assert d.actions == () and "rank 1 on b is no longer a straggler at step 60" in d.reason


def test_under_the_replace_policy_a_ready_spare_takes_the_stragglers_place_and_heals_from_the_survivors() -> (
    None
):
    spec = dataclasses.replace(SPEC, straggler_policy="replace")
    cluster = nodes("a", "b", spares=("s",))
    d = m.step(running(cluster, spec), m.StragglerSeen("b", 1, step=40, rank=1, detail=SLOW), cluster, 5.0)
    (start,) = d.actions
    assert (
        isinstance(start, m.StartGeneration) and start.members == ("a", "s") and start.resume == Resume.PEER
    )
    assert d.job.generation == 2 and dict(d.job.restarts_by_reason)[RestartReason.STRAGGLER] == 1
    assert "straggler_policy replace: a spare takes b's place" in d.reason
    # no spare ready: reported, and the straggler stays
    d = m.step(running(nodes("a", "b"), spec), m.StragglerSeen("b", 1, 40, 1, SLOW), nodes("a", "b"), 5.0)
    assert d.actions == () and d.job.generation == 1 and "no spare node is ready: it stays" in d.reason


def test_a_straggler_report_during_a_recovery_or_from_an_old_generation_changes_nothing() -> None:
    spec = dataclasses.replace(SPEC, straggler_policy="replace")
    cluster = nodes("a", "b", spares=("s",))
    job = running(cluster, spec)
    recovering = m.step(
        job, m.WorkerFailed("a", 1, rank=0, kind="crash", detail="signal SIGKILL"), cluster, 1.0
    ).job
    assert m.step(recovering, m.StragglerSeen("b", 2, 40, 1, SLOW), cluster, 2.0) == m.Decision(recovering)
    assert m.step(job, m.StragglerSeen("b", 0, 40, 1, SLOW), cluster, 2.0) == m.Decision(job)


def test_a_job_spec_names_its_straggler_policy() -> None:
    with pytest.raises(ValueError, match="straggler_policy: expected 'report' or 'replace', got 'evict'"):
        dataclasses.replace(SPEC, straggler_policy="evict")
