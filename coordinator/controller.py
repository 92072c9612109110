"""The controller: the coordinator's single writer.

Everything that changes state arrives on one queue (agent heartbeats and registrations, operator
commands, the periodic tick) and is applied in order: decide with the pure state machine, persist
the decision, then act (queue directives for agents, cordon nodes, mark checkpoints). gRPC handlers
only validate and enqueue, then await the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import time
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator import jobspec
from coordinator import machine as m
from coordinator.config import CoordinatorConfig
from coordinator.membership import NodeView
from coordinator.store import Store
from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion.settings import ConfigError
from stanchion.vocab import (
    DETECTORS,
    FAILED_EXITS,
    AgentEventKind,
    CoordinatorEventKind,
    EventKind,
    ExitReason,
)

log = logging.getLogger(__name__)


class NotFound(LookupError):
    pass


class Invalid(ValueError):
    pass


@dataclass
class NodeRecord:
    node_id: str
    inventory: dict[str, Any]
    cordoned: bool = False
    draining: bool = False
    reason: str = ""
    lost: bool = False
    last_seen: float = 0.0
    health: int = types_pb2.HEALTH_VERDICT_UNSPECIFIED
    health_reason: str = ""
    job_id: str = ""
    generation: int = 0
    step: int = 0
    step_time_s: float = 0.0
    workers: list[Any] = field(default_factory=list)
    last_event_seq: int = 0
    acked: int = 0
    outbox: list[agent_pb2.Directive] = field(default_factory=list)

    @property
    def state(self) -> int:
        if self.lost:
            return types_pb2.NODE_STATE_LOST
        if self.draining:
            return types_pb2.NODE_STATE_DRAINING
        if self.cordoned:
            return types_pb2.NODE_STATE_CORDONED
        return types_pb2.NODE_STATE_READY

    def view(self, busy_with: str, now: float = 0.0) -> NodeView:
        inv = self.inventory
        host = (inv.get("addresses") or [inv.get("host") or "127.0.0.1"])[0]
        return NodeView(
            node_id=self.node_id,
            host=host,
            store_port=int(inv.get("store_port", 0)),
            ready=not self.lost,
            cordoned=self.cordoned,
            draining=self.draining,
            healthy=self.health != types_pb2.HEALTH_VERDICT_UNHEALTHY,
            spare=bool(inv.get("spare", False)),
            busy_with=busy_with,
            heartbeat_age_s=max(0.0, now - self.last_seen) if now else 0.0,
        )


class ClusterView(Mapping[str, NodeView]):
    """The cluster as the state machine sees it, each node's view built on first use.

    Most events never look at the cluster (a heartbeat's progress, most detector events), and
    building every view up front cost ~5 ms per heartbeat in a 1,000-node job: the controller then
    managed ~250 heartbeats/s, not 1,000 (docs/bench/coordinator.json). Only use it inside one
    ``machine.step`` call: it reads the controller's live state, which nothing changes meanwhile.
    """

    def __init__(self, controller: Controller, now: float):
        self._c = controller
        self._now = now
        self._busy: dict[str, str] | None = None
        self._views: dict[str, NodeView] = {}

    def _busy_with(self, node_id: str) -> str:
        if self._busy is None:
            c = self._c
            self._busy = {n: j for j, job in c.jobs.items() if job.state in m.ACTIVE for n in job.members}
        return self._busy.get(node_id, "")

    def __getitem__(self, node_id: str) -> NodeView:
        view = self._views.get(node_id)
        if view is None:
            rec = self._c.nodes[node_id]  # KeyError for an unknown node, as a dict would raise
            view = self._views[node_id] = rec.view(self._busy_with(node_id), self._now)
        return view

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._c.nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._c.nodes)

    def __len__(self) -> int:
        return len(self._c.nodes)


# What the controller task can be asked to do; `Controller.submit` refuses anything else.
WorkKind = Literal[
    "tick", "submit", "cancel", "cordon", "uncordon", "drain", "register", "heartbeat", "bisect", "noop"
]


@dataclass
class Work:
    kind: WorkKind
    payload: Any
    future: asyncio.Future[Any]


class Controller:
    def __init__(self, cfg: CoordinatorConfig, store: Store, *, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.jobs: dict[str, m.Job] = {}
        self.job_order: list[str] = []
        self.nodes: dict[str, NodeRecord] = {}
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self._handlers: dict[str, Callable[[Any], Any]] = {
            "tick": self._do_tick,
            "submit": self._do_submit,
            "cancel": self._do_cancel,
            "cordon": self._do_cordon,
            "uncordon": self._do_uncordon,
            "drain": self._do_drain,
            "register": self._do_register,
            "heartbeat": self._do_heartbeat,
            "bisect": self._do_bisect,
            "noop": self._do_noop,
        }
        assert set(self._handlers) == set(typing.get_args(WorkKind))
        # Directive sequence numbers keep increasing across coordinator restarts.
        self._seq = itertools.count(int(self.clock() * 1000) * 1000)
        self._seen_detectors: set[tuple[str, int, str, int, int]] = set()
        self.events_changed = asyncio.Condition()
        self.heartbeats = 0
        self.bisector: Any = None  # set by the bisection orchestrator
        self.started_at = self.clock()
        self._last_tick = self.started_at
        self._task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.ready = False

    # ------------------------------------------------------------------------------------------
    # Life cycle
    def load(self) -> None:
        """Reload state after a restart; active jobs reconcile before deciding anything."""
        now = self.clock()
        for row in self.store.nodes():
            inv = row["inventory"]
            self.nodes[row["node_id"]] = NodeRecord(
                row["node_id"],
                inv,
                cordoned=row["state"] in ("cordoned", "draining"),
                draining=row["state"] == "draining",
                reason=row["reason"],
                last_seen=now,
            )
        for row in self.store.jobs():
            spec = jobspec.parse(row["spec_toml"])
            job = m.from_json(row["data"], spec)
            self.jobs[job.job_id] = job
            self.job_order.append(job.job_id)
            for n in job.members:
                if n in self.nodes and job.state in m.ACTIVE:
                    self.nodes[n].job_id = job.job_id
            if job.state in m.ACTIVE:
                self._apply(job.job_id, m.CoordinatorRestarted(), "coordinator restarted")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="controller")
        self._tick_task = asyncio.create_task(self._ticker(), name="controller-tick")
        self.ready = True

    async def stop(self) -> None:
        for t in (self._task, self._tick_task):
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass

    async def submit(self, kind: WorkKind, payload: Any = None) -> Any:
        if kind not in self._handlers:
            raise ValueError(f"unknown controller work {kind!r}; expected one of {sorted(self._handlers)}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put(Work(kind, payload, fut))
        return await fut

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            await self.queue.put(Work("tick", None, asyncio.get_running_loop().create_future()))

    async def _run(self) -> None:
        while True:
            work = await self.queue.get()
            try:
                result = self._handlers[work.kind](work.payload)
                if not work.future.done():
                    work.future.set_result(result)
            except Exception as e:  # noqa: BLE001 - surfaced to the caller; the controller lives on
                if not isinstance(e, (NotFound, Invalid, ConfigError)):
                    log.exception("controller failed on %s", work.kind)
                if not work.future.done():
                    work.future.set_exception(e)
            await self._notify()

    async def _notify(self) -> None:
        async with self.events_changed:
            self.events_changed.notify_all()

    # ------------------------------------------------------------------------------------------
    # Applying the state machine
    def cluster(self, job_id: str) -> Mapping[str, NodeView]:
        return ClusterView(self, self.clock())

    def _apply(self, job_id: str, event: Any, label: str) -> m.Decision:
        job = self.jobs[job_id]
        now = self.clock()
        decision = m.step(job, event, self.cluster(job_id), now)
        new = decision.job
        if decision.reason:  # decide -> persist -> act
            actions = [m.describe(a) for a in decision.actions]
            self.store.record_decision(
                job_id,
                new.state.value,
                m.to_json(new),
                event=label,
                from_state=job.state.value,
                reason=decision.reason,
                actions=actions,
                generation=new.generation,
                now=now,
            )
            self.store.add_events(
                [
                    (
                        job_id,
                        "",
                        CoordinatorEventKind.DECISION,
                        new.generation,
                        new.step,
                        -1,
                        now,
                        {
                            "reason": decision.reason,
                            "from": job.state.value,
                            "to": new.state.value,
                            "actions": actions,
                        },
                    )
                ]
            )
            log.info(
                "[job %s gen %d] %s -> %s: %s",
                job_id,
                new.generation,
                job.state.value,
                new.state.value,
                decision.reason,
            )
        elif new.state == job.state and (
            new.step // 50 != job.step // 50 or new.waiting_since != job.waiting_since
        ):
            # Bookkeeping that changes no decision (progress, waiting flags) is saved without a decision row.
            self.store.save_job(job_id, new.state.value, m.to_json(new), now)
        self.jobs[job_id] = new
        for action in decision.actions:
            self._act(new, action)
        if new.state in m.TERMINAL:
            for n in new.members:
                if n in self.nodes and self.nodes[n].job_id == job_id:
                    self.nodes[n].job_id = ""
        return decision

    def _act(self, job: m.Job, action: m.Action) -> None:
        if isinstance(action, m.StartGeneration):
            self._start_generation(job, action)
        elif isinstance(action, m.StopWorkers):
            for n in action.nodes:
                self._send(
                    n, job, stop=agent_pb2.StopWorkers(reason=action.reason, checkpoint=action.checkpoint)
                )
        elif isinstance(action, m.SendRollback):
            for n in action.members:
                self._send(
                    n,
                    job,
                    rollback=agent_pb2.Rollback(
                        request_id=action.request_id,
                        to_step=action.to_step,
                        reason=action.reason,
                        skip=[types_pb2.SkipWindow(start=s, length=n_) for s, n_ in action.skip],
                    ),
                )
        elif isinstance(action, m.MarkCheckpoint):
            self.store.upsert_checkpoint(
                job.job_id,
                action.step,
                action.path,
                action.good,
                action.reason,
                next((c.fingerprint for c in job.checkpoints if c.step == action.step), ""),
                self.clock(),
            )
            if not action.good and job.members:
                self._send(
                    job.members[0], job, mark=agent_pb2.MarkCheckpoint(path=action.path, reason=action.reason)
                )
        elif isinstance(action, m.Cordon):
            self._set_node(action.node_id, cordoned=True, reason=action.reason)
        elif isinstance(action, m.StartBisection):
            if self.bisector is not None:
                self.bisector.start_for_job(job, action)
        else:  # pragma: no cover - a new action type without an actor is a programming error
            raise AssertionError(f"no actor for {action!r}")

    def _start_generation(self, job: m.Job, a: m.StartGeneration) -> None:
        master = self.nodes[a.members[0]].view(job.job_id)
        config_json = job.spec.config_json()
        faults_json = json.dumps(list(job.spec.faults)) if job.spec.faults else ""
        for rank, node_id in enumerate(a.members):
            self.nodes[node_id].job_id = job.job_id
            self._send(
                node_id,
                job,
                start=agent_pb2.StartWorkers(
                    node_rank=rank,
                    num_nodes=len(a.members),
                    workers_per_node=job.spec.workers_per_node,
                    master_addr=master.host,
                    master_port=master.store_port,
                    resume=a.resume,
                    checkpoint=a.checkpoint,
                    skip_windows=[types_pb2.SkipWindow(start=s, length=n) for s, n in a.skip_windows],
                    config_json=config_json,
                    faults_json=faults_json,
                    rollback_to=a.rollback_to,
                    fresh_processes=a.fresh_processes,
                    entrypoint=job.spec.entrypoint,
                    args=list(job.spec.args),
                ),
            )
        for node_id in a.previous_members:
            if node_id not in a.members and node_id in self.nodes:
                self.nodes[node_id].job_id = ""
                self._send(
                    node_id,
                    job,
                    stop=agent_pb2.StopWorkers(reason=f"not a member of generation {a.generation}"),
                )

    def _send(self, node_id: str, job: m.Job, **kind: Any) -> None:
        rec = self.nodes.get(node_id)
        if rec is None:
            return
        rec.outbox.append(
            agent_pb2.Directive(seq=next(self._seq), job_id=job.job_id, generation=job.generation, **kind)
        )

    def _set_node(
        self, node_id: str, *, cordoned: bool, draining: bool = False, reason: str = ""
    ) -> NodeRecord:
        rec = self.nodes.get(node_id)
        if rec is None:
            raise NotFound(f"node {node_id!r} is not registered (see `stanchion node list`)")
        rec.cordoned, rec.draining, rec.reason = cordoned, draining, reason
        state = "draining" if draining else ("cordoned" if cordoned else "ready")
        self.store.upsert_node(node_id, rec.inventory, state, reason, self.clock())
        kind = CoordinatorEventKind(f"node_{state}")  # node_cordoned, node_draining or node_ready
        self.store.add_events([(rec.job_id, node_id, kind, 0, 0, -1, self.clock(), {"reason": reason})])
        return rec

    def active_job_for(self, node_id: str) -> str | None:
        for job_id in reversed(self.job_order):
            job = self.jobs[job_id]
            if job.state in m.ACTIVE and node_id in job.members:
                return job_id
        return None

    # ------------------------------------------------------------------------------------------
    # Work items (run on the controller task only)
    def _do_tick(self, _: Any) -> None:
        now = self.clock()
        if now - self._last_tick > max(10 * self.cfg.tick_s, 2.0):
            # The coordinator itself was frozen (SIGSTOP, a stalled VM): every heartbeat looks old.
            # Give agents the reconnect grace again instead of declaring every node lost.
            log.warning(
                "the controller did not run for %.1fs: re-arming the reconnect grace", now - self._last_tick
            )
            self.started_at = now
        self._last_tick = now
        # After a restart, agents need time to find the coordinator again (they back off while it is
        # down): nodes loaded from the store are not declared lost during the reconcile grace.
        grace_until = self.started_at + m.RECONCILE_GRACE_S
        for rec in self.nodes.values():
            if rec.lost or now < grace_until:
                continue
            if now - rec.last_seen > self.cfg.heartbeat_timeout_s:
                rec.lost = True
                age = now - rec.last_seen
                log.warning("node %s lost: last heartbeat %.1fs ago", rec.node_id, age)
                self.store.add_events(
                    [(rec.job_id, rec.node_id, CoordinatorEventKind.NODE_LOST, 0, 0, -1, now, {"age_s": age})]
                )
                job_id = self.active_job_for(rec.node_id)
                if job_id:
                    self._apply(
                        job_id, m.NodeLost(rec.node_id, f"last heartbeat {age:.1f}s ago"), "node lost"
                    )
        for job_id in list(self.job_order):
            if self.jobs[job_id].state not in m.TERMINAL:
                self._apply(job_id, m.Tick(), "tick")
        if self.bisector is not None:
            self.bisector.tick(now)

    def _do_submit(self, payload: tuple[str, str]) -> m.Job:
        spec_toml, request_id = payload
        if request_id:
            existing = self.store.job_by_request(request_id)
            if existing:
                return self.jobs[existing]
        spec = jobspec.parse(spec_toml)  # ConfigError names the key
        spec.config_json()
        now = self.clock()
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        job = m.new_job(job_id, spec, now)
        self.store.insert_job(
            job_id, spec.name, job.state.value, spec_toml, m.to_json(job), request_id or None, now
        )
        self.jobs[job_id] = job
        self.job_order.append(job_id)
        self._apply(job_id, m.Submitted(), "submitted")
        return self.jobs[job_id]

    def _do_cancel(self, job_id: str) -> m.Job:
        job = self.job(job_id)
        if job.state in m.TERMINAL:
            raise Invalid(f"job {job.job_id} already ended ({job.state.value})")
        self._apply(job.job_id, m.Cancel(), "cancel requested")
        return self.jobs[job.job_id]

    def _do_cordon(self, payload: tuple[str, str]) -> NodeRecord:
        node_id, reason = payload
        return self._set_node(node_id, cordoned=True, reason=reason or "cordoned by an operator")

    def _do_uncordon(self, node_id: str) -> NodeRecord:
        rec = self._set_node(node_id, cordoned=False, reason="")
        self._node_changed(node_id)
        return rec

    def _do_drain(self, payload: tuple[str, str]) -> NodeRecord:
        node_id, reason = payload
        rec = self._set_node(node_id, cordoned=True, draining=True, reason=reason or "drained by an operator")
        job_id = self.active_job_for(node_id)
        if job_id:
            self._apply(job_id, m.Drain(node_id, rec.reason), "drain requested")
        return rec

    def _node_changed(self, node_id: str) -> None:
        for job_id in list(self.job_order):
            if self.jobs[job_id].state in (m.JobState.PENDING, m.JobState.RECOVERING):
                self._apply(job_id, m.NodeChanged(node_id), f"node {node_id} available")

    def _do_register(self, req: agent_pb2.RegisterRequest) -> agent_pb2.RegisterResponse:
        from google.protobuf.json_format import MessageToDict

        now = self.clock()
        inv = MessageToDict(req.inventory, preserving_proto_field_name=True)
        rec = self.nodes.get(req.node_id)
        if rec is None:
            rec = self.nodes[req.node_id] = NodeRecord(req.node_id, inv)
        was_lost = rec.lost
        rec.inventory, rec.lost, rec.last_seen = inv, False, now
        state = "draining" if rec.draining else ("cordoned" if rec.cordoned else "ready")
        self.store.upsert_node(req.node_id, inv, state, rec.reason, now)
        self.store.add_events(
            [
                (
                    "",
                    req.node_id,
                    CoordinatorEventKind.NODE_REGISTERED,
                    0,
                    0,
                    -1,
                    now,
                    {"host": inv.get("host", ""), "spare": inv.get("spare", False)},
                )
            ]
        )
        log.info(
            "node %s registered (%s)%s", req.node_id, inv.get("host"), " after being lost" if was_lost else ""
        )
        job_id = self.active_job_for(req.node_id)
        adopted, why_not = self._adopted_ranks(req, job_id) if job_id and not was_lost else ([], "")
        if job_id and adopted:
            # A member's agent restarted and took over the ranks still running: the job goes on.
            log.info("node %s: its restarted agent adopted ranks %s; the job goes on", req.node_id, adopted)
            detail = {"ranks": adopted, "generation": req.generation}
            self.store.add_events(
                [
                    (
                        job_id,
                        req.node_id,
                        CoordinatorEventKind.RANKS_ADOPTED,
                        req.generation,
                        0,
                        -1,
                        now,
                        detail,
                    )
                ]
            )
        elif job_id and not was_lost:
            # A member registering while still counted alive restarted its agent, and its ranks died
            # with it (or not all of them outlived it).
            job = self.jobs[job_id]
            self._apply(
                job_id,
                m.WorkerFailed(
                    req.node_id, job.generation, -1, ExitReason.CRASH, f"its agent restarted: {why_not}"
                ),
                "agent restarted",
            )
        elif was_lost and rec.job_id in self.jobs:
            # Back after being declared lost (a frozen agent, a partition): whatever ranks it still
            # runs belong to a generation that moved on without it. They leave; it is a free node.
            self._send(
                req.node_id,
                self.jobs[rec.job_id],
                stop=agent_pb2.StopWorkers(reason="the node was lost; the job moved on"),
            )
            rec.job_id = ""
        self._node_changed(req.node_id)
        return agent_pb2.RegisterResponse(
            heartbeat_interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
            heartbeat_timeout_ms=int(self.cfg.heartbeat_timeout_s * 1000),
            last_event_seq=rec.last_event_seq,
        )

    def _adopted_ranks(self, req: agent_pb2.RegisterRequest, job_id: str) -> tuple[list[int], str]:
        """The ranks a member's restarted agent adopted, when they are all this node has in the job's
        current generation and that generation can go on; else no ranks and why not."""
        job = self.jobs[job_id]
        live = (
            types_pb2.WORKER_STATE_STARTING,
            types_pb2.WORKER_STATE_TRAINING,
            types_pb2.WORKER_STATE_WAITING,
        )
        ranks = sorted(w.rank for w in req.workers if w.rank >= 0 and w.state in live)
        if not ranks or req.job_id != job_id or req.generation != job.generation:
            return [], "its ranks did not outlive it"
        if job.state != m.JobState.RUNNING and job.members[0] == req.node_id:
            # The forming generation meets at the rendezvous store the old agent hosted.
            return [], f"generation {job.generation} was forming at the rendezvous store the old agent hosted"
        per_node = job.spec.workers_per_node
        first = job.members.index(req.node_id) * per_node
        if ranks != list(range(first, first + per_node)):
            return [], f"it adopted ranks {ranks} of its {first}-{first + per_node - 1} only"
        return ranks, ""

    def _do_heartbeat(self, req: agent_pb2.HeartbeatRequest) -> agent_pb2.HeartbeatResponse:
        rec = self.nodes.get(req.node_id)
        if rec is None:
            raise NotFound(f"node {req.node_id!r} is not registered: register first")
        now = self.clock()
        self.heartbeats += 1
        if rec.lost:  # a node that comes back after being declared lost must register again
            raise NotFound(f"node {req.node_id!r} was declared lost: register again")
        rec.last_seen = now
        rec.workers = list(req.workers)
        rec.step, rec.step_time_s = req.last_step, req.step_time_s
        rec.generation = req.generation
        if req.health != rec.health:
            rec.health, rec.health_reason = req.health, req.health_reason
            if req.health == types_pb2.HEALTH_VERDICT_UNHEALTHY:
                self.store.add_events(
                    [
                        (
                            rec.job_id,
                            rec.node_id,
                            CoordinatorEventKind.NODE_UNHEALTHY,
                            0,
                            0,
                            -1,
                            now,
                            {"reason": req.health_reason},
                        )
                    ]
                )
        rec.acked = max(rec.acked, req.acked_directive_seq)
        rec.outbox = [d for d in rec.outbox if d.seq > rec.acked]
        job_id = req.job_id if req.job_id in self.jobs else self.active_job_for(req.node_id)
        fresh = [e for e in req.events if e.seq > rec.last_event_seq]
        if fresh:
            rec.last_event_seq = max(e.seq for e in fresh)
            self._relay(rec, fresh)
        if job_id and self.jobs[job_id].state in m.ACTIVE:
            job = self.jobs[job_id]
            training = any(
                w.state == types_pb2.WORKER_STATE_TRAINING and w.generation == job.generation
                for w in req.workers
            )
            if job.reconcile_until is not None:
                self._apply(job_id, m.Reported(req.node_id, req.generation, training), "agent reported in")
            # Progress of the job's generation only from ranks that trained a step of it: right after
            # a start directive the node's last step is still one of the generation before.
            steps = [
                w.step
                for w in req.workers
                if w.state == types_pb2.WORKER_STATE_TRAINING and w.generation == job.generation
            ]
            if req.generation == job.generation and steps and max(steps):
                self._apply(job_id, m.Progress(req.node_id, req.generation, max(steps)), "progress")
        if self.bisector is not None and req.traces:
            self.bisector.on_traces(req.node_id, list(req.traces))
        return agent_pb2.HeartbeatResponse(
            directives=[d for d in rec.outbox if d.seq > rec.acked],
            heartbeat_interval_ms=int(self._interval_for(rec) * 1000),
        )

    def _interval_for(self, rec: NodeRecord) -> float:
        if any(d.seq > rec.acked for d in rec.outbox):
            return self.cfg.heartbeat_fast_s
        job = self.jobs.get(rec.job_id)
        if job is not None and (
            job.state in (m.JobState.RECOVERING, m.JobState.BISECTING) or job.pending_rollback
        ):
            return self.cfg.heartbeat_fast_s
        if any(
            w.state in (types_pb2.WORKER_STATE_WAITING, types_pb2.WORKER_STATE_FAILED) for w in rec.workers
        ):
            return self.cfg.heartbeat_fast_s
        if self.bisector is not None and self.bisector.busy(rec.node_id):
            return self.cfg.heartbeat_fast_s
        return self.cfg.heartbeat_interval_s

    def _relay(self, rec: NodeRecord, events: list[types_pb2.Event]) -> None:
        """Store relayed events and turn the ones that matter into state-machine events."""
        rows = []
        for e in events:
            try:
                detail = json.loads(e.detail_json) if e.detail_json else {}
            except json.JSONDecodeError:
                detail = {"raw": e.detail_json[:1000]}
            rows.append(
                (e.job_id, rec.node_id, e.kind, e.generation, e.step, e.rank, e.time or self.clock(), detail)
            )
        self.store.add_events(rows)
        for e, row in zip(events, rows, strict=True):
            job_id = e.job_id
            if job_id not in self.jobs:
                continue
            try:  # the detail is free-form JSON from a rank: a field of the wrong type lands here too
                ev = self._machine_event(rec.node_id, e, row[7])
                if ev is None:
                    continue
                self._apply(job_id, ev, e.kind)
            except Exception:  # noqa: BLE001 - one bad event must not fail every later heartbeat
                log.exception("[job %s] could not apply %s from %s", job_id, e.kind, rec.node_id)
                self.store.add_events(
                    [
                        (
                            job_id,
                            rec.node_id,
                            CoordinatorEventKind.CONTROLLER_ERROR,
                            e.generation,
                            e.step,
                            e.rank,
                            self.clock(),
                            {"event": e.kind, "error": "see the coordinator log"},
                        )
                    ]
                )

    def _machine_event(self, node_id: str, e: types_pb2.Event, d: dict[str, Any]) -> m.Event | None:
        kind = e.kind
        if kind == AgentEventKind.WORKER_EXITED:
            reason = str(d.get("reason", ExitReason.CRASH))  # free-form JSON: maybe not a string
            if reason in FAILED_EXITS:
                return m.WorkerFailed(
                    node_id,
                    e.generation,
                    e.rank,
                    ExitReason(reason),
                    d.get("summary", ""),
                    _seconds(d.get("fault_age_s")),
                )
            return None  # a clean exit, or a standby's
        if kind == AgentEventKind.DIRECTIVE_REJECTED and d.get("kind") == "start":
            # The node refuses the job's launch (a program it does not allow, a path outside its
            # directories): none of its ranks will ever join, and waiting for the first-step deadline
            # would only escalate and leave a healthy node out. The job fails, naming the refusal.
            return m.WorkerFailed(node_id, e.generation, -1, ExitReason.CONFIG, str(d.get("error", ""))[:500])
        if kind == EventKind.COLLECTIVE_FAILED:
            return m.PeerWaiting(node_id, e.generation, e.step)
        if kind in (EventKind.JOINING, EventKind.STARTED):
            # Reached the generation's rendezvous (started: and formed it).
            return m.RankJoined(node_id, e.generation, e.rank)
        if kind in (EventKind.STRAGGLER, EventKind.STRAGGLER_CLEARED):
            return m.StragglerSeen(
                node_id,
                e.generation,
                e.step,
                e.rank,
                _straggler_detail(d),
                cleared=kind == EventKind.STRAGGLER_CLEARED,
            )
        if kind in DETECTORS:
            key = (e.job_id, e.generation, kind, e.step, int(d.get("request_epoch", 0)))
            if key in self._seen_detectors:  # every rank reports the same detection
                return None
            self._seen_detectors.add(key)
            onset = d.get("onset_window") or [-1]
            return m.Detector(
                EventKind(kind),
                node_id,
                e.generation,
                e.step,
                int(d.get("data_index", -1)),
                tuple(e.suspect_ranks),
                int(onset[0]),
                str(d.get("reason", ""))[:500],
                _step(d.get("rolls_back_to")),
            )
        if kind == EventKind.CHECKPOINT_COMMITTED:
            return m.CheckpointCommitted(
                e.generation,
                e.step,
                d.get("path", ""),
                d.get("fingerprint", ""),
                bool(d.get("verified", True)),
                bool(d.get("replicas_agree", True)),
                d.get("verify_reason", ""),
                int(d.get("request_epoch", 0)),
            )
        if kind == EventKind.ROLLBACK:
            return m.RollbackDone(e.generation, int(d.get("request_id", 0)), e.step)
        if kind == EventKind.ROLLBACK_UNAVAILABLE:
            return m.RollbackUnavailable(e.generation, int(d.get("request_id", 0)))
        if kind == EventKind.FINISHED:
            return m.RankFinished(e.generation, e.rank, d.get("fingerprint", ""), d.get("val_loss"), e.step)
        return None

    def _do_bisect(self, req: Any) -> dict[str, Any]:
        from coordinator.bisection.runner import BisectionError

        job_id = req.job_id
        if job_id and job_id not in self.jobs:
            raise NotFound(f"job {job_id!r} not found (see `stanchion job list`)")
        try:
            run = self.bisector.start(
                list(req.nodes),
                job_id=job_id,
                steps=req.trial_steps,
                group_size=req.group_size,
                p_show=req.p_show,
                delta=req.delta,
            )
        except BisectionError as e:
            raise Invalid(str(e)) from None
        return {
            "bisection_id": run.bisection_id,
            "job_id": run.job_id,
            "state": run.state,
            "data": run.to_json(),
        }

    def _do_noop(self, _: Any) -> None:
        return None

    # ------------------------------------------------------------------------------------------
    # Reads (safe from handlers: they only read immutable snapshots)
    def job(self, job_id: str = "") -> m.Job:
        if not job_id:
            if not self.job_order:
                raise NotFound("no jobs yet (submit one with `stanchion job submit SPEC.toml`)")
            return self.jobs[self.job_order[-1]]
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found (see `stanchion job list`)")
        return job

    def snapshot(self) -> dict[str, Any]:
        """A consistent-enough copy for metrics scrapes on another thread."""
        return {
            "jobs": dict(self.jobs),
            "nodes": {k: dataclasses.replace(v, outbox=[], workers=[]) for k, v in list(self.nodes.items())},
        }


def _seconds(value: Any) -> float:
    """A duration from an event's free-form JSON detail: 0.0 unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return max(float(value), 0.0)


def _step(value: Any) -> int:
    """A step from an event's free-form JSON detail: -1 (none) unless it is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return -1
    return value


def _straggler_detail(d: dict[str, Any]) -> str:
    """What a straggler event says, in words (its numbers are free-form JSON: checked here)."""
    ratio = _seconds(d.get("ratio"))
    if "own_s" not in d:
        return f"its compute over its peers' median is now {ratio:.2f}x"
    own, peers, window = _seconds(d.get("own_s")), _seconds(d.get("peers_s")), _seconds(d.get("window"))
    return (
        f"its own compute took {ratio:.2f}x its peers' median over {window:.0f} steps "
        f"({own:.4f}s against {peers:.4f}s)"
    )
