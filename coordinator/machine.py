"""The job state machine: data plus one pure function.

    step(job, event, nodes, now) -> Decision(job, actions, reason)

A single controller applies events in order: it decides with this function, persists the decision,
then acts on it. Time enters only as ``now``; nothing here does I/O. Every decision that changes
anything carries a human-readable reason, which ``stanchion job explain`` prints; a decision with an
empty reason changed nothing.

Policies (the fault model in docs/architecture.md):
- a rank crash or hang: a new generation. Surviving ranks keep their state and the replacement
  heals from a live data-parallel peer; without one, everyone restores the last good checkpoint;
- node loss: replace it with a spare, else shrink data parallelism (when the global batch still
  divides), else wait for capacity;
- NaN or spike: roll back in place and replay the same data first (a transient fault leaves no
  trace); a recurrence at the same data means the data, so that window is skipped; a recurrence at
  other data suggests hardware, so the job bisects;
- fingerprint mismatch: a named rank's node is cordoned and replaced (the majority's state is right);
  with nobody named, roll back to the last snapshot whose fingerprints agreed (the ranks do it in
  place at their verdict and say so: then the decision only records it);
- audit mismatch: the named rank's node is cordoned and replaced, and the survivors roll back past
  the onset window first (every replica applied the corrupted average since then);
- restart-loop guards: a cap on restarts and on restarts without progress;
- every generation must complete its first step within a deadline derived from the job's own
  launches (``first_step_deadline_s``). One that does not escalates the recovery one rung, never
  repeating the plan that just failed: in place with healing from a peer (rung 0) -> fresh processes
  restored from the last good checkpoint (1) -> without the nodes whose ranks did not join, cordoned
  (2) -> fail, naming every plan tried (3). A later fault during the same recovery keeps the rung;
- responses that meet: a rollback target in flight (a pending request, a generation that has not
  stepped yet, a wait for capacity, a bisection) binds every later restart, the lowest winning;
  events of stopped or older ranks are stale, but their alarms are not (tests/unit/test_machine_pairs.py);
  nothing is decided while a coordinator restart is being reconciled.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.jobspec import JobSpec
from coordinator.membership import NodeView, choose_members, free_nodes
from stanchion.settings import ConfigError
from stanchion.vocab import (
    DETECTOR_RESTART_REASON,
    EXIT_RESTART_REASON,
    EventKind,
    ExitReason,
    RestartReason,
    Resume,
)


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    RECOVERING = "recovering"
    BISECTING = "bisecting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.RUNNING, JobState.RECOVERING, JobState.BISECTING})
ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PENDING, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.RUNNING,
            JobState.RECOVERING,
            JobState.BISECTING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.RECOVERING: frozenset(
        {
            JobState.RECOVERING,
            JobState.RUNNING,
            JobState.BISECTING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.BISECTING: frozenset(
        # A job whose ranks all finished before the bisection stopped them has succeeded.
        {JobState.BISECTING, JobState.RECOVERING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

PEER_WAIT_GRACE_S = 2.0  # a rank waiting on a vanished peer, with no failure reported, for this long
QUIET_S = 1.5  # ... and a member whose agent has been silent this long is taken for the vanished one
RECONCILE_GRACE_S = 10.0  # after a coordinator restart: time for agents to report in
PAST_GENERATIONS = 4  # superseded generations whose members are remembered for their late reports

# The first-step deadline of a generation. Before the job has completed any launch: COLD_START_S
# (spawning, building the model, the start-up determinism check). After: FIRST_STEP_FACTOR times the
# slowest launch-to-first-step it has seen, never under FIRST_STEP_FLOOR_S (scheduler noise on a
# loaded host). A spec's first_step_timeout_s replaces both.
COLD_START_S = 300.0
FIRST_STEP_FLOOR_S = 30.0
FIRST_STEP_FACTOR = 4.0
RUNGS = (
    "in place",
    "fresh processes from the last good checkpoint",
    "without the nodes that did not join",
    "fail",
)


# ---------------------------------------------------------------------------------------------
# Job data


@dataclass(frozen=True)
class Anomaly:
    kind: str
    step: int
    data_index: int
    outcome: str  # "replay", "skip", "hardware"
    generation: int


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: str
    good: bool
    reason: str
    fingerprint: str = ""


@dataclass(frozen=True)
class Alarm:
    kind: str
    onset_step: int  # the alarm may have started right after this step
    step: int
    generation: int = 0
    # How the timeline was cleaned: by rollback request `resolved_epoch` within `generation`, or by
    # generation `resolved_generation` starting from state at or before the onset. -1: not yet.
    resolved_epoch: int = -1
    resolved_generation: int = -1

    def taints(self, step: int, generation: int, request_epoch: int) -> bool:
        """Whether a checkpoint of this step, written in this generation and request epoch, may hold
        state from the alarm's onset window."""
        if step <= self.onset_step:
            return False
        if self.resolved_generation >= 0:
            return generation < self.resolved_generation
        if self.resolved_epoch >= 0:
            return generation < self.generation or (
                generation == self.generation and request_epoch < self.resolved_epoch
            )
        return True


@dataclass(frozen=True)
class PendingRollback:
    request_id: int
    to_step: int
    since: float
    purpose: RestartReason  # the restart's reason if the rollback cannot be applied in place
    skip: tuple[tuple[int, int], ...] = ()  # the windows the request skips (to send it again)


