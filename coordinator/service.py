"""gRPC servicers: validate every field, enqueue to the controller, translate the outcome.

Handlers never change state themselves. A malformed or out-of-range field is answered with
INVALID_ARGUMENT and a message naming it; unknown ids with NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from coordinator import machine as m
from coordinator.bisection.planner import MIN_P_SHOW
from coordinator.controller import Controller, Invalid, NodeRecord, NotFound
from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc, types_pb2
from stanchion.identity import NODE_ID_RE
from stanchion.settings import ConfigError

# \Z, not $: "$" also matches before a trailing newline, which would let "node-a\n" through.
ID_RE = NODE_ID_RE
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
# Enum fields are open in proto3 (any int32 arrives); only the values the API defines are accepted.
HEALTH_VERDICTS = frozenset(types_pb2.HealthVerdict.values())
WORKER_STATES = frozenset(types_pb2.WorkerState.values())
MAX_EVENTS = 1000
MAX_DETAIL = 64 * 1024
MAX_TEXT = 512

STATE_TO_PROTO = {
    m.JobState.PENDING: types_pb2.JOB_STATE_PENDING,
    m.JobState.RUNNING: types_pb2.JOB_STATE_RUNNING,
    m.JobState.RECOVERING: types_pb2.JOB_STATE_RECOVERING,
    m.JobState.BISECTING: types_pb2.JOB_STATE_BISECTING,
    m.JobState.SUCCEEDED: types_pb2.JOB_STATE_SUCCEEDED,
    m.JobState.FAILED: types_pb2.JOB_STATE_FAILED,
    m.JobState.CANCELLED: types_pb2.JOB_STATE_CANCELLED,
}
STATE_NAME_TO_PROTO = {s.value: p for s, p in STATE_TO_PROTO.items()}


class BadRequest(ValueError):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise BadRequest(message)


def check_id(value: str, field: str, pattern: re.Pattern[str] = ID_RE, *, optional: bool = False) -> None:
    if optional and not value:
        return
    check(
        bool(pattern.match(value)),
        f"{field}: {value[:80]!r} is not a valid id (letters, digits, '.', '_', '-')",
    )


def check_text(value: str, field: str, limit: int = MAX_TEXT) -> None:
    check(len(value) <= limit, f"{field}: longer than {limit} characters")


def check_finite(value: float, field: str) -> None:
    check(math.isfinite(value) and value >= 0, f"{field}: must be a finite number >= 0")


async def run(context: grpc.aio.ServicerContext, fn: Callable[[], Any]) -> Any:
    """Map domain errors to status codes; ``fn`` is awaited if it returns an awaitable."""
    try:
        out = fn()
        if asyncio.iscoroutine(out):
            out = await out
        return out
    except BadRequest as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except ConfigError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except NotFound as e:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except Invalid as e:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))


# ---------------------------------------------------------------------------------------------
# Conversions


def job_proto(job: m.Job) -> types_pb2.Job:
    from coordinator.jobspec import to_toml

    good = job.last_good
    return types_pb2.Job(
        job_id=job.job_id,
        name=job.spec.name,
        state=STATE_TO_PROTO[job.state],
        generation=job.generation,
        step=job.step,
        steps_total=_steps_total(job),
        nodes=list(job.members),
        restarts=job.restarts,
        created_time=job.created,
        updated_time=job.state_since,
        reason=job.reason,
        spec_toml=to_toml(job.spec),
        last_good_checkpoint_step=good.step if good else -1,
        skip_windows=[types_pb2.SkipWindow(start=s, length=n) for s, n in job.skip_windows],
        final_fingerprint=job.final_fingerprint,
        workers_per_node=job.spec.workers_per_node,
    )


def _steps_total(job: m.Job) -> int:
    if not job.spec.builtin:  # a program of the job's own: its step count is in its args
        return 0
    try:
        return job.spec.train_config().steps
    except ConfigError:
        return 0


def node_proto(rec: NodeRecord) -> types_pb2.Node:
    from google.protobuf.json_format import ParseDict

    inv = types_pb2.NodeInventory()
    ParseDict(rec.inventory, inv, ignore_unknown_fields=True)
    return types_pb2.Node(
        node_id=rec.node_id,
        state=rec.state,
        inventory=inv,
        health=rec.health,
        health_reason=rec.health_reason,
        last_heartbeat_time=rec.last_seen,
        job_id=rec.job_id,
        reason=rec.reason,
    )


# ---------------------------------------------------------------------------------------------
# Agent service


def validate_inventory(inv: types_pb2.NodeInventory) -> None:
    check_text(inv.host, "inventory.host", 253)
    check(len(inv.addresses) <= 16, "inventory.addresses: at most 16")
    for a in inv.addresses:
        check_text(a, "inventory.addresses[]", 64)
    check(len(inv.gpus) <= 64, "inventory.gpus: at most 64")
    for g in inv.gpus:
        check_text(g.uuid, "inventory.gpus[].uuid", 128)
        check_text(g.name, "inventory.gpus[].name", 128)
    check(0 <= inv.cpu_count <= 100_000, "inventory.cpu_count: out of range")
    check(1 <= inv.workers <= 64, "inventory.workers: must be between 1 and 64")
    check(1 <= inv.store_port <= 65535, "inventory.store_port: must be a port number")
    check_text(inv.agent_version, "inventory.agent_version", 64)


def validate_workers(workers: Any) -> None:
    check(len(workers) <= 64, "workers: at most 64")
    for w in workers:
        check(
            -1 <= w.local_rank < 64 and w.rank >= -1 and w.step >= 0, "workers[]: rank or step out of range"
        )
        check(w.state in WORKER_STATES, f"workers[].state: {w.state} is not a WorkerState")
        check_finite(w.step_time_s, "workers[].step_time_s")
        check_text(w.exit_reason, "workers[].exit_reason", 2048)


def validate_register(req: agent_pb2.RegisterRequest) -> None:
    check_id(req.node_id, "node_id")
    validate_inventory(req.inventory)
    check_id(req.job_id, "job_id", JOB_ID_RE, optional=True)
    check(req.generation >= 0, "generation: must be >= 0")
    validate_workers(req.workers)


def validate_heartbeat(req: agent_pb2.HeartbeatRequest) -> None:
    check_id(req.node_id, "node_id")
    check_id(req.job_id, "job_id", JOB_ID_RE, optional=True)
    check(req.generation >= 0, "generation: must be >= 0")
    check(req.last_step >= 0, "last_step: must be >= 0")
    check_finite(req.step_time_s, "step_time_s")
    check(req.acked_directive_seq >= 0, "acked_directive_seq: must be >= 0")
    validate_workers(req.workers)
    check(len(req.events) <= MAX_EVENTS, f"events: at most {MAX_EVENTS} per heartbeat")
    for e in req.events:
        check(bool(KIND_RE.match(e.kind)), f"events[].kind: {e.kind[:40]!r} is not a valid event name")
        check_id(e.job_id, "events[].job_id", JOB_ID_RE, optional=True)
        check(
            e.generation >= 0 and e.step >= 0 and e.seq >= 0,
            "events[]: generation, step and seq must be >= 0",
        )
        check(len(e.suspect_ranks) <= 4096, "events[].suspect_ranks: at most 4096")
        check(len(e.detail_json) <= MAX_DETAIL, f"events[].detail_json: larger than {MAX_DETAIL} bytes")
        check(math.isfinite(e.time), "events[].time: must be finite")
        if e.detail_json:
            try:
                check(
                    isinstance(json.loads(e.detail_json), dict), "events[].detail_json: must be a JSON object"
                )
            except json.JSONDecodeError:
                raise BadRequest("events[].detail_json: not valid JSON") from None
            except RecursionError:  # 64 KiB of '[' is within the size limit and beyond the parser's depth
                raise BadRequest("events[].detail_json: nested too deeply") from None
    check(req.health in HEALTH_VERDICTS, f"health: {req.health} is not a HealthVerdict")
    check_text(req.health_reason, "health_reason", 2048)
    check(len(req.traces) <= 64, "traces: at most 64")
    for t in req.traces:
        check(len(t.loss_bits) <= 100_000 and len(t.fingerprints) <= 100_000, "traces[]: too long")
        check_text(t.trial_id, "traces[].trial_id", 128)
        check_text(t.error, "traces[].error", 4096)


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, controller: Controller, limiter: Any = None, authorize: Any = None):
        self.c = controller
        self.limiter = limiter
        self.authorize = authorize  # async (context, node_id) -> None; aborts when not allowed

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RegisterResponse:
        async def go() -> agent_pb2.RegisterResponse:
            validate_register(request)
            if self.authorize is not None:
                await self.authorize(context, request.node_id)
            if self.limiter is not None:
                from coordinator.auth import require_rate

                await require_rate(context, self.limiter, "registration")
            return await self.c.submit("register", request)

        return await run(context, go)

    async def Heartbeat(
        self, request: agent_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HeartbeatResponse:
        async def go() -> agent_pb2.HeartbeatResponse:
            validate_heartbeat(request)
            if self.authorize is not None:
                await self.authorize(context, request.node_id)
            return await self.c.submit("heartbeat", request)

        return await run(context, go)


# ---------------------------------------------------------------------------------------------
# Operator service


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, controller: Controller):
        self.c = controller

    async def SubmitJob(
        self, request: operator_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.SubmitJobResponse:
        async def go() -> operator_pb2.SubmitJobResponse:
            check(0 < len(request.spec_toml.encode()) <= 64 * 1024, "spec_toml: must be 1 byte to 64 KiB")
            check_id(request.request_id, "request_id", JOB_ID_RE, optional=True)
            job = await self.c.submit("submit", (request.spec_toml, request.request_id))
            return operator_pb2.SubmitJobResponse(job=job_proto(job))

        return await run(context, go)

    async def GetJob(
        self, request: operator_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.GetJobResponse:
        def go() -> operator_pb2.GetJobResponse:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            return operator_pb2.GetJobResponse(job=job_proto(self.c.job(request.job_id)))

        return await run(context, go)

    async def ListJobs(
        self, request: operator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.ListJobsResponse:
        return operator_pb2.ListJobsResponse(jobs=[job_proto(self.c.jobs[j]) for j in self.c.job_order])

    async def CancelJob(
        self, request: operator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.CancelJobResponse:
        async def go() -> operator_pb2.CancelJobResponse:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            job = self.c.job(request.job_id)
            return operator_pb2.CancelJobResponse(job=job_proto(await self.c.submit("cancel", job.job_id)))

        return await run(context, go)

    async def ExplainJob(
        self, request: operator_pb2.ExplainJobRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.ExplainJobResponse:
        def go() -> operator_pb2.ExplainJobResponse:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            job = self.c.job(request.job_id)
            decisions = [
                types_pb2.Decision(
                    seq=d["seq"],
                    time=d["time"],
                    event=d["event"],
                    from_state=STATE_NAME_TO_PROTO[d["from_state"]],
                    to_state=STATE_NAME_TO_PROTO[d["to_state"]],
                    reason=d["reason"],
                    actions=d["actions"],
                    generation=d["generation"],
                )
                for d in self.c.store.decisions(job.job_id)
            ]
            bisections = [bisection_proto(b) for b in self.c.store.bisections(job.job_id)]
            return operator_pb2.ExplainJobResponse(
                job=job_proto(job), decisions=decisions, bisections=bisections
            )

        return await run(context, go)

    async def ListNodes(
        self, request: operator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.ListNodesResponse:
        return operator_pb2.ListNodesResponse(nodes=[node_proto(r) for _, r in sorted(self.c.nodes.items())])

    async def _node_op(
        self, kind: str, node_id: str, reason: str, context: grpc.aio.ServicerContext
    ) -> types_pb2.Node:
        async def go() -> types_pb2.Node:
            check_id(node_id, "node_id")
            check_text(reason, "reason")
            payload = node_id if kind == "uncordon" else (node_id, reason)
            return node_proto(await self.c.submit(kind, payload))

        return await run(context, go)

    async def CordonNode(
        self, request: operator_pb2.CordonNodeRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.CordonNodeResponse:
        return operator_pb2.CordonNodeResponse(
            node=await self._node_op("cordon", request.node_id, request.reason, context)
        )

    async def UncordonNode(
        self, request: operator_pb2.UncordonNodeRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.UncordonNodeResponse:
        return operator_pb2.UncordonNodeResponse(
            node=await self._node_op("uncordon", request.node_id, "", context)
        )

    async def DrainNode(
        self, request: operator_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.DrainNodeResponse:
        return operator_pb2.DrainNodeResponse(
            node=await self._node_op("drain", request.node_id, request.reason, context)
        )

    async def ListCheckpoints(
        self, request: operator_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.ListCheckpointsResponse:
        def go() -> operator_pb2.ListCheckpointsResponse:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            job = self.c.job(request.job_id)
            return operator_pb2.ListCheckpointsResponse(
                checkpoints=[
                    types_pb2.Checkpoint(
                        job_id=job.job_id,
                        step=c["step"],
                        path=c["path"],
                        good=c["good"],
                        reason=c["reason"],
                        time=c["time"],
                        fingerprint=c["fingerprint"],
                    )
                    for c in self.c.store.checkpoints(job.job_id)
                ]
            )

        return await run(context, go)

    async def StreamEvents(
        self, request: operator_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[operator_pb2.StreamEventsResponse]:
        try:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            check(request.after_seq >= 0, "after_seq: must be >= 0")
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        after = request.after_seq
        while True:
            rows = self.c.store.events(request.job_id, after, limit=1000)
            for r in rows:
                after = r["seq"]
                yield operator_pb2.StreamEventsResponse(
                    seq=r["seq"],
                    event=types_pb2.Event(
                        kind=r["kind"],
                        job_id=r["job_id"],
                        node_id=r["node_id"],
                        generation=r["generation"],
                        step=r["step"],
                        rank=r["rank"],
                        time=r["time"],
                        detail_json=json.dumps(r["data"], default=str),
                        suspect_ranks=r["data"].get("suspect_ranks", [])
                        if isinstance(r["data"].get("suspect_ranks"), list)
                        else [],
                    ),
                )
            if not rows and not request.follow:
                return
            if not rows:
                async with self.c.events_changed:
                    try:
                        await asyncio.wait_for(self.c.events_changed.wait(), timeout=1.0)
                    except TimeoutError:
                        pass

    async def StartBisection(
        self, request: operator_pb2.StartBisectionRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.StartBisectionResponse:
        async def go() -> operator_pb2.StartBisectionResponse:
            check_id(request.job_id, "job_id", JOB_ID_RE, optional=True)
            check(len(request.nodes) <= 4096, "nodes: at most 4096")
            for n in request.nodes:
                check_id(n, "nodes[]")
            check(len(set(request.nodes)) == len(request.nodes), "nodes: each node at most once")
            check(0 <= request.trial_steps <= 10_000, "trial_steps: must be between 0 and 10000")
            check(0 <= request.group_size <= 64, "group_size: must be between 0 and 64")
            check(
                request.p_show == 0.0 or MIN_P_SHOW <= request.p_show <= 1.0,
                f"p_show: must be 0 (deterministic) or a probability in [{MIN_P_SHOW:g}, 1]",
            )
            check(0.0 <= request.delta < 1.0, "delta: must be in [0, 1) (0: the default 1e-3)")
            if self.c.bisector is None:
                raise Invalid("bisection is not enabled on this coordinator")
            b = await self.c.submit("bisect", request)
            return operator_pb2.StartBisectionResponse(bisection=bisection_proto(b))

        return await run(context, go)

    async def GetBisection(
        self, request: operator_pb2.GetBisectionRequest, context: grpc.aio.ServicerContext
    ) -> operator_pb2.GetBisectionResponse:
        def go() -> operator_pb2.GetBisectionResponse:
            check_id(request.bisection_id, "bisection_id", JOB_ID_RE)
            for b in self.c.store.bisections():
                if b["bisection_id"] == request.bisection_id:
                    return operator_pb2.GetBisectionResponse(bisection=bisection_proto(b))
            raise NotFound(f"bisection {request.bisection_id!r} not found")

        return await run(context, go)


def bisection_proto(b: dict[str, Any]) -> types_pb2.Bisection:
    d = b["data"]
    return types_pb2.Bisection(
        bisection_id=b["bisection_id"],
        job_id=b["job_id"],
        state=b["state"],
        suspects=d.get("suspects", []),
        faulty=d.get("faulty", []),
        rounds=d.get("rounds", 0),
        confidence=d.get("confidence", 0.0),
        reference=d.get("reference", ""),
        reason=d.get("reason", ""),
        rounds_json=json.dumps(d.get("history", [])),
    )
