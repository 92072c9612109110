"""Bad input at the coordinator's RPC boundary, against the real services (coordinator/service.py)
running in-process on 127.0.0.1:0: every malformed or out-of-range field is answered with
INVALID_ARGUMENT and a message that names it, unknown ids with NOT_FOUND, and neither changes
anything (the controller's memory and every SQLite row are compared before and after). The CLI
turns those answers into its documented exit codes.

The coordinators here are plaintext (``insecure=True``) with no token file: every caller is
anonymous and may call everything, so authentication never stands in front of the validation under
test. tests/integration/test_security.py covers the gate itself; it imports the helpers below.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from support import REPO, env

from coordinator import server
from coordinator.config import CoordinatorConfig
from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc, types_pb2
from stanchion.vocab import EventKind

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

AGENT_RPCS = frozenset(m.name for m in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods)
OPERATOR_RPCS = frozenset(m.name for m in operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].methods)

# A data path the job specs below name (agents resolve it under their data root; nothing reads it here).
DATA = "fixture-512"


# ---------------------------------------------------------------------------------------------
# Helpers (test_security.py uses them too)


def config(tmp: Path, **overrides: Any) -> CoordinatorConfig:
    """A coordinator config for one test: port 0, no metrics, and no periodic surprises: nodes are
    not declared lost while a test runs (a tick that did so would change the state under test)."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state_db": str(tmp / "c.db"),
        "metrics_port": -1,
        "heartbeat_timeout_s": 600.0,
        "tick_s": 5.0,
    }
    if "tls_dir" not in overrides:
        base["insecure"] = True
    return CoordinatorConfig(**{**base, **overrides})


@contextlib.asynccontextmanager
async def coordinator(cfg: CoordinatorConfig) -> AsyncIterator[server.Running]:
    running = await server.build(cfg)
    try:
        yield running
    finally:
        await running.stop(0)