@dataclass(frozen=True)
class Job:
    job_id: str
    spec: JobSpec
    state: JobState = JobState.PENDING
    generation: int = 0
    members: tuple[str, ...] = ()
    created: float = 0.0
    state_since: float = 0.0
    step: int = 0
    restarts: int = 0
    restarts_by_reason: tuple[tuple[str, int], ...] = ()
    restarts_without_progress: int = 0
    step_at_last_restart: int = -1
    skip_windows: tuple[tuple[int, int], ...] = ()
    anomalies: tuple[Anomaly, ...] = ()
    alarms: tuple[Alarm, ...] = ()
    checkpoints: tuple[CheckpointRecord, ...] = ()
    next_request_id: int = 1
    pending_rollback: PendingRollback | None = None
    fault_time: float | None = (
        None  # when the fault the job recovers from happened (its agent's account, else when it was reported)
    )
    awaiting_capacity: bool = False
    waiting_since: float | None = None  # a rank reported its collective failed, nothing else yet
    waiting_step: int = 0  # ... at this step
    recoveries: tuple[float, ...] = ()
    finished_ranks: tuple[int, ...] = ()
    final_fingerprint: str = ""
    final_val_loss: float | None = None
    reason: str = ""
    reconcile_until: float | None = None
    reconciled: tuple[str, ...] = ()
    world_size: int = 0
    started: float | None = None  # when the first generation launched (goodput's wall clock starts)
    launched: float | None = None  # when the current generation launched; None once it completed a step
    first_step_s: tuple[float, ...] = ()  # launch -> first step of recent generations that worked
    joined_ranks: tuple[int, ...] = ()  # ranks of the current generation that formed its group
    rung: int = 0  # escalation rung of the recovery in progress (RUNGS)
    tried: tuple[str, ...] = ()  # the plans of the recovery in progress, for a final failure's reason
    # A rollback target no training generation has applied yet (a restart's rollback_to until its
    # generation steps; a bisection's or a capacity wait's until the next launch): any restart before
    # then restores from at or before it. -1: none.
    restore_to: int = -1
    # (generation, members) of the last few superseded generations: a late report of one of them
    # names ranks by that generation's members, not the current one's.
    past_members: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def last_good(self) -> CheckpointRecord | None:
        good = [c for c in self.checkpoints if c.good]
        return good[-1] if good else None

    def last_good_at_or_before(self, step: int) -> CheckpointRecord | None:
        good = [c for c in self.checkpoints if c.good and c.step <= step]
        return good[-1] if good else None

    def node_of_rank(self, rank: int, generation: int | None = None) -> str | None:
        """The node that ran ``rank`` in ``generation`` (default: the current one); None if unknown."""
        members = self.members
        if generation is not None and generation != self.generation:
            members = dict(self.past_members).get(generation, ())
        i = rank // self.spec.workers_per_node
        return members[i] if 0 <= i < len(members) else None

    def suspects(self, ranks: Iterable[int], generation: int) -> tuple[str, ...]:
        """The nodes that ran ``ranks`` in ``generation``, sorted."""
        return tuple(sorted({n for r in ranks if (n := self.node_of_rank(r, generation)) is not None}))


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Submitted:
    pass


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class WorkerFailed:
    node_id: str
    generation: int
    rank: int
    kind: ExitReason  # one of FAILED_EXITS: crash, hang or config
    detail: str = ""
    fault_age_s: float = 0.0  # how long before this report the fault happened, by its agent's account


@dataclass(frozen=True)
class PeerWaiting:
    node_id: str
    generation: int
    step: int = 0  # the waiting rank's last completed step


@dataclass(frozen=True)
class NodeLost:
    node_id: str
    detail: str = ""


@dataclass(frozen=True)
class NodeChanged:
    node_id: str


@dataclass(frozen=True)
class Progress:
    node_id: str
    generation: int
    step: int


@dataclass(frozen=True)
class RankJoined:
    """A rank reached the generation's rendezvous (its ``joining`` or ``started`` event)."""

    node_id: str
    generation: int
    rank: int


@dataclass(frozen=True)
class Detector:
    kind: EventKind  # one of DETECTORS
    node_id: str
    generation: int
    step: int
    data_index: int = -1
    suspect_ranks: tuple[int, ...] = ()
    onset_step: int = -1
    detail: str = ""
    # A fingerprint mismatch: the step of the snapshot every rank rolled back to in place at the
    # verdict (-1: they did not), so no rollback request is needed for it.
    rolls_back_to: int = -1


@dataclass(frozen=True)
class StragglerSeen:
    """A rank reported itself a straggler (its own compute slower than its peers'), or no longer one."""

    node_id: str
    generation: int
    step: int
    rank: int
    detail: str = ""
    cleared: bool = False


@dataclass(frozen=True)
class CheckpointCommitted:
    generation: int
    step: int
    path: str
    fingerprint: str = ""
    verified: bool = True
    replicas_agree: bool = True
    reason: str = ""
    request_epoch: int = 0  # rollback requests the writing ranks had handled


@dataclass(frozen=True)
class RollbackDone:
    generation: int
    request_id: int
    step: int


@dataclass(frozen=True)
class RollbackUnavailable:
    generation: int
    request_id: int


@dataclass(frozen=True)
class RankFinished:
    generation: int
    rank: int
    fingerprint: str = ""
    val_loss: float | None = None
    step: int = 0  # the step it finished at (progress reports may not have caught up with a fast job)


@dataclass(frozen=True)
class Cancel:
    reason: str = "cancelled by an operator"


@dataclass(frozen=True)
class Drain:
    node_id: str
    reason: str = ""


@dataclass(frozen=True)
class Reported:
    """After a coordinator restart: an agent reported its workers' generation."""

    node_id: str
    generation: int
    training: bool


@dataclass(frozen=True)
class BisectionDone:
    bisection_id: str
    faulty: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class CoordinatorRestarted:
    pass


Event = (
    Submitted
    | Tick
    | WorkerFailed
    | PeerWaiting
    | NodeLost
    | NodeChanged
    | Progress
    | RankJoined
    | Detector
    | StragglerSeen
    | CheckpointCommitted
    | RollbackDone
    | RollbackUnavailable
    | RankFinished
    | Cancel
    | Drain
    | Reported
    | BisectionDone
    | CoordinatorRestarted
)

# ---------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class StartGeneration:
    generation: int
    members: tuple[str, ...]
    previous_members: tuple[str, ...]
    resume: Resume
    checkpoint: str
    skip_windows: tuple[tuple[int, int], ...]
    rollback_to: int = -1
    fresh_processes: bool = False  # agents replace the ranks they have with new processes


@dataclass(frozen=True)
class StopWorkers:
    nodes: tuple[str, ...]
    reason: str
    checkpoint: bool = False


@dataclass(frozen=True)
class SendRollback:
    generation: int
    members: tuple[str, ...]
    request_id: int
    to_step: int
    skip: tuple[tuple[int, int], ...]
    reason: str


@dataclass(frozen=True)
class MarkCheckpoint:
    step: int
    path: str
    good: bool
    reason: str


@dataclass(frozen=True)
class Cordon:
    node_id: str
    reason: str


@dataclass(frozen=True)
class StartBisection:
    nodes: tuple[str, ...]
    reason: str


Action = StartGeneration | StopWorkers | SendRollback | MarkCheckpoint | Cordon | StartBisection


@dataclass(frozen=True)
class Decision:
    job: Job
    actions: tuple[Action, ...] = ()
    reason: str = ""  # empty: nothing changed


def describe(action: Action) -> str:
    """A one-line summary of an action (stored with the decision, printed by `job explain`)."""
    name = type(action).__name__
    fields = {f.name: getattr(action, f.name) for f in dataclasses.fields(action)}
    parts = ", ".join(f"{k}={v}" for k, v in fields.items() if v not in ((), "", None, -1))
    return f"{name}({parts})"


