"""An agent applies directives in order and rejects stale ones (fencing by generation)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.config import AgentConfig
from agent.daemon import Agent
from protos.stanchion.v1 import agent_pb2


def agent(tmp_path: Path) -> Agent:
    return Agent(AgentConfig(node_id="node-a", insecure=True, run_root=str(tmp_path / "runs")))


def test_a_directive_of_an_older_generation_is_rejected(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a.group.job_id, a.group.generation = "job-1", 3
    called = []

    async def start(d: agent_pb2.Directive) -> None:
        called.append(d.generation)

    a.group.start_generation = start  # type: ignore[method-assign]
    old = agent_pb2.Directive(seq=1, job_id="job-1", generation=2, start=agent_pb2.StartWorkers())
    same = agent_pb2.Directive(seq=2, job_id="job-1", generation=3, start=agent_pb2.StartWorkers())
    rollback = agent_pb2.Directive(
        seq=3, job_id="job-1", generation=1, rollback=agent_pb2.Rollback(request_id=1)
    )
    newer = agent_pb2.Directive(seq=4, job_id="job-1", generation=4, start=agent_pb2.StartWorkers())
    for d in (old, same, rollback, newer):
        asyncio.run(a.apply(d))
    assert called == [4]
    stale = [json.loads(e.detail_json) for e in a.outbox if e.kind == "stale_directive"]
    assert [(s["kind"], s["current_generation"]) for s in stale] == [
        ("start", 3),
        ("start", 3),
        ("rollback", 3),
    ]


def test_a_directive_for_a_new_job_is_not_stale(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a.group.job_id, a.group.generation = "job-1", 7
    called = []

    async def start(d: agent_pb2.Directive) -> None:
        called.append((d.job_id, d.generation))

    a.group.start_generation = start  # type: ignore[method-assign]
    asyncio.run(
        a.apply(agent_pb2.Directive(seq=1, job_id="job-2", generation=1, start=agent_pb2.StartWorkers()))
    )
    assert called == [("job-2", 1)]
