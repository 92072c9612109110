"""Property-based tests of the job state machine (coordinator/machine.py).

A Hypothesis rule-based state machine drives a job through random sequences of every event the
controller can deliver (when it ends, and has absorbed a few more, the next job is submitted to the
same cluster), over a small cluster whose nodes get lost, come back, turn unhealthy, go silent, are
cordoned, drained and uncordoned. Event arguments come from the job's current state (its members and
ranks, its generation and sometimes an older one, steps near where its ranks train, its pending
rollback), time only moves forward, and each decision's job replaces the job, as the controller
applies it (a Cordon action cordons the node in the cluster view). Each event is delivered where the
controller would deliver it (see the callers of Controller._apply). After every decision:

1. the generation never decreases, and a StartGeneration names a generation above the previous one;
2. a StartGeneration never names a checkpoint the job records as bad, nor one after its own
   rollback target, and its rollback target is at or before every target in flight (restore_to, a
   pending rollback); it never names one after the onset of an alarm that is still open
   (unresolved) or raised by that decision, and while an alarm is open every checkpoint after its
   onset is bad (_raise_alarm, Alarm.taints); a checkpoint marked bad stays bad; a cancel asks for a
   final checkpoint only of clean state;
3. a decision that changes the job's state, generation, members, restarts, pending rollback, alarms
   or checkpoints, or that asks for any action, has a reason;
4. a terminal job absorbs every event: same job, no actions, no reason;
5. the restart guards hold: ``restarts`` never passes ``max_restarts`` (the refused restart is
   counted on the failed job only), nor ``restarts_without_progress`` its cap, and every generation
   after the first was paid for by a counted restart;
6. job states are JobState members, compared by identity or by their string value.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator import machine as m
from coordinator.jobspec import JobSpec
from coordinator.membership import NodeView
from stanchion.vocab import DETECTORS, EventKind, ExitReason

PRIMARIES = ("a", "b", "c")
SPARES = ("s1", "s2")
STATE_NAMES = frozenset(s.value for s in m.JobState)
# Time between two events: most arrive together; some ticks cross the peer-wait grace, the
# reconcile grace, a first-step deadline (30 s floor, 300 s cold start) or a rendezvous timeout.
TICK_GAPS = st.sampled_from([0.5, 0.5, 2.5, 2.5, 11.0, 35.0, 320.0, 700.0])
EVENT_GAP = 0.25
LATE = 25  # decisions before a job may be cancelled or finish: most runs explore first
PROBES = 3  # events a terminal job absorbs before the next job is submitted (ticks go on)
DETECTOR_KINDS = sorted(DETECTORS)  # sampled_from needs an order


@st.composite
def specs(draw: st.DrawFn) -> JobSpec:
    nodes = draw(st.sampled_from([2, 3]), label="nodes")
    wpn = draw(st.sampled_from([1, 2]), label="workers_per_node") if nodes == 2 else 1
    # 2 nodes: every size down to 1 divides the global batch. 3 nodes: 2 does not (the job waits).
    gbs = 16 * wpn if nodes == 2 else 24
    return JobSpec(
        name="prop",
        nodes=nodes,
        min_nodes=draw(st.integers(1, nodes), label="min_nodes"),
        workers_per_node=wpn,
        max_restarts=draw(st.sampled_from([10, 10, 5, 20, 2, 0]), label="max_restarts"),
        max_restarts_without_progress=draw(
            st.sampled_from([3, 2, 6, 1]), label="max_restarts_without_progress"
        ),
        rendezvous_timeout_s=draw(st.sampled_from([60.0, 600.0]), label="rendezvous_timeout_s"),
        first_step_timeout_s=draw(st.sampled_from([0.0, 20.0]), label="first_step_timeout_s"),
        skip_batches=4,
        hardware_horizon_steps=draw(st.sampled_from([5, 500]), label="hardware_horizon_steps"),
        bisect_on_suspect=draw(st.booleans(), label="bisect_on_suspect"),
        trainer={"preset": "tiny", "data": {"path": "d", "global_batch_size": gbs, "micro_batch_size": 8}},
    )


def is_open(a: m.Alarm) -> bool:
    return a.resolved_epoch < 0 and a.resolved_generation < 0


def weighted(favoured: list, others: list, weight: int = 3) -> st.SearchStrategy:
    """Mostly one of ``favoured`` (listed first, so examples shrink towards them), sometimes another."""
    return st.sampled_from(list(favoured) * weight + [x for x in others if x not in favoured])


class JobLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.job: m.Job = m.new_job("j0", JobSpec(name="prop"), 0.0)
        self.jobs = 0
        self.nodes: dict[str, NodeView] = {}
        self.now = 0.0
        self.trail: list[str] = []  # the decisions so far, for assertion messages
        self.relaunches = 0  # StartGeneration actions after the first launch
        self.terminal: m.Job | None = None  # the job as it first reached a terminal state
        self.absorbed = 0  # events delivered to it since
        self.since = 0  # decisions before this job was submitted
        self.epoch = 0  # the newest rollback request the ranks handled (their request_epoch)
        self.base = 0  # the step the ranks of the current generation trained up to

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def view(self) -> dict[str, NodeView]:
        """The cluster as ClusterView shows it: the members of an active job are busy with it."""
        busy = set(self.job.members) if self.job.state in m.ACTIVE else set()
        return {
            n: dataclasses.replace(v, busy_with=self.job.job_id if n in busy else "")
            for n, v in self.nodes.items()
        }

    def set_node(self, node_id: str, **flags) -> None:
        self.nodes[node_id] = dataclasses.replace(self.nodes[node_id], **flags)

    def deliver(self, event, gap: float = EVENT_GAP) -> m.Decision:
        self.now += gap
        old = self.job
        d = m.step(old, event, self.view(), self.now)
        self.trail.append(
            f"t={self.now:.2f} {event!r} -> {d.job.state.value} gen {d.job.generation}: {d.reason or '-'}"
        )
        self.check_generation(old, event, d)
        self.check_checkpoints(old, event, d)
        self.check_reason(old, event, d)
        self.check_terminal_absorbs(old, event, d)
        self.check_restarts(old, event, d)
        self.check_state_names(old, event, d)
        self.job = d.job
        for a in d.actions:  # what the controller does with the actions that change the cluster view
            if isinstance(a, m.Cordon) and a.node_id in self.nodes:
                self.set_node(a.node_id, cordoned=True)
            if isinstance(a, m.StartGeneration):
                self.base = self.start_step(old, a)
        if self.job.state in m.TERMINAL and self.terminal is None:
            self.terminal = self.job
        self.absorbed += old.state in m.TERMINAL
        return d

    def start_job(self, spec: JobSpec) -> None:
        """Submit a job (the controller creates it, then applies Submitted)."""
        self.jobs += 1
        self.job = m.new_job(f"j{self.jobs}", spec, self.now)
        self.relaunches = self.absorbed = self.epoch = self.base = 0
        self.terminal = None
        self.since = len(self.trail)
        self.deliver(m.Submitted(), gap=0.0)

    def start_step(self, old: m.Job, a: m.StartGeneration) -> int:
        """Where the ranks of a new generation start training from."""
        if a.resume == "peer" and a.rollback_to < 0:
            return max(old.step, self.base)
        if a.resume == "fresh":
            return 0
        ck = next((c for c in self.job.checkpoints if c.path == a.checkpoint), None)
        if ck is None and not a.checkpoint:
            ck = self.job.last_good
        step = ck.step if ck else 0
        return min(step, a.rollback_to) if a.rollback_to >= 0 else step

    def where(self, old: m.Job, event) -> str:
        recent = "\n  ".join(self.trail[-8:])
        return f"on {event!r} (job was {old.state.value}, generation {old.generation}); recent:\n  {recent}"

    # Plausible arguments ----------------------------------------------------------------------

    def accepting(self) -> bool:
        """Events go to a live job, and to a terminal one a few times (it must absorb them)."""
        return self.job.state not in m.TERMINAL or self.absorbed < PROBES

    def launched_once(self) -> bool:
        return self.accepting() and self.job.generation >= 1 and bool(self.job.members)

    def active(self) -> bool:
        return self.job.state in m.ACTIVE

    def late(self) -> bool:
        return len(self.trail) - self.since >= LATE

    def draw_generation(self, data: st.DataObject) -> int:
        g = self.job.generation
        stale = [x for x in (g - 1, g - 2) if x >= 1]
        return data.draw(weighted([g], stale, weight=5), label="generation")

    def draw_member(self, data: st.DataObject) -> str:
        return data.draw(weighted(list(self.job.members), list(self.nodes)), label="node")

    def draw_rank(self, data: st.DataObject) -> int:
        world = max(self.job.world_size, 1)
        return data.draw(st.integers(0, world - 1), label="rank")

    def draw_step(self, data: st.DataObject, label: str, ahead: int = 6) -> int:
        """A step the current generation's ranks may report: from where they train, a little ahead."""
        return data.draw(st.integers(max(self.base, 1), max(self.base, 1) + ahead), label=label)

    # -----------------------------------------------------------------------------------------
    # Rules

    @initialize(
        spec=specs(),
        spares=st.integers(0, len(SPARES)),
        third=st.booleans(),
        absent=st.sampled_from([None, None, None, "b"]),
    )
    def submit(self, spec: JobSpec, spares: int, third: bool, absent: str | None) -> None:
        primaries = PRIMARIES[: spec.nodes + (1 if third else 0)]
        self.nodes = {n: NodeView(n, store_port=1000 + i) for i, n in enumerate(primaries)}
        self.nodes.update({n: NodeView(n, spare=True) for n in SPARES[:spares]})
        if absent:  # a node that has not registered yet: the rendezvous waits, or times out
            self.set_node(absent, ready=False)
        self.start_job(spec)

    @precondition(lambda self: self.job.state in m.TERMINAL and self.absorbed >= 1)
    @rule(spec=specs())
    def submit_next(self, spec: JobSpec) -> None:
        """The job ended: the next one is submitted to the same cluster."""
        self.start_job(spec)

    @rule(gap=TICK_GAPS)
    def tick(self, gap: float) -> None:
        self.deliver(m.Tick(), gap)

    @precondition(launched_once)
    @rule(data=st.data())
    def worker_failed(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        kind = data.draw(
            st.sampled_from([ExitReason.CRASH] * 12 + [ExitReason.HANG] * 6 + [ExitReason.CONFIG]),
            label="kind",
        )
        rank = data.draw(st.sampled_from([self.draw_rank(data), -1]), label="rank or node")
        self.deliver(m.WorkerFailed(node, self.draw_generation(data), rank, kind, "property test"))

    @precondition(launched_once)
    @rule(data=st.data())
    def peer_waiting(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        self.deliver(m.PeerWaiting(node, self.draw_generation(data), self.draw_step(data, "step", 2)))

    @precondition(active)
    @rule(data=st.data())
    def node_lost(self, data: st.DataObject) -> None:
        """The controller declares a node lost once, when its heartbeats stop."""
        node = self.draw_member(data)
        if not self.nodes[node].ready:
            return
        self.set_node(node, ready=False, heartbeat_age_s=10.0)
        if node in self.job.members:  # Controller.active_job_for
            self.deliver(m.NodeLost(node, "last heartbeat 10.0s ago"))

    @precondition(accepting)
    @rule(data=st.data())
    def node_registers(self, data: st.DataObject) -> None:
        """A node (re)registers: back after being lost, or an agent restarted under a live member."""
        lost = sorted(n for n, v in self.nodes.items() if not v.ready)
        node = data.draw(weighted(lost, sorted(self.nodes)), label="node")
        was_lost = not self.nodes[node].ready
        self.set_node(node, ready=True, heartbeat_age_s=0.0)
        if not was_lost and self.job.state in m.ACTIVE and node in self.job.members:
            self.deliver(
                m.WorkerFailed(
                    node, self.job.generation, -1, ExitReason.CRASH, "its agent restarted, and its ranks"
                )
            )
        if self.job.state in (m.JobState.PENDING, m.JobState.RECOVERING):
            self.deliver(m.NodeChanged(node))

    @precondition(accepting)
    @rule(data=st.data())
    def node_health(self, data: st.DataObject) -> None:
        """A heartbeat changes a node's health verdict or its age (no event of its own)."""
        sick = sorted(n for n, v in self.nodes.items() if not v.healthy or v.heartbeat_age_s)
        node = data.draw(weighted(sick, sorted(self.nodes)), label="node")
        healthy = data.draw(st.sampled_from([True, True, False]), label="healthy")
        silent = data.draw(st.sampled_from([False, False, True]), label="silent")
        self.set_node(node, healthy=healthy, heartbeat_age_s=m.QUIET_S + 0.5 if silent else 0.0)

    @precondition(accepting)
    @rule(data=st.data())
    def cordon_or_uncordon(self, data: st.DataObject) -> None:
        """An operator uncordons a node (a NodeChanged for jobs that wait) or cordons one (no event:
        the next generation leaves it out)."""
        if data.draw(st.sampled_from([True, True, False]), label="uncordon"):
            cordoned = sorted(n for n, v in self.nodes.items() if v.cordoned)
            node = data.draw(weighted(cordoned, sorted(self.nodes)), label="node")
            self.set_node(node, cordoned=False, draining=False)
            if self.job.state in (m.JobState.PENDING, m.JobState.RECOVERING):
                self.deliver(m.NodeChanged(node))
        else:
            self.set_node(data.draw(st.sampled_from(sorted(self.nodes)), label="node"), cordoned=True)

    @precondition(active)
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        self.set_node(node, cordoned=True, draining=True)
        if node in self.job.members:
            self.deliver(m.Drain(node, "maintenance"))

    @precondition(launched_once)
    @rule(data=st.data())
    def progress(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        # From where the ranks train, a few steps or many (heartbeats far apart), or just past the
        # step the job had reached (a recovery catching up).
        ahead = data.draw(st.sampled_from([1, 4, 12, 30, None]), label="steps ahead")
        step = max(self.base, 1) + ahead if ahead is not None else max(self.job.step + 1, self.base)
        gen = self.job.generation  # the controller relays progress of the job's generation only
        self.base = max(self.base, step)
        if data.draw(st.sampled_from([True, False]), label="checkpointed there"):
            # The heartbeat's events are relayed before its progress (Controller._do_heartbeat).
            self.deliver(
                m.CheckpointCommitted(gen, step, f"/ck/{step}", f"fp{step}", request_epoch=self.epoch)
            )
        self.deliver(m.Progress(node, gen, step))

    @precondition(launched_once)
    @rule(data=st.data())
    def rank_joined(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        self.deliver(m.RankJoined(node, self.draw_generation(data), self.draw_rank(data)))

    @precondition(launched_once)
    @rule(data=st.data())
    def detector(self, data: st.DataObject) -> None:
        job = self.job
        kind = data.draw(st.sampled_from(DETECTOR_KINDS), label="kind")
        gen = self.draw_generation(data)
        if gen == job.generation:
            step = self.draw_step(data, "step", 4)
        else:  # about the older generation's timeline
            step = data.draw(st.integers(max(job.step - 15, 1), max(job.step, 1) + 1), label="old step")
        earlier = [a.data_index for a in job.anomalies[-3:]]
        data_index = data.draw(st.sampled_from([step - 1, *earlier, step + 7]), label="data_index")
        ranks = range(max(job.world_size, 1))
        suspects = data.draw(
            st.sampled_from([(ranks[-1],), (), (ranks[0],), tuple(ranks[:2])]), label="suspect_ranks"
        )
        # The onset: right before the detection, a little or a long way back, or (where it matters
        # most) just before one of the checkpoints the job holds, so that the window straddles it.
        straddle = sorted({c.step - 1 for c in job.checkpoints[-3:] if 0 < c.step <= step})
        if kind in (EventKind.FINGERPRINT_MISMATCH, EventKind.AUDIT_MISMATCH):
            onsets = [step - 1, *straddle, step - 3, step - 8, step - 20, -1]
        else:
            onsets = [-1, -1, *straddle, step - 2]
        onset = data.draw(st.sampled_from(onsets), label="onset_step")
        onset = max(onset, 0) if onset != -1 else -1
        self.deliver(m.Detector(kind, self.draw_member(data), gen, step, data_index, suspects, onset, "prop"))

    @precondition(launched_once)
    @rule(data=st.data())
    def checkpoint_committed(self, data: st.DataObject) -> None:
        gen = self.draw_generation(data)
        if gen == self.job.generation:
            step = data.draw(st.integers(max(self.base - 8, 1), max(self.base, 1) + 3), label="step")
        else:
            step = data.draw(st.integers(max(self.job.step - 10, 1), max(self.job.step, 1)), label="old step")
        verified = data.draw(st.sampled_from([True, True, True, False]), label="verified")
        agree = data.draw(st.sampled_from([True, True, True, False]), label="replicas_agree")
        epoch = data.draw(st.sampled_from(sorted({self.epoch, 0})), label="request_epoch")
        self.deliver(m.CheckpointCommitted(gen, step, f"/ck/{step}", f"fp{step}", verified, agree, "", epoch))

    @precondition(lambda self: self.accepting() and self.job.pending_rollback is not None)
    @rule(data=st.data())
    def rollback_done(self, data: st.DataObject) -> None:
        p = self.job.pending_rollback
        rid = data.draw(st.sampled_from([p.request_id] * 3 + list(range(1, p.request_id))), label="request")
        to = data.draw(st.integers(max(p.to_step - 5, 0), p.to_step), label="restored step")
        d = self.deliver(m.RollbackDone(self.job.generation, rid, to))
        if d.job.pending_rollback is None:  # the ranks handled it: they train on from its step
            self.epoch, self.base = max(self.epoch, rid), to

    @precondition(lambda self: self.accepting() and self.job.pending_rollback is not None)
    @rule(data=st.data())
    def rollback_unavailable(self, data: st.DataObject) -> None:
        p = self.job.pending_rollback
        rid = data.draw(st.sampled_from([p.request_id] * 3 + list(range(1, p.request_id))), label="request")
        self.deliver(m.RollbackUnavailable(self.job.generation, rid))

    @precondition(lambda self: self.launched_once() and self.late())
    @rule(data=st.data())
    def rank_finished(self, data: st.DataObject) -> None:
        # Ranks finish together: deliver every rank's event but the ones the draw leaves out.
        if not data.draw(st.sampled_from([False, False, True]), label="the run reached its last step"):
            return
        gen = self.draw_generation(data)
        ranks = range(max(self.job.world_size, 1))
        missing = data.draw(st.sets(st.sampled_from(list(ranks)), max_size=1), label="ranks not done yet")
        for r in ranks:
            if r not in missing:
                self.deliver(m.RankFinished(gen, r, "fp-final", 3.5))

    @precondition(lambda self: self.accepting() and self.late())
    @rule(really=st.sampled_from([False, False, False, True]))
    def cancel(self, really: bool) -> None:
        if really:  # rarely, and late: a cancel ends the rest of the run
            self.deliver(m.Cancel())

    @precondition(active)  # Controller.load applies it to the active jobs
    @rule(down=st.sampled_from([1.0, 5.0, 40.0]))
    def coordinator_restarted(self, down: float) -> None:
        for n in self.nodes:
            if self.nodes[n].ready:  # Controller.load: every node's last heartbeat is "now"
                self.set_node(n, heartbeat_age_s=0.0)
        self.deliver(m.CoordinatorRestarted(), gap=down)

    @precondition(lambda self: self.accepting() and self.job.reconcile_until is not None)
    @rule(data=st.data())
    def reported(self, data: st.DataObject) -> None:
        node = self.draw_member(data)
        training = data.draw(st.sampled_from([True, True, False]), label="training")
        self.deliver(m.Reported(node, self.draw_generation(data), training))

    @precondition(lambda self: self.job.state is m.JobState.BISECTING)
    @rule(data=st.data())
    def bisection_done(self, data: st.DataObject) -> None:
        faulty = data.draw(
            st.lists(st.sampled_from(list(self.job.members)), max_size=1, unique=True).map(tuple),
            label="faulty",
        )
        for n in faulty:  # the bisector cordons what it names before it tells the job
            self.set_node(n, cordoned=True)
        self.deliver(m.BisectionDone("bisect-1", faulty, "found" if faulty else "nothing found"))

    # -----------------------------------------------------------------------------------------
    # Checked on every decision

    def check_generation(self, old: m.Job, event, d: m.Decision) -> None:
        """1. The generation never decreases; a StartGeneration names a higher one."""
        new = d.job
        assert new.generation >= old.generation, (
            f"generation went back from {old.generation} to {new.generation} {self.where(old, event)}"
        )
        starts = [a for a in d.actions if isinstance(a, m.StartGeneration)]
        assert len(starts) <= 1, f"several StartGeneration actions {starts} {self.where(old, event)}"
        for s in starts:
            assert s.generation > old.generation, (
                f"StartGeneration({s.generation}) does not go past generation {old.generation} "
                f"{self.where(old, event)}"
            )
            assert s.generation == new.generation, (
                f"StartGeneration({s.generation}) but the job records generation {new.generation} "
                f"{self.where(old, event)}"
            )
        if not starts:
            assert new.generation == old.generation, (
                f"generation {old.generation} -> {new.generation} without a StartGeneration "
                f"{self.where(old, event)}"
            )

    def check_checkpoints(self, old: m.Job, event, d: m.Decision) -> None:
        """2. Never resume from a bad checkpoint, nor one past a rollback target or an open onset."""
        new = d.job
        bad_before = {(c.step, c.path) for c in old.checkpoints if not c.good}
        bad_after = {(c.step, c.path) for c in new.checkpoints if not c.good}
        assert bad_before <= bad_after, (
            f"checkpoints {sorted(bad_before - bad_after)} were bad and are good again {self.where(old, event)}"
        )
        # The alarms whose onset window may still be in the state: open before this decision, or
        # raised by it (_raise_alarm marks every checkpoint after the onset bad; Alarm.taints keeps
        # later ones bad until a response restores state from before the onset).
        onsets = [a.onset_step for a in old.alarms if is_open(a)]
        onsets += [a.onset_step for a in new.alarms[len(old.alarms) :]]
        # Rollback targets in flight bind every later restart, the lowest winning (_restart).
        in_flight = [old.restore_to, old.pending_rollback.to_step if old.pending_rollback else -1]
        in_flight = [t for t in in_flight if t >= 0]
        records = {c.path: c for c in new.checkpoints}
        for s in (a for a in d.actions if isinstance(a, m.StartGeneration)):
            if in_flight:
                assert 0 <= s.rollback_to <= min(in_flight), (
                    f"{s} ignores the rollback target {min(in_flight)} in flight {self.where(old, event)}"
                )
            if not s.checkpoint:
                continue
            rec = records.get(s.checkpoint)
            assert rec is not None, f"{s} names a checkpoint the job never recorded {self.where(old, event)}"
            assert rec.good and (rec.step, rec.path) not in bad_before, (
                f"{s} (resume {s.resume}) names checkpoint {rec} that the job records as bad "
                f"{self.where(old, event)}"
            )
            if s.rollback_to >= 0:
                assert rec.step <= s.rollback_to, (
                    f"{s} names a checkpoint after its own rollback target {self.where(old, event)}"
                )
            for onset in onsets:
                assert rec.step <= onset, (
                    f"{s} names checkpoint step {rec.step}, after the onset {onset} of an unresolved alarm "
                    f"{self.where(old, event)}"
                )
        # on_cancel: a final checkpoint only of clean state (a cancelled job records no later
        # checkpoint event, so one of steps about to be discarded could never be marked bad).
        for stop in (a for a in d.actions if isinstance(a, m.StopWorkers) and a.checkpoint):
            assert old.pending_rollback is None and old.restore_to < 0 and not onsets, (
                f"{stop} asks for a final checkpoint of state a rollback target or an open alarm "
                f"discards {self.where(old, event)}"
            )

    def check_reason(self, old: m.Job, event, d: m.Decision) -> None:
        """3. A decision that changes the job's state, generation or members (or anything the
        controller records or acts on) says why: the module's "a decision with an empty reason
        changed nothing"."""
        new = d.job
        changed = [
            what
            for what, differs in (
                ("state", new.state is not old.state),
                ("generation", new.generation != old.generation),
                ("members", new.members != old.members),
                ("actions", bool(d.actions)),
                ("restarts", new.restarts != old.restarts),
                ("pending rollback", new.pending_rollback != old.pending_rollback),
                ("alarms", new.alarms != old.alarms),
                ("checkpoints", new.checkpoints != old.checkpoints),
            )
            if differs
        ]
        assert d.reason or not changed, (
            f"a decision changed {', '.join(changed)} without a reason {self.where(old, event)}"
        )

    def check_terminal_absorbs(self, old: m.Job, event, d: m.Decision) -> None:
        """4. A terminal job stays as it is: no actions, no reason."""
        if old.state not in m.TERMINAL:
            return
        assert d.job == old and d.actions == () and d.reason == "", (
            f"a {old.state.value} job changed: {d.actions} {d.reason!r} {self.where(old, event)}"
        )
        assert self.terminal is not None and d.job == self.terminal, (
            f"the job is not the one that reached {old.state.value} {self.where(old, event)}"
        )

    def check_restarts(self, old: m.Job, event, d: m.Decision) -> None:
        """5. The restart guards bound restarts (counted in _restart, the refused one included)."""
        new, spec = d.job, d.job.spec
        grew = new.restarts - old.restarts
        assert grew in (0, 1), f"restarts grew by {grew} in one decision {self.where(old, event)}"
        assert sum(n for _, n in new.restarts_by_reason) == new.restarts, (
            f"restarts_by_reason {new.restarts_by_reason} do not add up to {new.restarts}"
        )
        if new.state is m.JobState.FAILED:
            assert new.restarts <= spec.max_restarts + 1, (
                f"{new.restarts} restarts with max_restarts={spec.max_restarts} {self.where(old, event)}"
            )
        else:
            assert new.restarts <= spec.max_restarts, (
                f"{new.restarts} restarts went ahead with max_restarts={spec.max_restarts} "
                f"{self.where(old, event)}"
            )
            assert new.restarts_without_progress <= spec.max_restarts_without_progress, (
                f"{new.restarts_without_progress} restarts without progress went ahead with "
                f"max_restarts_without_progress={spec.max_restarts_without_progress} {self.where(old, event)}"
            )
        if old.state is not m.JobState.PENDING:
            self.relaunches += sum(isinstance(a, m.StartGeneration) for a in d.actions)
        assert self.relaunches <= min(new.restarts, spec.max_restarts), (
            f"{self.relaunches} generations launched after the first, with {new.restarts} restarts counted "
            f"and max_restarts={spec.max_restarts} {self.where(old, event)}"
        )

    def check_state_names(self, old: m.Job, event, d: m.Decision) -> None:
        """6. States are JobState members named by their string value, never integers."""
        state = d.job.state
        assert isinstance(state, m.JobState) and not isinstance(state.value, int), (
            f"state {state!r} is not a named JobState"
        )
        assert state.value in STATE_NAMES and m.JobState(state.value) is state
        assert d.job.state.value in {s.value for s in m.ALLOWED[old.state]} | {old.state.value}, (
            f"{old.state.value} -> {state.value} is not an allowed transition {self.where(old, event)}"
        )

    # -----------------------------------------------------------------------------------------
    # Checked on the job between steps

    @invariant()
    def open_alarms_taint_later_checkpoints(self) -> None:
        """2. Until an alarm is resolved, every checkpoint after its onset is bad (_raise_alarm marks
        the ones it finds, Alarm.taints the ones committed later)."""
        for a in self.job.alarms:
            if is_open(a):
                good = [c.step for c in self.job.checkpoints if c.good and c.step > a.onset_step]
                assert not good, (
                    f"checkpoints {good} are good although the unresolved alarm {a} reaches back to "
                    f"step {a.onset_step}; recent:\n  " + "\n  ".join(self.trail[-8:])
                )

    @invariant()
    def generation_matches_launches(self) -> None:
        if self.job.generation:
            assert self.job.generation == self.relaunches + 1, (
                f"generation {self.job.generation} after {self.relaunches} relaunches"
            )

    @invariant()
    def terminal_state_is_kept(self) -> None:
        if self.terminal is not None:
            assert self.job.state is self.terminal.state and self.job == self.terminal, (
                f"the job left {self.terminal.state.value}: now {self.job.state.value}"
            )

    @invariant()
    def state_is_named(self) -> None:
        state = self.job.state
        assert isinstance(state, m.JobState) and m.JobState(state.value) is state, f"state {state!r}"
        assert state.value in STATE_NAMES, f"state {state!r} is not one of {sorted(STATE_NAMES)}"


# A failure is shrunk for up to 5 minutes (Hypothesis' limit) before it is reported: past the suite's
# 300 s timeout, which would hide the minimal example.
pytestmark = pytest.mark.timeout(600)

TestJobLifecycle = JobLifecycle.TestCase
TestJobLifecycle.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