def state(running: server.Running) -> dict[str, Any]:
    """Everything a call could change: every SQLite row (read through a separate read-only
    connection, so only committed data counts) and the controller's jobs and nodes in memory."""
    db = sqlite3.connect(f"file:{running.controller.cfg.state_db}?mode=ro", uri=True)
    try:
        tables = [
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        db.close()
    return {"db": rows, **memory(running)}


def memory(running: server.Running) -> dict[str, Any]:
    """The controller's jobs and nodes (what a call changes besides SQLite rows)."""
    c = running.controller
    nodes = {
        n: (
            r.inventory,
            r.state,
            r.reason,
            r.last_seen,
            r.health,
            r.health_reason,
            r.job_id,
            r.generation,
            r.step,
            r.step_time_s,
            r.last_event_seq,
            r.acked,
            [d.SerializeToString() for d in r.outbox],
        )
        for n, r in c.nodes.items()
    }
    return {"jobs": dict(c.jobs), "job_order": list(c.job_order), "nodes": nodes}


class Client:
    """Calls any Stanchion RPC by name and returns (status code, response or details)."""

    def __init__(self, channel: grpc.aio.Channel):
        self.operator = operator_pb2_grpc.OperatorServiceStub(channel)
        self.agent = agent_pb2_grpc.AgentServiceStub(channel)

    async def __call__(
        self, rpc: str, request: Any, *, metadata: Any = None, timeout: float = 5.0
    ) -> tuple[grpc.StatusCode, Any]:
        stub: Any = self.agent if rpc in AGENT_RPCS else self.operator
        try:
            if rpc == "StreamEvents":
                return OK, [r async for r in stub.StreamEvents(request, timeout=timeout, metadata=metadata)]
            return OK, await getattr(stub, rpc)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""


@contextlib.asynccontextmanager
async def client(port: int, creds: grpc.ChannelCredentials | None = None) -> AsyncIterator[Client]:
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
    async with channel:
        yield Client(channel)


def inventory(**changes: Any) -> types_pb2.NodeInventory:
    fields: dict[str, Any] = {
        "host": "host-a",
        "addresses": ["127.0.0.1"],
        "gpus": [types_pb2.GpuInfo(index=0, uuid="GPU-0", name="H100", memory_total_bytes=80 << 30)],
        "cpu_count": 8,
        "memory_total_bytes": 64 << 30,
        "agent_version": "0.1.0",
        "workers": 1,
        "store_port": 29500,
    }
    return types_pb2.NodeInventory(**{**fields, **changes})


def register(node_id: str, **inv: Any) -> agent_pb2.RegisterRequest:
    return agent_pb2.RegisterRequest(node_id=node_id, inventory=inventory(**inv))


def spec_toml(
    name: str = "job", *, nodes: int = 1, min_nodes: int = 1, top: str = "", trainer: str = "", data: str = ""
) -> str:
    """A small job spec; ``top``, ``trainer`` and ``data`` are extra TOML lines for each table."""
    return (
        f'name = "{name}"\nnodes = {nodes}\nmin_nodes = {min_nodes}\n{top}\n'
        f'[trainer]\npreset = "tiny"\nsteps = 40\n{trainer}\n'
        f'[trainer.data]\npath = "{DATA}"\n{data}\n'
    )


def expect(
    failures: list[str], what: str, got: tuple[grpc.StatusCode, Any], code: grpc.StatusCode, text: str = ""
) -> None:
    """Record a mismatch instead of stopping at the first one, so a table reports every bad row."""
    status, details = got
    if status != code or (text and text not in str(details)):
        failures.append(f"{what}: expected {code.name} {text!r}, got {status.name} {str(details)[:200]!r}")


# ---------------------------------------------------------------------------------------------
# Agent RPCs: a table over every field validate_heartbeat and validate_inventory check


def good_heartbeat(seq: int) -> agent_pb2.HeartbeatRequest:
    """A heartbeat the coordinator accepts (and would record: a fresh event seq, a new last-seen time)."""
    return agent_pb2.HeartbeatRequest(
        node_id="node-a",
        job_id="",
        generation=0,
        last_step=0,
        step_time_s=0.25,
        workers=[
            types_pb2.WorkerStatus(
                local_rank=0, rank=-1, state=types_pb2.WORKER_STATE_STANDBY, pid=123, step=0, step_time_s=0.0
            )
        ],
        events=[
            types_pb2.Event(
                kind="health", generation=0, step=0, rank=-1, time=1.0, detail_json='{"a": 1}', seq=seq
            )
        ],
        health=types_pb2.HEALTH_VERDICT_HEALTHY,
        health_reason="ok",
        acked_directive_seq=0,
    )


def _event(**fields: Any) -> types_pb2.Event:
    return types_pb2.Event(**{"kind": "health", "seq": 10**9, "time": 1.0, **fields})


def _worker(**fields: Any) -> types_pb2.WorkerStatus:
    return types_pb2.WorkerStatus(
        **{"local_rank": 0, "rank": 0, "state": types_pb2.WORKER_STATE_TRAINING, **fields}
    )


def _trace(**fields: Any) -> agent_pb2.Trace:
    return agent_pb2.Trace(**{"trial_id": "t-1", "node_id": "node-a", **fields})


# (case, change to a good heartbeat, the start of the expected message: the field it names)
HEARTBEAT_CASES: list[tuple[str, Callable[[agent_pb2.HeartbeatRequest], Any], str]] = [
    ("empty node id", lambda r: setattr(r, "node_id", ""), "node_id:"),
    ("node id with a space", lambda r: setattr(r, "node_id", "node a"), "node_id:"),
    ("node id with a slash", lambda r: setattr(r, "node_id", "../node-a"), "node_id:"),
    ("node id with a trailing newline", lambda r: setattr(r, "node_id", "node-a\n"), "node_id:"),
    ("node id of 64 characters", lambda r: setattr(r, "node_id", "n" * 64), "node_id:"),
    ("node id starting with '-'", lambda r: setattr(r, "node_id", "-node"), "node_id:"),
    ("job id with a NUL", lambda r: setattr(r, "job_id", "job\x00"), "job_id:"),
    ("job id of 129 characters", lambda r: setattr(r, "job_id", "j" * 129), "job_id:"),
    ("negative generation", lambda r: setattr(r, "generation", -1), "generation:"),
    ("negative last step", lambda r: setattr(r, "last_step", -1), "last_step:"),
    ("NaN step time", lambda r: setattr(r, "step_time_s", math.nan), "step_time_s:"),
    ("infinite step time", lambda r: setattr(r, "step_time_s", math.inf), "step_time_s:"),
    ("negative step time", lambda r: setattr(r, "step_time_s", -0.5), "step_time_s:"),
    ("negative acked seq", lambda r: setattr(r, "acked_directive_seq", -1), "acked_directive_seq:"),
    ("65 workers", lambda r: r.workers.extend([_worker()] * 64), "workers:"),
    ("worker local rank -2", lambda r: r.workers.append(_worker(local_rank=-2)), "workers[]:"),
    ("worker local rank 64", lambda r: r.workers.append(_worker(local_rank=64)), "workers[]:"),
    ("worker rank -2", lambda r: r.workers.append(_worker(rank=-2)), "workers[]:"),
    ("worker step -1", lambda r: r.workers.append(_worker(step=-1)), "workers[]:"),
    ("worker state 99", lambda r: r.workers.append(_worker(state=99)), "workers[].state:"),
    (
        "worker NaN step time",
        lambda r: r.workers.append(_worker(step_time_s=math.nan)),
        "workers[].step_time_s:",
    ),
    (
        "worker -inf step time",
        lambda r: r.workers.append(_worker(step_time_s=-math.inf)),
        "workers[].step_time_s:",
    ),
    (
        "worker exit reason too long",
        lambda r: r.workers.append(_worker(exit_reason="x" * 2049)),
        "workers[].exit_reason:",
    ),
    ("1001 events", lambda r: r.events.extend(_event(seq=2000 + i) for i in range(1001)), "events:"),
    ("event kind with capitals", lambda r: r.events.append(_event(kind="Hang")), "events[].kind:"),
    ("event kind empty", lambda r: r.events.append(_event(kind="")), "events[].kind:"),
    (
        "event kind with a shell character",
        lambda r: r.events.append(_event(kind="hang;reboot")),
        "events[].kind:",
    ),
    ("event kind of 65 characters", lambda r: r.events.append(_event(kind="k" * 65)), "events[].kind:"),
    ("event job id bad", lambda r: r.events.append(_event(job_id="../job")), "events[].job_id:"),
    ("event generation -1", lambda r: r.events.append(_event(generation=-1)), "events[]:"),
    ("event step -1", lambda r: r.events.append(_event(step=-1)), "events[]:"),
    ("event seq -1", lambda r: r.events.append(_event(seq=-1)), "events[]:"),
    (
        "event with 4097 suspects",
        lambda r: r.events.append(_event(suspect_ranks=[1] * 4097)),
        "events[].suspect_ranks:",
    ),
    (
        "event detail over 64 KiB",
        lambda r: r.events.append(_event(detail_json='{"a": "' + "x" * 65536 + '"}')),
        "events[].detail_json:",
    ),
    ("event NaN time", lambda r: r.events.append(_event(time=math.nan)), "events[].time:"),
    ("event infinite time", lambda r: r.events.append(_event(time=math.inf)), "events[].time:"),
    (
        "event detail not JSON",
        lambda r: r.events.append(_event(detail_json="{not json")),
        "events[].detail_json:",
    ),
    ("event detail a list", lambda r: r.events.append(_event(detail_json="[1, 2]")), "events[].detail_json:"),
    ("event detail a string", lambda r: r.events.append(_event(detail_json='"x"')), "events[].detail_json:"),
    (
        "event detail nested 30000 deep",
        lambda r: r.events.append(_event(detail_json='{"a": ' + "[" * 30000 + "]" * 30000 + "}")),
        "events[].detail_json:",
    ),
    ("health verdict 99", lambda r: setattr(r, "health", 99), "health:"),
    ("health reason too long", lambda r: setattr(r, "health_reason", "x" * 2049), "health_reason:"),
    ("65 traces", lambda r: r.traces.extend([_trace()] * 65), "traces:"),
    ("trace with 100001 losses", lambda r: r.traces.append(_trace(loss_bits=["0"] * 100_001)), "traces[]:"),
    (
        "trace with 100001 fingerprints",
        lambda r: r.traces.append(_trace(fingerprints=["0"] * 100_001)),
        "traces[]:",
    ),
    ("trace id too long", lambda r: r.traces.append(_trace(trial_id="t" * 129)), "traces[].trial_id:"),
    ("trace error too long", lambda r: r.traces.append(_trace(error="e" * 4097)), "traces[].error:"),
]

# (case, RegisterRequest, the start of the expected message)
REGISTER_CASES: list[tuple[str, agent_pb2.RegisterRequest, str]] = [
    ("empty node id", register(""), "node_id:"),
    ("node id with a trailing newline", register("node-b\n"), "node_id:"),
    ("node id with path characters", register("../../etc"), "node_id:"),
    ("host too long", register("node-b", host="h" * 254), "inventory.host:"),
    ("17 addresses", register("node-b", addresses=["10.0.0.1"] * 17), "inventory.addresses:"),
    ("address too long", register("node-b", addresses=["a" * 65]), "inventory.addresses[]:"),
    ("65 GPUs", register("node-b", gpus=[types_pb2.GpuInfo(index=0)] * 65), "inventory.gpus:"),
    (
        "GPU uuid too long",
        register("node-b", gpus=[types_pb2.GpuInfo(uuid="u" * 129)]),
        "inventory.gpus[].uuid:",
    ),
    (
        "GPU name too long",
        register("node-b", gpus=[types_pb2.GpuInfo(name="n" * 129)]),
        "inventory.gpus[].name:",
    ),
    ("negative CPU count", register("node-b", cpu_count=-1), "inventory.cpu_count:"),
    ("CPU count 100001", register("node-b", cpu_count=100_001), "inventory.cpu_count:"),
    ("no workers", register("node-b", workers=0), "inventory.workers:"),
    ("65 workers", register("node-b", workers=65), "inventory.workers:"),
    ("store port 0", register("node-b", store_port=0), "inventory.store_port:"),
    ("store port 65536", register("node-b", store_port=65536), "inventory.store_port:"),
    ("negative store port", register("node-b", store_port=-1), "inventory.store_port:"),
    ("agent version too long", register("node-b", agent_version="v" * 65), "inventory.agent_version:"),
]


def test_every_bad_agent_field_is_invalid_argument_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            assert (await call("Register", register("node-a")))[0] == OK
            # The good heartbeat is accepted, so each case below fails for its one change alone.
            assert (await call("Heartbeat", good_heartbeat(seq=1)))[0] == OK
            before = state(running)
            failures: list[str] = []
            for i, (case, change, field) in enumerate(HEARTBEAT_CASES):
                req = good_heartbeat(seq=100 + i)
                change(req)
                code, details = await call("Heartbeat", req)
                expect(failures, f"Heartbeat, {case}", (code, details), INVALID)
                if code == INVALID and not details.startswith(field):
                    failures.append(f"Heartbeat, {case}: message {details[:120]!r} does not name {field!r}")
            for case, req, field in REGISTER_CASES:
                code, details = await call("Register", req)
                expect(failures, f"Register, {case}", (code, details), INVALID)
                if code == INVALID and not details.startswith(field):
                    failures.append(f"Register, {case}: message {details[:120]!r} does not name {field!r}")
            assert not failures, "\n".join(failures)
            assert state(running) == before, "a refused agent call changed the coordinator's state"
            # The controls: the same messages without the bad field are accepted and recorded.
            assert (await call("Register", register("node-b")))[0] == OK
            assert (await call("Heartbeat", good_heartbeat(seq=2)))[0] == OK
            assert state(running) != before

    asyncio.run(main())


def test_an_event_with_malformed_detail_for_a_running_job_is_not_an_internal_error(tmp_path: Path) -> None:
    """The detail of a relayed event is free-form JSON from a trainer rank; the fields the controller
    reads from it (data_index, onset_window, request_id, ...) may have any type. A heartbeat carrying
    such an event must still be answered (OK, the event stored, or INVALID_ARGUMENT, nothing stored)."""

    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            assert (await call("Register", register("node-a")))[0] == OK
            code, reply = await call("SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=spec_toml()))
            assert code == OK and reply.job.state == types_pb2.JOB_STATE_RUNNING, reply
            job = reply.job
            failures = []
            for i, (kind, detail) in enumerate(
                [
                    (EventKind.NONFINITE, '{"data_index": "x"}'),
                    (EventKind.SPIKE, '{"onset_window": 5}'),
                    (EventKind.ROLLBACK, '{"request_id": "x"}'),
                ]
            ):
                hb = good_heartbeat(seq=10 + i)
                event = types_pb2.Event(
                    kind=kind, job_id=job.job_id, generation=job.generation, step=3, seq=100 + i, time=1.0
                )
                event.detail_json = detail
                hb.events.append(event)
                before = state(running)
                code, details = await call("Heartbeat", hb)
                if code not in (OK, INVALID) or (code == INVALID and state(running) != before):
                    failures.append(f"{kind} {detail}: {code.name} {str(details)[:120]!r}")
            assert not failures, "\n".join(failures)

    asyncio.run(main())


def test_an_unknown_node_heartbeating_is_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            before = state(running)
            req = good_heartbeat(seq=1)
            req.node_id = "ghost-7"
            code, details = await call("Heartbeat", req)
            assert code == NOT_FOUND
            assert details == "node 'ghost-7' is not registered: register first"
            assert state(running) == before

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Operator RPCs

_BISECT_FIELDS = operator_pb2.StartBisectionRequest.DESCRIPTOR.fields_by_name

# (case, rpc, request, the start of the expected message)
OPERATOR_CASES: list[tuple[str, str, Any, str]] = [
    ("empty spec", "SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=""), "spec_toml:"),
    (
        "spec over 64 KiB",
        "SubmitJob",
        operator_pb2.SubmitJobRequest(spec_toml="#" * (64 * 1024 + 1)),
        "spec_toml:",
    ),
    (
        "request id with a space",
        "SubmitJob",
        operator_pb2.SubmitJobRequest(spec_toml=spec_toml(), request_id="a b"),
        "request_id:",
    ),
    ("job id with '/'", "GetJob", operator_pb2.GetJobRequest(job_id="a/b"), "job_id:"),
    ("job id of 129 characters", "GetJob", operator_pb2.GetJobRequest(job_id="j" * 129), "job_id:"),
    ("job id with a newline", "GetJob", operator_pb2.GetJobRequest(job_id="job\n"), "job_id:"),
    ("job id '..'", "CancelJob", operator_pb2.CancelJobRequest(job_id=".."), "job_id:"),
    ("job id with unicode", "ExplainJob", operator_pb2.ExplainJobRequest(job_id="jöb"), "job_id:"),
    ("job id with a NUL", "ListCheckpoints", operator_pb2.ListCheckpointsRequest(job_id="\x00"), "job_id:"),
    ("empty node id", "CordonNode", operator_pb2.CordonNodeRequest(node_id=""), "node_id:"),
    ("node id with a newline", "CordonNode", operator_pb2.CordonNodeRequest(node_id="node-a\n"), "node_id:"),
    (
        "cordon reason too long",
        "CordonNode",
        operator_pb2.CordonNodeRequest(node_id="node-a", reason="r" * 513),
        "reason:",
    ),
    ("node id with a space", "UncordonNode", operator_pb2.UncordonNodeRequest(node_id="node a"), "node_id:"),
    ("node id with ';'", "DrainNode", operator_pb2.DrainNodeRequest(node_id="a;b"), "node_id:"),
    (
        "drain reason too long",
        "DrainNode",
        operator_pb2.DrainNodeRequest(node_id="node-a", reason="r" * 513),
        "reason:",
    ),
    # follow=True: a bad request must end at once instead of waiting for events.
    (
        "stream job id bad",
        "StreamEvents",
        operator_pb2.StreamEventsRequest(job_id="a b", follow=True),
        "job_id:",
    ),
    (
        "stream after_seq -1",
        "StreamEvents",
        operator_pb2.StreamEventsRequest(after_seq=-1, follow=True),
        "after_seq:",
    ),
    ("bisection job id bad", "StartBisection", operator_pb2.StartBisectionRequest(job_id="a b"), "job_id:"),
    (
        "4097 bisection nodes",
        "StartBisection",
        operator_pb2.StartBisectionRequest(nodes=["n"] * 4097),
        "nodes:",
    ),
    (
        "bisection node id bad",
        "StartBisection",
        operator_pb2.StartBisectionRequest(nodes=["node-a", "x y"]),
        "nodes[]:",
    ),
    (
        "bisection node listed twice",
        "StartBisection",
        operator_pb2.StartBisectionRequest(nodes=["node-a", "node-a"]),
        "nodes:",
    ),
    ("trial steps -1", "StartBisection", operator_pb2.StartBisectionRequest(trial_steps=-1), "trial_steps:"),
    (
        "trial steps 10001",
        "StartBisection",
        operator_pb2.StartBisectionRequest(trial_steps=10_001),
        "trial_steps:",
    ),
    ("group size -1", "StartBisection", operator_pb2.StartBisectionRequest(group_size=-1), "group_size:"),
    ("group size 65", "StartBisection", operator_pb2.StartBisectionRequest(group_size=65), "group_size:"),
    *(
        [
            ("p_show NaN", "StartBisection", operator_pb2.StartBisectionRequest(p_show=math.nan), "p_show:"),
            ("p_show 1.5", "StartBisection", operator_pb2.StartBisectionRequest(p_show=1.5), "p_show:"),
            # found by the raw-bytes fuzz test: a subnormal p_show made 1 - p_show == 1.0, log(1) == 0
            ("p_show 5e-324", "StartBisection", operator_pb2.StartBisectionRequest(p_show=5e-324), "p_show:"),
            ("p_show 0.001", "StartBisection", operator_pb2.StartBisectionRequest(p_show=0.001), "p_show:"),
        ]
        if "p_show" in _BISECT_FIELDS
        else []
    ),
    *(
        [
            ("delta 1", "StartBisection", operator_pb2.StartBisectionRequest(delta=1.0), "delta:"),
            ("delta -inf", "StartBisection", operator_pb2.StartBisectionRequest(delta=-math.inf), "delta:"),
        ]
        if "delta" in _BISECT_FIELDS
        else []
    ),
    (
        "empty bisection id",
        "GetBisection",
        operator_pb2.GetBisectionRequest(bisection_id=""),
        "bisection_id:",
    ),
    (
        "bisection id bad",
        "GetBisection",
        operator_pb2.GetBisectionRequest(bisection_id="../b"),
        "bisection_id:",
    ),
]


async def _with_job_and_node(call: Client) -> str:
    """A registered node-a and a PENDING job (it wants two nodes), so a call that got through would
    have something to change."""
    assert (await call("Register", register("node-a")))[0] == OK
    code, reply = await call(
        "SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=spec_toml(nodes=2, min_nodes=2))
    )
    assert code == OK, reply
    assert reply.job.state == types_pb2.JOB_STATE_PENDING
    return reply.job.job_id


def test_every_bad_operator_field_is_invalid_argument_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            await _with_job_and_node(call)
            before = state(running)
            failures: list[str] = []
            for case, rpc, req, field in OPERATOR_CASES:
                code, details = await call(rpc, req)
                expect(failures, f"{rpc}, {case}", (code, details), INVALID)
                if code == INVALID and not details.startswith(field):
                    failures.append(f"{rpc}, {case}: message {details[:120]!r} does not name {field!r}")
            assert not failures, "\n".join(failures)
            assert state(running) == before, "a refused operator call changed the coordinator's state"

    asyncio.run(main())


def test_unknown_jobs_nodes_and_bisections_are_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            failures: list[str] = []
            code, details = await call("GetJob", operator_pb2.GetJobRequest())
            expect(failures, "GetJob of the newest job, with none", (code, details), NOT_FOUND, "no jobs yet")
            await _with_job_and_node(call)
            before = state(running)
            missing_job = "nope-12345678"
            for rpc, req in [
                ("GetJob", operator_pb2.GetJobRequest(job_id=missing_job)),
                ("ExplainJob", operator_pb2.ExplainJobRequest(job_id=missing_job)),
                ("CancelJob", operator_pb2.CancelJobRequest(job_id=missing_job)),
                ("ListCheckpoints", operator_pb2.ListCheckpointsRequest(job_id=missing_job)),
            ]:
                expect(failures, rpc, await call(rpc, req), NOT_FOUND, f"job {missing_job!r} not found")
            for rpc, req in [
                ("CordonNode", operator_pb2.CordonNodeRequest(node_id="ghost", reason="bad fan")),
                ("UncordonNode", operator_pb2.UncordonNodeRequest(node_id="ghost")),
                ("DrainNode", operator_pb2.DrainNodeRequest(node_id="ghost", reason="bad fan")),
            ]:
                expect(failures, rpc, await call(rpc, req), NOT_FOUND, "node 'ghost' is not registered")
            expect(
                failures,
                "GetBisection",
                await call("GetBisection", operator_pb2.GetBisectionRequest(bisection_id="b-ghost")),
                NOT_FOUND,
                "bisection 'b-ghost' not found",
            )
            assert not failures, "\n".join(failures)
            assert state(running) == before

    asyncio.run(main())


def test_a_job_spec_with_unknown_keys_is_refused_naming_the_key(tmp_path: Path) -> None:
    cases = [
        (spec_toml(top="node = 2"), "unknown key 'node'"),  # a typo of `nodes`
        (spec_toml(top='output_dir = "/tmp/x"'), "unknown key 'output_dir'"),
        (spec_toml(trainer="step = 10"), "unknown key 'trainer.step'"),
        (spec_toml(trainer="[trainer.model]\nn_layers = 2"), "unknown key 'trainer.model.n_layers'"),
        (spec_toml(data="shuffle = true"), "unknown key 'trainer.data.shuffle'"),
        (
            spec_toml(top='faults = [{kind = "crash", step = 3, when = "now"}]'),
            "unknown key 'faults[0].when'",
        ),
    ]

    async def main() -> None:
        async with coordinator(config(tmp_path)) as running, client(running.port) as call:
            before = state(running)
            failures: list[str] = []
            for text, key in cases:
                got = await call("SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=text))
                expect(failures, key, got, INVALID, key)
            assert not failures, "\n".join(failures)
            assert state(running) == before
            assert (await call("SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=spec_toml())))[0] == OK

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# The CLI: one line on stderr and the documented exit code


def test_cli_maps_not_found_and_invalid_argument_to_exit_codes(tmp_path: Path) -> None:
    async def cli(port: int, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "diagnostics.cli",
            *args,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--insecure",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return proc.returncode or 0, out.decode(), err.decode()

    async def main() -> None:
        async with coordinator(config(tmp_path)) as running:
            before = state(running)
            (rc_missing, out_missing, err_missing), (rc_bad, out_bad, err_bad) = await asyncio.gather(
                cli(running.port, "node", "cordon", "nope"), cli(running.port, "node", "cordon", "no pe")
            )
            assert state(running) == before
        assert rc_missing == 3, (rc_missing, err_missing)
        assert out_missing == ""
        assert err_missing.splitlines() == [
            "error: node 'nope' is not registered (see `stanchion node list`)"
        ]
        assert rc_bad == 2, (rc_bad, err_bad)
        assert out_bad == ""
        lines = err_bad.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: node_id: 'no pe' is not a valid id"), lines

    asyncio.run(main())