# ---------------------------------------------------------------------------------------------
# The transition function


def step(job: Job, event: Event, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state in TERMINAL:
        return Decision(job)
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"unknown event {type(event).__name__}")
    decision = handler(job, event, nodes, now)
    new = decision.job
    if new.state not in ALLOWED[job.state]:
        raise AssertionError(
            f"illegal transition {job.state.value} -> {new.state.value} on {type(event).__name__}"
        )
    if new.generation != job.generation and job.members:
        past = (*job.past_members, (job.generation, job.members))[-PAST_GENERATIONS:]
        new = dataclasses.replace(new, past_members=past)
    if new.state != job.state:
        new = dataclasses.replace(new, state_since=now)
    if decision.reason:
        new = dataclasses.replace(new, reason=decision.reason)
    return dataclasses.replace(decision, job=new)


def _noop(job: Job) -> Decision:
    return Decision(job)


def _fits(spec: JobSpec) -> Any:
    if not spec.builtin:  # a program of the job's own: its layout is its business
        return lambda n: True
    try:
        cfg = spec.train_config()
    except ConfigError:
        return lambda n: False

    def fits(n_nodes: int) -> bool:
        try:
            cfg.check_world(spec.world_size(n_nodes))
            return True
        except ConfigError:
            return False

    return fits


def _start_first(job: Job, nodes: Mapping[str, NodeView], now: float) -> Decision:
    spec = job.spec
    choice = choose_members(
        wanted=spec.nodes,
        min_nodes=spec.min_nodes,
        current=(),
        nodes=nodes,
        job_id=job.job_id,
        fits=_fits(spec),
        initial=True,
    )
    if choice is None and now - job.created >= spec.rendezvous_timeout_s:
        usable = [n for n in nodes.values() if n.eligible and not n.spare and n.busy_with in ("", job.job_id)]
        if len(usable) >= spec.min_nodes and _fits(spec)(len(usable)):
            members = tuple(sorted(n.node_id for n in usable))[: spec.nodes]
            return _launch(
                job,
                members,
                now,
                f"rendezvous timed out after {spec.rendezvous_timeout_s:.0f}s: "
                f"starting with {len(members)} of {spec.nodes} nodes",
            )
        return Decision(
            dataclasses.replace(job, state=JobState.FAILED),
            (),
            f"rendezvous timed out after {spec.rendezvous_timeout_s:.0f}s with {len(usable)} usable nodes; "
            f"the job needs at least {spec.min_nodes}",
        )
    if choice is None:
        return _noop(job)
    return _launch(job, choice.members, now, f"rendezvous complete: nodes {', '.join(choice.members)}")


def _launch(job: Job, members: tuple[str, ...], now: float, reason: str) -> Decision:
    gen = job.generation + 1
    new = dataclasses.replace(
        job,
        state=JobState.RUNNING,
        generation=gen,
        members=members,
        world_size=job.spec.world_size(len(members)),
        finished_ranks=(),
        started=job.started or now,
        launched=now,
        joined_ranks=(),
        tried=(f"generation {gen} on {', '.join(members)}: first launch",),
    )
    return Decision(
        new, (StartGeneration(gen, members, (), Resume.CHECKPOINT, "", job.skip_windows),), reason
    )


def first_step_deadline_s(job: Job) -> float:
    """How long the current generation may take from launch to its first completed step."""
    if job.spec.first_step_timeout_s:
        return job.spec.first_step_timeout_s
    if not job.first_step_s:
        return COLD_START_S
    return max(FIRST_STEP_FLOOR_S, FIRST_STEP_FACTOR * max(job.first_step_s))


def _deadline_missed(job: Job, now: float) -> bool:
    return (
        job.state in (JobState.RUNNING, JobState.RECOVERING)
        and job.launched is not None
        and not job.awaiting_capacity
        and now - job.launched > first_step_deadline_s(job)
    )


def _escalate(job: Job, nodes: Mapping[str, NodeView], now: float) -> Decision:
    """The generation missed its first-step deadline: the next plan is stronger than the last."""
    deadline = first_step_deadline_s(job)
    missing = tuple(
        m
        for i, m in enumerate(job.members)
        if not all(
            r in job.joined_ranks
            for r in range(i * job.spec.workers_per_node, (i + 1) * job.spec.workers_per_node)
        )
    )
    why = (
        f"generation {job.generation} did not complete its first step within {deadline:.0f}s of its launch"
        + (f" ({', '.join(missing)} never joined)" if missing else " (every rank joined)")
    )
    rung = job.rung + 1
    if rung == 2 and not missing:
        rung = 3  # every rank joined, so there is no node to leave out: nothing stronger is left
    job = dataclasses.replace(job, rung=rung)
    if rung >= 3:
        return _fail(job, f"{why}; giving up after trying: {'; '.join(job.tried)}")
    if rung == 1:
        return _restart(
            job,
            RestartReason.FIRST_STEP_TIMEOUT,
            nodes,
            now,
            exclude=(),
            detail=f"{why}; escalating to {RUNGS[1]}",
        )
    d = _restart(
        job,
        RestartReason.FIRST_STEP_TIMEOUT,
        nodes,
        now,
        exclude=missing,
        detail=f"{why}; escalating: leaving out {', '.join(missing)}",
    )
    cordons = tuple(
        Cordon(n, f"its rank did not join generation {job.generation} within {deadline:.0f}s")
        for n in missing
    )
    return dataclasses.replace(d, actions=(*cordons, *d.actions)) if d.job.state is not JobState.FAILED else d


def on_rank_joined(job: Job, ev: RankJoined, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if ev.generation != job.generation or job.state not in ACTIVE or ev.rank in job.joined_ranks:
        return Decision(job)
    return Decision(dataclasses.replace(job, joined_ranks=tuple(sorted((*job.joined_ranks, ev.rank)))))


def on_submitted(job: Job, event: Submitted, nodes: Mapping[str, NodeView], now: float) -> Decision:
    return _start_first(job, nodes, now)


def on_tick(job: Job, event: Tick, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state is JobState.PENDING:
        return _start_first(job, nodes, now)
    if job.reconcile_until is not None and now < job.reconcile_until:
        return _noop(job)  # the members have not all reported since the coordinator restarted
    if job.reconcile_until is not None:
        missing = [m for m in job.members if m not in job.reconciled]
        job = dataclasses.replace(job, reconcile_until=None)
        if missing and _deadline_missed(job, now):
            return _escalate(job, nodes, now)  # its first-step deadline passed too: never the same plan
        if missing:
            return _restart(
                job,
                RestartReason.RECONCILE,
                nodes,
                now,
                exclude=(),
                detail=f"after the coordinator restarted, {', '.join(missing)} did not report generation {job.generation}",
            )
        return Decision(job, (), f"reconciled: every member is still training generation {job.generation}")
    if job.awaiting_capacity:
        return _restart(job, None, nodes, now, exclude=(), count=False, detail="retrying")
    if _deadline_missed(job, now):
        return _escalate(job, nodes, now)
    if job.waiting_since is not None and now - job.waiting_since >= PEER_WAIT_GRACE_S:
        quiet = tuple(m for m in job.members if m in nodes and nodes[m].heartbeat_age_s >= QUIET_S)
        why = f"a rank lost its peers {now - job.waiting_since:.1f}s ago and no failure was reported"
        if quiet:
            why += f"; {', '.join(quiet)} went silent too (last heartbeat over {QUIET_S:.1f}s ago): taken for lost"
        return _restart(
            job,
            RestartReason.NODE_LOST if quiet else RestartReason.COLLECTIVE_FAILED,
            nodes,
            now,
            exclude=quiet,
            detail=why,
        )
    return _noop(job)


def on_worker_failed(job: Job, ev: WorkerFailed, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.generation != job.generation or _stopped(job):
        return _noop(job)  # stale, or ranks the job already stopped (and counted the restart of)
    if ev.kind == ExitReason.CONFIG:
        return _fail(job, f"{ev.node_id} rejected the job's configuration: {ev.detail}")
    what = "hung" if ev.kind == ExitReason.HANG else "crashed"
    who = f"rank {ev.rank} on {ev.node_id}" if ev.rank >= 0 else f"the ranks on {ev.node_id}"
    return _restart(
        job,
        EXIT_RESTART_REASON[ev.kind],
        nodes,
        now,
        exclude=(),
        detail=f"{who} {what}: {ev.detail}",
        fault_age_s=ev.fault_age_s,
    )


def on_peer_waiting(job: Job, ev: PeerWaiting, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.generation != job.generation or job.waiting_since is not None:
        return _noop(job)
    return Decision(dataclasses.replace(job, waiting_since=now, waiting_step=ev.step))


def on_node_lost(job: Job, ev: NodeLost, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.node_id not in job.members:
        return _noop(job)
    return _restart(
        job,
        RestartReason.NODE_LOST,
        nodes,
        now,
        exclude=(ev.node_id,),
        detail=f"node {ev.node_id} lost: {ev.detail}",
        count=not job.awaiting_capacity,  # waiting: its ranks were stopped, the restart counted
    )


def on_node_changed(job: Job, ev: NodeChanged, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state is JobState.PENDING:
        return _start_first(job, nodes, now)
    if job.awaiting_capacity:
        return _restart(
            job, None, nodes, now, exclude=(), count=False, detail=f"node {ev.node_id} became available"
        )
    return _noop(job)


def on_drain(job: Job, ev: Drain, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.node_id not in job.members:
        return _noop(job)
    return _restart(
        job,
        RestartReason.DRAIN,
        nodes,
        now,
        exclude=(ev.node_id,),
        detail=f"node {ev.node_id} drained: {ev.reason}",
        count=not job.awaiting_capacity,
    )


def on_progress(job: Job, ev: Progress, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if ev.generation != job.generation or job.state not in ACTIVE or _stopped(job):
        return _noop(job)  # a stopped generation's last steps end no recovery
    new = job
    if ev.step > job.step:
        new = dataclasses.replace(new, step=ev.step)
    if job.launched is not None:  # the generation completed a step: it formed, and the recovery worked
        took = now - job.launched
        new = dataclasses.replace(
            new,
            launched=None,
            rung=0,
            tried=(),
            first_step_s=(*job.first_step_s, took)[-8:],
            restore_to=-1,  # it restored its state before stepping: the target is applied
        )
    if job.waiting_since is not None and ev.step > job.waiting_step:  # training moved on: the peer came back
        new = dataclasses.replace(new, waiting_since=None)
    if job.state is JobState.RECOVERING and ev.step > job.step_at_last_restart:
        seconds = now - job.fault_time if job.fault_time is not None else 0.0
        new = dataclasses.replace(
            new,
            state=JobState.RUNNING,
            fault_time=None,
            waiting_since=None,
            recoveries=(*job.recoveries, seconds),
        )
        return Decision(  # the job keeps its recovery times; the metrics histogram reads them
            new, (), f"generation {job.generation} completed step {ev.step}: recovered in {seconds:.2f}s"
        )
    return Decision(new)


def on_straggler(job: Job, ev: StragglerSeen, nodes: Mapping[str, NodeView], now: float) -> Decision:
    """Recorded for `job explain`; under ``straggler_policy = "replace"`` a spare takes the node's
    place at once (a new generation, the survivors healing the spare), when one is ready."""
    if job.state is not JobState.RUNNING or ev.generation != job.generation:
        return _noop(job)  # a recovery or bisection is already changing the members
    who = f"rank {ev.rank} on {ev.node_id}"
    if ev.cleared:
        return Decision(job, (), f"{who} is no longer a straggler at step {ev.step} ({ev.detail})")
    what = f"{who} is a straggler at step {ev.step}: {ev.detail}"
    if job.spec.straggler_policy != "replace":
        return Decision(job, (), f"{what}; straggler_policy report: it stays")
    if not free_nodes(nodes, job.job_id, job.members) or ev.node_id not in job.members:
        return Decision(job, (), f"{what}; straggler_policy replace, but no spare node is ready: it stays")
    return _restart(
        job,
        RestartReason.STRAGGLER,
        nodes,
        now,
        exclude=(ev.node_id,),
        detail=f"{what}; straggler_policy replace: a spare takes {ev.node_id}'s place",
    )


def on_detector(job: Job, ev: Detector, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.generation > job.generation:
        return _noop(job)
    onset = ev.onset_step if ev.onset_step >= 0 else ev.step - 1
    if ev.generation < job.generation or _stopped(job):
        return _late_alarm(job, ev, onset, nodes, now)
    if job.pending_rollback is not None and onset >= job.pending_rollback.to_step:
        return _noop(job)  # its whole window lies in the steps about to be recomputed
    job, marks = _raise_alarm(job, ev)
    if ev.kind in (EventKind.NONFINITE, EventKind.SPIKE):
        return _replay_first(job, ev, nodes, now, marks)
    suspects = job.suspects(ev.suspect_ranks, ev.generation)
    if ev.kind == EventKind.FINGERPRINT_MISMATCH:
        if suspects:
            cordons = tuple(
                Cordon(n, f"its replica diverged at step {ev.step} ({ev.detail})") for n in suspects
            )
            d = _restart(
                job,
                RestartReason.FINGERPRINT,
                nodes,
                now,
                exclude=suspects,
                # The odd replica kept training with its peers until the new generation formed, and
                # its gradients reached everyone's average: the majority rolls back to the check.
                rollback_to=ev.step,
                detail=f"replica fingerprints at step {ev.step}: {ev.detail}; the majority rolls back to its "
                f"state at or before step {ev.step} and heals the replacement",
            )
            return dataclasses.replace(d, actions=marks + cordons + d.actions)
        why = f"replica fingerprints disagree at step {ev.step} and no rank can be named ({ev.detail})"
        pending = [job.pending_rollback.to_step] if job.pending_rollback else []
        if 0 <= ev.rolls_back_to <= max(ev.onset_step, 0) and all(
            s >= ev.rolls_back_to for s in (*_open_onsets(job), *pending)
        ):
            # The ranks went back at their verdict, before the report reached here: asking again
            # would send them back a second time, over the steps they have redone since.
            return Decision(
                dataclasses.replace(job, alarms=_resolve_alarms(job, generation=job.generation)),
                marks,
                f"{why}: the ranks rolled back in place to step {ev.rolls_back_to}, where they agreed",
            )
        return _rollback(
            job,
            max(ev.onset_step, 0),
            (),
            now,
            RestartReason.FINGERPRINT,
            f"{why}: rolling back to step {ev.onset_step}, where they agreed",
            marks,
        )
    if ev.kind == EventKind.AUDIT_MISMATCH:
        onset = max(ev.onset_step, 0)
        if suspects:
            cordons = tuple(
                Cordon(n, f"the recomputation audit at step {ev.step} named it") for n in suspects
            )
            d = _restart(
                job,
                RestartReason.AUDIT,
                nodes,
                now,
                exclude=suspects,
                rollback_to=onset,
                detail=f"audit at step {ev.step}: {ev.detail}; survivors roll back to step {onset}, before the onset",
            )
            return dataclasses.replace(d, actions=marks + cordons + d.actions)
        return _suspect_hardware(
            job,
            ev,
            nodes,
            now,
            marks,
            f"the audit at step {ev.step} disagrees but cannot name a rank ({ev.detail})",
        )
    return _noop(job)


def _late_alarm(job: Job, ev: Detector, onset: int, nodes: Mapping[str, NodeView], now: float) -> Decision:
    """A detection about state that no rank of the current generation is training on as it was: it
    comes from an older generation, or from ranks the job stopped. Process events of such ranks are
    stale; an alarm is not: its onset window holds whatever generation inherited that state
    (survivors keep it, replacements heal from them). Checkpoints in the window are bad, and the
    state must come back from at or before the onset, unless the report names the odd replica: as
    for a fresh report, the majority's state at the check is then good once that replica is gone."""
    if ev.kind == EventKind.NONFINITE:
        return _noop(job)  # the poisoned update was never applied: nothing to undo
    job, marks = _raise_alarm(job, ev)
    why = f"{ev.kind} at step {ev.step} reported by generation {ev.generation} (onset after step {onset})"
    # Ranks are numbered within the generation that reported them.
    suspects = job.suspects(ev.suspect_ranks, ev.generation)
    gone = bool(suspects) and not set(suspects) & set(job.members)
    target = ev.step if gone and ev.kind == EventKind.FINGERPRINT_MISMATCH else onset
    if _stopped(job):
        target = min(onset, job.restore_to) if job.restore_to >= 0 else onset
        return Decision(
            dataclasses.replace(job, restore_to=target),
            marks,
            f"{why}: its ranks are stopped; the next generation restores from step {target} or earlier",
        )
    if job.launched is not None and 0 <= job.restore_to <= target and (gone or not suspects):
        new = dataclasses.replace(job, alarms=_resolve_alarms(job, generation=job.generation))
        without = f" without {', '.join(suspects)}" if suspects else ""
        return Decision(
            new,
            marks,
            f"{why}: generation {job.generation} already restores{without} from step {job.restore_to} or earlier",
        )
    cordons = tuple(Cordon(n, f"{ev.kind} at step {ev.step} named it ({ev.detail})") for n in suspects)
    d = _restart(
        job,
        DETECTOR_RESTART_REASON[ev.kind],
        nodes,
        now,
        exclude=suspects,
        rollback_to=max(target, 0),
        detail=f"{why}: generation {job.generation} may carry that state, so it restores from step "
        f"{max(target, 0)} or earlier",
    )
    return dataclasses.replace(d, actions=marks + cordons + d.actions)


def _raise_alarm(job: Job, ev: Detector) -> tuple[Job, tuple[Action, ...]]:
    """Record the alarm and mark every checkpoint its onset window reaches back to as bad."""
    if ev.kind == EventKind.NONFINITE:
        return job, ()  # the poisoned update was never applied
    onset = ev.onset_step if ev.onset_step >= 0 else ev.step - 1
    marks = []
    records = []
    for c in job.checkpoints:
        if c.good and c.step > onset:
            reason = f"alarm {ev.kind} at step {ev.step} has an onset window reaching back to step {onset}"
            c = dataclasses.replace(c, good=False, reason=reason)
            marks.append(MarkCheckpoint(c.step, c.path, False, reason))
        records.append(c)
    alarm = Alarm(ev.kind, onset, ev.step, job.generation)
    return dataclasses.replace(job, alarms=(*job.alarms, alarm), checkpoints=tuple(records)), tuple(marks)


def _resolve_alarms(job: Job, *, epoch: int = -1, generation: int = -1) -> tuple[Alarm, ...]:
    """Open alarms are closed by the response that restores state from before their onset."""
    return tuple(
        dataclasses.replace(a, resolved_epoch=epoch, resolved_generation=generation)
        if a.resolved_epoch < 0 and a.resolved_generation < 0
        else a
        for a in job.alarms
    )


def _replay_first(
    job: Job, ev: Detector, nodes: Mapping[str, NodeView], now: float, marks: tuple[Action, ...]
) -> Decision:
    spec = job.spec
    prior = [a for a in job.anomalies if a.kind in (EventKind.NONFINITE, EventKind.SPIKE)]
    same_data = [a for a in prior if a.data_index == ev.data_index and a.outcome == "replay"]
    to_step = max(ev.step - 1, 0)
    if same_data:
        window = (ev.step - 1, spec.skip_batches)
        anomaly = Anomaly(ev.kind, ev.step, ev.data_index, "skip", job.generation)
        explained = tuple(  # the earlier replay is explained by the data, not by hardware
            dataclasses.replace(a, outcome="data") if a in same_data else a for a in job.anomalies
        )
        job = dataclasses.replace(job, anomalies=(*explained, anomaly))
        return _rollback(
            job,
            to_step,
            (window,),
            now,
            DETECTOR_RESTART_REASON[ev.kind],
            f"{ev.kind} at step {ev.step} recurred at the same data (data index {ev.data_index}) after a replay: "
            f"the data is the cause, skipping {spec.skip_batches} batches from step {ev.step}",
            marks,
        )
    recent = [
        a
        for a in prior
        if a.outcome == "replay"
        and a.data_index != ev.data_index
        and ev.step - a.step <= spec.hardware_horizon_steps
    ]
    if recent:
        anomaly = Anomaly(ev.kind, ev.step, ev.data_index, "hardware", job.generation)
        job = dataclasses.replace(job, anomalies=(*job.anomalies, anomaly))
        return _suspect_hardware(
            job,
            ev,
            nodes,
            now,
            marks,
            f"{ev.kind} at step {ev.step} (data index {ev.data_index}) follows a replayed {recent[-1].kind} at step "
            f"{recent[-1].step} (data index {recent[-1].data_index}): different data, so the hardware is suspect",
        )
    anomaly = Anomaly(ev.kind, ev.step, ev.data_index, "replay", job.generation)
    job = dataclasses.replace(job, anomalies=(*job.anomalies, anomaly))
    return _rollback(
        job,
        to_step,
        (),
        now,
        DETECTOR_RESTART_REASON[ev.kind],
        f"{ev.kind} at step {ev.step}: rolling back in place and replaying the same data (a transient fault "
        f"leaves no trace; a recurrence at this data would mean the data)",
        marks,
    )


def _suspect_hardware(
    job: Job, ev: Detector, nodes: Mapping[str, NodeView], now: float, marks: tuple[Action, ...], why: str
) -> Decision:
    onset = ev.onset_step if ev.onset_step >= 0 else max(ev.step - 1, 0)
    if job.spec.bisect_on_suspect and len(job.members) >= 2:
        # Its ranks stop: the bisection's restart restores from before this onset and any target in flight.
        p = job.pending_rollback
        target = min(t for t in (max(onset, 0), job.restore_to, p.to_step if p else -1) if t >= 0)
        new = dataclasses.replace(
            job,
            state=JobState.BISECTING,
            fault_time=job.fault_time or now,
            restore_to=target,
            pending_rollback=None,
        )
        return Decision(
            new,
            (
                *marks,
                StopWorkers(job.members, "bisecting to find the faulty node"),
                StartBisection(job.members, why),
            ),
            f"{why}: stopping the job to bisect its nodes; it resumes from the last good checkpoint at or before step {onset}",
        )
    return _rollback(
        job, onset, (), now, DETECTOR_RESTART_REASON[ev.kind], f"{why}; rolling back to step {onset}", marks
    )


def _rollback(
    job: Job,
    to_step: int,
    skip: tuple[tuple[int, int], ...],
    now: float,
    purpose: RestartReason,
    reason: str,
    marks: tuple[Action, ...] = (),
) -> Decision:
    rid = job.next_request_id
    # It replaces a pending request and resolves the open alarms: it goes back past all of them.
    earlier = [*_open_onsets(job), *([job.pending_rollback.to_step] if job.pending_rollback else [])]
    if earlier and min(earlier) < to_step:
        to_step = max(min(earlier), 0)
        reason += f" (to step {to_step}: an earlier target is still in flight)"
    new = dataclasses.replace(
        job,
        next_request_id=rid + 1,
        skip_windows=(*job.skip_windows, *skip),
        pending_rollback=PendingRollback(rid, to_step, now, purpose, skip),
        alarms=_resolve_alarms(job, epoch=rid),
    )
    return Decision(
        new, (*marks, SendRollback(job.generation, job.members, rid, to_step, skip, reason)), reason
    )


def on_rollback_done(job: Job, ev: RollbackDone, nodes: Mapping[str, NodeView], now: float) -> Decision:
    pending = job.pending_rollback
    if pending is None or ev.request_id != pending.request_id:
        return _noop(job)
    return Decision(
        dataclasses.replace(job, pending_rollback=None),
        (),
        f"rollback {ev.request_id} done: training resumed from step {ev.step}",
    )


def on_rollback_unavailable(
    job: Job, ev: RollbackUnavailable, nodes: Mapping[str, NodeView], now: float
) -> Decision:
    pending = job.pending_rollback
    if pending is None or ev.request_id != pending.request_id:
        return _noop(job)
    job = dataclasses.replace(job, pending_rollback=None)
    return _restart(
        job,
        pending.purpose,
        nodes,
        now,
        exclude=(),
        rollback_to=pending.to_step,
        force_checkpoint=True,
        detail=f"no in-memory snapshot at or before step {pending.to_step}: restoring a checkpoint instead",
    )


def on_checkpoint(job: Job, ev: CheckpointCommitted, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if any(c.step == ev.step for c in job.checkpoints):
        return _noop(job)
    good, why = ev.verified and ev.replicas_agree, ev.reason or "committed, verified, replicas agreed"
    if not ev.replicas_agree:
        why = "replica fingerprints disagreed when it was saved"
    for a in job.alarms:
        if a.taints(ev.step, ev.generation, ev.request_epoch):
            good, why = (
                False,
                f"alarm {a.kind} at step {a.step} has an onset window reaching back to step {a.onset_step}",
            )
    record = CheckpointRecord(ev.step, ev.path, good, why, ev.fingerprint)
    new = dataclasses.replace(
        job, checkpoints=tuple(sorted((*job.checkpoints, record), key=lambda c: c.step))
    )
    return Decision(
        new,
        (MarkCheckpoint(ev.step, ev.path, good, why),),
        f"checkpoint at step {ev.step} is {'good' if good else 'bad'}: {why}",
    )


def on_rank_finished(job: Job, ev: RankFinished, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state not in ACTIVE or ev.generation != job.generation or ev.rank in job.finished_ranks:
        return _noop(job)
    finished = tuple(sorted((*job.finished_ranks, ev.rank)))
    new = dataclasses.replace(
        job,
        finished_ranks=finished,
        step=max(job.step, ev.step),
        final_fingerprint=ev.fingerprint or job.final_fingerprint,
        final_val_loss=ev.val_loss if ev.val_loss is not None else job.final_val_loss,
    )
    if len(finished) < job.world_size:
        return Decision(new)
    pending = job.pending_rollback
    if pending is not None:
        # The ranks finished before they applied it: the final state holds the steps it discards.
        return _restart(
            new,
            pending.purpose,
            nodes,
            now,
            exclude=(),
            force_checkpoint=True,
            detail=f"every rank finished before applying rollback {pending.request_id} to step "
            f"{pending.to_step}: the final state holds steps after an alarm's onset, so they are redone",
        )
    new = dataclasses.replace(new, state=JobState.SUCCEEDED)
    return Decision(
        new,
        (StopWorkers(job.members, "the job finished"),),
        f"all {job.world_size} ranks finished; final state fingerprint {new.final_fingerprint}",
    )


def on_cancel(job: Job, ev: Cancel, nodes: Mapping[str, NodeView], now: float) -> Decision:
    new = dataclasses.replace(job, state=JobState.CANCELLED)
    # A final checkpoint only of clean state: not of steps a rollback in flight was about to discard
    # (a cancelled job records no later checkpoint event, so it could never be marked bad).
    clean = job.pending_rollback is None and job.restore_to < 0 and not _open_onsets(job)
    return Decision(
        new, (StopWorkers(job.members, ev.reason, checkpoint=clean),) if job.members else (), ev.reason
    )


def on_reported(job: Job, ev: Reported, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.reconcile_until is None or ev.node_id not in job.members or ev.node_id in job.reconciled:
        return _noop(job)
    if ev.generation != job.generation or not ev.training:
        return _noop(job)
    reconciled = (*job.reconciled, ev.node_id)
    new = dataclasses.replace(job, reconciled=reconciled)
    if set(reconciled) >= set(job.members):
        new = dataclasses.replace(new, reconcile_until=None)
        return Decision(
            new,
            (),
            f"reconciled after a coordinator restart: every member still trains generation {job.generation}; nothing restarted",
        )
    return Decision(new)


def on_coordinator_restarted(
    job: Job, ev: CoordinatorRestarted, nodes: Mapping[str, NodeView], now: float
) -> Decision:
    if job.state not in ACTIVE or job.awaiting_capacity:
        return _noop(job)  # waiting for capacity, nothing trains: the next Tick retries as before
    new = dataclasses.replace(job, reconcile_until=now + RECONCILE_GRACE_S, reconciled=())
    why = (
        f"coordinator restarted: waiting up to {RECONCILE_GRACE_S:.0f}s for members to report "
        f"generation {job.generation} before deciding anything"
    )
    p = job.pending_rollback
    if p is None:
        return Decision(new, (), why)
    # Decided and saved, but maybe never sent before the restart; the ranks handle a request once.
    again = SendRollback(
        job.generation, job.members, p.request_id, p.to_step, p.skip, f"{p.purpose}: rollback resent"
    )
    return Decision(new, (again,), f"{why}; rollback {p.request_id} to step {p.to_step} sent again")


def on_bisection_done(job: Job, ev: BisectionDone, nodes: Mapping[str, NodeView], now: float) -> Decision:
    if job.state is not JobState.BISECTING:
        return _noop(job)
    # The target set when the bisection began (older jobs: the newest alarm's onset).
    last_alarm = job.alarms[-1].onset_step if job.alarms else job.step
    target = job.restore_to if job.restore_to >= 0 else last_alarm
    cordons = tuple(Cordon(n, f"bisection {ev.bisection_id} named it") for n in ev.faulty)
    d = _restart(
        job,
        RestartReason.BISECTION,
        nodes,
        now,
        exclude=ev.faulty,
        rollback_to=target,
        force_checkpoint=True,
        detail=f"bisection {ev.bisection_id}: {ev.reason}",
    )
    return dataclasses.replace(d, actions=cordons + d.actions)


def _fail(job: Job, reason: str) -> Decision:
    new = dataclasses.replace(job, state=JobState.FAILED)
    return Decision(new, (StopWorkers(job.members, reason),) if job.members else (), reason)


def _restart(
    job: Job,
    why: RestartReason | None,
    nodes: Mapping[str, NodeView],
    now: float,
    *,
    exclude: tuple[str, ...],
    detail: str,
    rollback_to: int = -1,
    force_checkpoint: bool = False,
    count: bool = True,
    fault_age_s: float = 0.0,
) -> Decision:
    """A new generation: survivors keep their state and heal the replacement, or everyone restores
    the last good checkpoint. Enforces the restart-loop guards. ``why`` is None only for a retry that
    is not counted (``count=False``): one after waiting for capacity."""
    spec = job.spec
    if count:
        assert why is not None, "a counted restart has a reason"
        made_progress = job.step > job.step_at_last_restart
        without = 1 if made_progress else job.restarts_without_progress + 1
        by_reason = dict(job.restarts_by_reason)
        by_reason[why] = by_reason.get(why, 0) + 1
        job = dataclasses.replace(
            job,
            restarts=job.restarts + 1,
            restarts_by_reason=tuple(sorted(by_reason.items())),
            restarts_without_progress=without,
            step_at_last_restart=job.step,
        )
        if job.restarts > spec.max_restarts:
            return _fail(
                job,
                f"{detail}; giving up: {job.restarts - 1} restarts already (max_restarts={spec.max_restarts})",
            )
        if without > spec.max_restarts_without_progress:
            return _fail(
                job,
                f"{detail}; giving up: {without} restarts in a row without progress past step {job.step} "
                f"(max_restarts_without_progress={spec.max_restarts_without_progress})",
            )
    # Recoveries are measured from the fault: an agent that took 0.3 s to find a frozen rank says so.
    fault_time = job.fault_time if job.fault_time is not None else now - max(fault_age_s, 0.0)
    # Every rollback target in flight binds the next generation: the one asked for, a pending
    # in-place request the survivors never applied, and the target of a generation (or a wait) that
    # never got to train. The lowest wins: state after any alarm's onset must not survive.
    targets = [rollback_to, job.restore_to, job.pending_rollback.to_step if job.pending_rollback else -1]
    rollback_to = min((t for t in targets if t >= 0), default=-1)
    if _stopped(job):
        force_checkpoint = True  # its ranks were stopped: no live peer is left to heal from
    current = tuple(m for m in job.members if m not in exclude)
    choice = choose_members(
        wanted=spec.nodes,
        min_nodes=spec.min_nodes,
        current=job.members,
        nodes=_without(nodes, exclude),
        job_id=job.job_id,
        fits=_fits(spec),
        initial=False,
    )
    if choice is None:
        new = dataclasses.replace(
            job,
            state=JobState.RECOVERING,
            awaiting_capacity=True,
            fault_time=fault_time,
            waiting_since=None,
            restore_to=rollback_to,  # the ranks are stopped: the next launch restores from here
            pending_rollback=None,
            reconcile_until=None,  # nothing trains, so nothing is left to reconcile
        )
        if count:
            return Decision(
                new,
                (StopWorkers(current, "waiting for capacity"),) if current else (),
                f"{detail}; no capacity for a new generation: waiting for nodes",
            )
        return Decision(new)
    survivors = [m for m in choice.members if m in current]
    cfg_parallel = _parallel(spec)
    # A sharded model keeps its shards in place only in a world of the same size (a survivor keeps
    # its rank, a replacement takes the lost one's); in another world new processes build the mesh
    # anew and reshard a checkpoint.
    layout_kept = cfg_parallel == "ddp" or spec.world_size(len(choice.members)) == job.world_size
    # New processes from a checkpoint: an in-place recovery already failed, or the layout changed.
    fresh = job.rung >= 1 or not layout_kept
    resume = Resume.PEER if survivors and not force_checkpoint and not fresh else Resume.CHECKPOINT
    if rollback_to >= 0:
        ck = job.last_good_at_or_before(rollback_to)
    else:
        ck = job.last_good
    checkpoint = ck.path if ck else ""
    if resume == Resume.CHECKPOINT and ck is None and any(not c.good for c in job.checkpoints):
        resume = Resume.FRESH  # checkpoints exist but none is good: never let the trainer pick a bad one
    gen = job.generation + 1
    new = dataclasses.replace(
        job,
        state=JobState.RECOVERING,
        generation=gen,
        members=choice.members,
        world_size=spec.world_size(len(choice.members)),
        fault_time=fault_time,
        awaiting_capacity=False,
        waiting_since=None,
        finished_ranks=(),
        pending_rollback=None,
        reconcile_until=None,
        alarms=_resolve_alarms(job, generation=gen)
        if rollback_to >= 0 or resume != Resume.PEER
        else job.alarms,
        launched=now,
        joined_ranks=(),
        restore_to=rollback_to,  # until this generation steps, a restart must restore from here too
    )
    action = StartGeneration(
        gen, choice.members, job.members, resume, checkpoint, job.skip_windows, rollback_to, fresh
    )
    how = {
        Resume.PEER: "survivors keep their state and heal the replacement from a live peer",
        Resume.CHECKPOINT: f"restoring checkpoint {checkpoint or '(newest that verifies)'}",
        Resume.FRESH: "no good checkpoint: starting from step 0",
    }[resume]
    if fresh:
        how = f"new processes, {how}"
    plan = f"generation {gen} on {', '.join(choice.members)}: {how}"
    new = dataclasses.replace(new, tried=(*job.tried, plan))
    return Decision(
        new, (action,), f"{detail}; generation {gen} on {', '.join(choice.members)} ({choice.reason}): {how}"
    )


def _stopped(job: Job) -> bool:
    """The job stopped its ranks (waiting for capacity, or for a bisection): nothing of its current
    generation trains, and an event from those ranks describes processes already gone."""
    return job.awaiting_capacity or job.state is JobState.BISECTING


def _open_onsets(job: Job) -> list[int]:
    return [a.onset_step for a in job.alarms if a.resolved_epoch < 0 and a.resolved_generation < 0]


def _parallel(spec: JobSpec) -> str:
    try:
        return spec.train_config().parallel
    except ConfigError:
        return "ddp"


def _without(nodes: Mapping[str, NodeView], exclude: tuple[str, ...]) -> dict[str, NodeView]:
    return {k: (dataclasses.replace(v, ready=False) if k in exclude else v) for k, v in nodes.items()}


_HANDLERS = {
    Submitted: on_submitted,
    Tick: on_tick,
    WorkerFailed: on_worker_failed,
    PeerWaiting: on_peer_waiting,
    NodeLost: on_node_lost,
    NodeChanged: on_node_changed,
    Drain: on_drain,
    Progress: on_progress,
    RankJoined: on_rank_joined,
    Detector: on_detector,
    StragglerSeen: on_straggler,
    CheckpointCommitted: on_checkpoint,
    RollbackDone: on_rollback_done,
    RollbackUnavailable: on_rollback_unavailable,
    RankFinished: on_rank_finished,
    Cancel: on_cancel,
    Reported: on_reported,
    CoordinatorRestarted: on_coordinator_restarted,
    BisectionDone: on_bisection_done,
}


def new_job(job_id: str, spec: JobSpec, now: float) -> Job:
    return Job(job_id=job_id, spec=spec, created=now, state_since=now)


def to_json(job: Job) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(job)
    d["state"] = job.state.value
    d.pop("spec")
    return d


def from_json(d: dict[str, Any], spec: JobSpec) -> Job:
    d = dict(d)
    d.pop("in_place", None)  # saved when a sharded program could not re-form in place: now all can
    d["state"] = JobState(d["state"])
    d["spec"] = spec
    d["restarts_by_reason"] = tuple(tuple(x) for x in d.get("restarts_by_reason", ()))
    d["skip_windows"] = tuple(tuple(x) for x in d.get("skip_windows", ()))
    d["anomalies"] = tuple(Anomaly(**a) for a in d.get("anomalies", ()))
    d["alarms"] = tuple(Alarm(**a) for a in d.get("alarms", ()))
    d["checkpoints"] = tuple(CheckpointRecord(**c) for c in d.get("checkpoints", ()))
    if d.get("pending_rollback"):
        p = dict(d["pending_rollback"])
        p["skip"] = tuple(tuple(x) for x in p.get("skip", ()))
        # Saved before restart reasons were typed, an audit rollback's purpose read "audit_mismatch".
        p["purpose"] = RestartReason(DETECTOR_RESTART_REASON.get(p["purpose"], p["purpose"]))
        d["pending_rollback"] = PendingRollback(**p)
    else:
        d["pending_rollback"] = None
    for key in (
        "members",
        "recoveries",
        "finished_ranks",
        "reconciled",
        "first_step_s",
        "joined_ranks",
        "tried",
    ):
        d[key] = tuple(d.get(key, ()))
    d["past_members"] = tuple((int(g), tuple(ms)) for g, ms in d.get("past_members", ()))
    known = {f.name for f in dataclasses.fields(Job)}
    return Job(**{k: v for k, v in d.items() if k in known})
