"""Ranks outlive their agent, and the next agent of the node adopts them (agent/workers.py ``adopt``,
stanchion/sdk/runtime.py ``AgentWatch``, the coordinator's registration rule): the pieces, each with
real processes where the kernel is what decides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.workers import EXIT_UNKNOWN, AdoptedProcess, WorkerGroup
from coordinator import machine as m
from coordinator.config import CoordinatorConfig
from coordinator.controller import Controller
from coordinator.store import Store
from diagnostics.bench import coordinator as bc
from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion import procs
from stanchion.files import JsonlTail, write_json_atomic
from stanchion.sdk import contract
from stanchion.sdk.contract import Assignment, WorkerPaths
from stanchion.sdk.runtime import AgentWatch
from stanchion.vocab import AgentEventKind, CoordinatorEventKind, EventKind, ExitReason

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sleeper():
    """A live process that is nobody's rank (what the tests adopt, watch or outlive)."""
    procs_started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        procs_started.append(p)
        return p

    yield start
    for p in procs_started:
        if p.poll() is None:
            p.kill()
        p.wait()


# ---- process identities ---------------------------------------------------------------------


def test_a_process_identity_tells_a_reused_pid_from_the_process_it_named(sleeper, tmp_path: Path) -> None:
    p = sleeper()
    ident = procs.identify(p.pid)
    assert ident is not None and ident.running()
    assert not procs.ProcId(p.pid, ident.start + 1).running()  # same pid, another start: a stranger
    write_json_atomic(tmp_path / "id.json", ident.to_json())
    assert procs.ProcId.read(tmp_path / "id.json") == ident
    (tmp_path / "bad.json").write_text('{"pid": 1}')
    assert procs.ProcId.read(tmp_path / "bad.json") is None and procs.ProcId.read(tmp_path / "none") is None
    p.kill()
    p.wait()
    assert not ident.running() and procs.identify(p.pid) is None


# ---- the rank's side: its orphan watch --------------------------------------------------------


def test_an_orphan_trains_on_for_the_grace_and_a_new_agent_adopts_it(sleeper, tmp_path: Path) -> None:
    agent_file = tmp_path / contract.AGENT_FILE
    first, second = sleeper(), sleeper()
    write_json_atomic(agent_file, procs.identify(first.pid).to_json())
    watch = AgentWatch(agent_file, grace_s=10.0)
    assert watch.check(0.0) and watch.orphaned_since is None
    first.kill()
    first.wait()
    assert watch.check(1.0) and watch.orphaned_since == 1.0  # orphaned: goes on
    assert watch.check(11.0)  # at the grace: still
    write_json_atomic(agent_file, procs.identify(second.pid).to_json())  # a new agent claims the node
    assert watch.check(11.5) and watch.orphaned_since is None
    second.kill()
    second.wait()
    assert watch.check(20.0)
    assert not watch.check(30.5)  # 10.5 s without an agent: give up


def test_an_orphan_nobody_adopts_exits_with_its_own_code_after_the_grace(sleeper, tmp_path: Path) -> None:
    worker = tmp_path / "workers" / "node-0" / "w00000"
    worker.mkdir(parents=True)
    agent = sleeper()
    write_json_atomic(worker.parent / contract.AGENT_FILE, procs.identify(agent.pid).to_json())
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        **{
            contract.ENV_PARENT_PID: str(agent.pid),
            contract.ENV_WORKER_DIR: str(worker),
            contract.ENV_ORPHAN_GRACE: "0.5",
        },
    )
    code = "from stanchion.sdk.runtime import watch_agent; import time; watch_agent(); print('up', flush=True); time.sleep(60)"
    rank = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "up"
        assert rank.poll() is None
        agent.kill()
        agent.wait()
        gone_at = time.monotonic()
        assert rank.wait(30) == contract.EXIT_ORPHANED
        assert time.monotonic() - gone_at >= 0.5  # not before the grace
    finally:
        if rank.poll() is None:
            rank.kill()
        rank.wait()


# ---- the agent's side: adoption ---------------------------------------------------------------


def append(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def leave_worker(base: Path, wid: int, pid: int, *, start: int | None = None) -> WorkerPaths:
    """What an agent leaves for its successor about one worker."""
    paths = WorkerPaths(base / f"w{wid:05d}")
    paths.control.mkdir(parents=True)
    ident = procs.identify(pid)
    assert ident is not None
    info = {"wid": wid, "pid": pid, "start": ident.start if start is None else start}
    write_json_atomic(
        paths.root / contract.WORKER_FILE, {**info, "program": ["-m", "trainer"], "spawned_at": 1.0}
    )
    return paths


def assignment(generation: int, rank: int) -> dict[str, Any]:
    return Assignment(
        generation=generation,
        rank=rank,
        world_size=4,
        local_rank=rank % 2,
        local_world_size=2,
        master_addr="127.0.0.1",
        master_port=1234,
        job_id="j",
    ).to_json()


def test_a_new_agent_adopts_live_ranks_where_they_stand_and_no_dead_or_foreign_process(
    sleeper, tmp_path: Path
) -> None:
    cfg = AgentConfig(node_id="node-1", insecure=True, run_root=str(tmp_path / "runs"))
    base = Path(cfg.run_root).resolve() / "workers" / "node-1"
    training, joining, standby, dead, stranger = sleeper(), sleeper(), sleeper(), sleeper(), sleeper()
    t = time.time()
    # rank 2: training in generation 3, its progress file longer than what is read back
    paths = leave_worker(base, 0, training.pid)
    write_json_atomic(paths.assignment_path(3), assignment(3, 2))
    append(paths.events, {"event": EventKind.STARTED, "generation": 3, "rank": 2, "t": t - 5})
    for step in range(1, 4001):
        append(paths.progress, {"generation": 3, "rank": 2, "step": step, "step_time_s": 0.05, "t": t - 4})
    # rank 3: left generation 3 and assigned generation 4, not yet formed
    paths = leave_worker(base, 1, joining.pid)
    write_json_atomic(paths.assignment_path(3), assignment(3, 3))
    write_json_atomic(paths.assignment_path(4), assignment(4, 3))
    append(paths.events, {"event": EventKind.STARTED, "generation": 3, "rank": 3, "t": t - 5})
    append(paths.progress, {"generation": 3, "rank": 3, "step": 7, "step_time_s": 0.05, "t": t - 4})
    append(paths.events, {"event": EventKind.COLLECTIVE_FAILED, "generation": 3, "rank": 3, "t": t - 3})
    # a warm standby
    paths = leave_worker(base, 2, standby.pid)
    append(paths.events, {"event": EventKind.STANDBY, "generation": -1, "rank": -1, "t": t - 9})
    # gone before the new agent came, and a pid now another process's
    leave_worker(base, 3, dead.pid)
    dead.kill()
    dead.wait()
    leave_worker(base, 4, stranger.pid, start=procs.identify(stranger.pid).start + 7)
    write_json_atomic(
        base / "agent-state.json",
        {"job_id": "j", "generation": 4, "config": "/c.json", "faults": "", "program": ["-m", "trainer"]},
    )

    group = WorkerGroup(cfg)
    adopted = {w.wid: w for w in group.adopt()}
    assert sorted(adopted) == [0, 1, 2]
    assert (group.job_id, group.generation, str(group.config_path), group.faults_path) == (
        "j",
        4,
        "/c.json",
        None,
    )
    assert procs.ProcId.read(base / contract.AGENT_FILE) == procs.identify(os.getpid())  # claimed
    w = adopted[0]
    assert (w.slot, w.rank, w.generation, w.state, w.step) == (0, 2, 3, types_pb2.WORKER_STATE_TRAINING, 4000)
    assert w.median_step_s() == 0.05 and w.reassigned_at == 0.0
    w = adopted[1]
    assert (w.slot, w.rank, w.generation, w.state) == (1, 3, 3, types_pb2.WORKER_STATE_WAITING)
    assert w.reassigned_at > 0  # a survivor assigned to generation 4 that has not re-formed yet
    w = adopted[2]
    assert (w.slot, w.rank, w.ready) == (None, -1, True)
    assert group._next_wid == 5  # a new worker never reuses a directory
    ranks = sorted((s.rank, s.state) for s in group.statuses())
    assert ranks == [
        (-1, types_pb2.WORKER_STATE_STANDBY),
        (2, types_pb2.WORKER_STATE_TRAINING),
        (3, types_pb2.WORKER_STATE_WAITING),
    ]
    assert group.poll() == []  # nothing read back is relayed

    training.kill()
    training.wait()
    exits = [(k, w.rank, rec) for k, w, rec in group.poll() if k == AgentEventKind.WORKER_EXITED]
    assert [(k, r) for k, r, _ in exits] == [(AgentEventKind.WORKER_EXITED, 2)]
    rec = exits[0][2]
    assert rec["exit_code"] == EXIT_UNKNOWN and rec["reason"] == ExitReason.CRASH
    assert "exit status unknown" in rec["summary"]


def test_an_adopted_process_is_signalled_and_awaited_by_its_identity(sleeper) -> None:
    import asyncio

    p = sleeper()
    proc = AdoptedProcess(procs.identify(p.pid))
    assert proc.returncode is None
    proc.kill()
    p.wait()  # the test is its parent: reap it, as init reaps a real orphan
    assert asyncio.run(asyncio.wait_for(proc.wait(), 10)) == EXIT_UNKNOWN
    proc.kill()  # gone: nothing is signalled, nothing raises


def test_a_progress_file_is_read_back_from_an_offset_without_a_torn_first_record(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"step": i}) + "\n" for i in range(10)]
    path.write_text("".join(lines))
    boundary = sum(len(x) for x in lines[:6])
    assert [r["step"] for r in JsonlTail(path, start=boundary).read()] == [6, 7, 8, 9]
    assert [r["step"] for r in JsonlTail(path, start=boundary + 3).read()] == [7, 8, 9]
    assert [r["step"] for r in JsonlTail(path, start=0).read()] == list(range(10))


# ---- the coordinator's side --------------------------------------------------------------------

SPEC = 'name = "adopt"\nnodes = 2\nworkers_per_node = 2\n[trainer]\nsteps = 100\n[trainer.data]\npath = "d"\nglobal_batch_size = 32\n'


def controller_with_job() -> tuple[Controller, str]:
    c = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))
    for i in range(2):
        c._do_register(agent_pb2.RegisterRequest(node_id=f"sim-{i:05d}", inventory=bc.inventory(i, 2)))
    job = c._do_submit((SPEC, ""))
    return c, job.job_id


def again(c: Controller, node: str, job_id: str, generation: int, ranks: list[int]) -> None:
    """``node``'s new agent registers, naming the ranks it adopted."""
    i = int(node.split("-")[1])
    c._do_register(
        agent_pb2.RegisterRequest(
            node_id=node,
            inventory=bc.inventory(i, 2),
            job_id=job_id,
            generation=generation,
            workers=[
                types_pb2.WorkerStatus(rank=r, local_rank=r % 2, state=types_pb2.WORKER_STATE_TRAINING)
                for r in ranks
            ],
        )
    )


def adopted_events(c: Controller, job_id: str) -> list[dict[str, Any]]:
    return [e for e in c.store.events(job_id) if e["kind"] == CoordinatorEventKind.RANKS_ADOPTED]


def test_a_member_whose_new_agent_adopted_all_its_ranks_goes_on_in_the_same_generation() -> None:
    c, job_id = controller_with_job()
    job = c.jobs[job_id]
    second = job.members[1]
    again(c, second, job_id, job.generation, [2, 3])
    after = c.jobs[job_id]
    assert (after.state, after.generation) == (m.JobState.RUNNING, job.generation)
    events = adopted_events(c, job_id)
    assert [(e["node_id"], e["data"]["ranks"]) for e in events] == [(second, [2, 3])]


@pytest.mark.parametrize(
    ("ranks", "generation_offset", "why"),
    [
        ([2], 0, "it adopted ranks [2] of its 2-3 only"),
        ([], 0, "its ranks did not outlive it"),
        ([2, 3], -1, "its ranks did not outlive it"),  # it adopted ranks of an older generation
    ],
)
def test_a_member_whose_ranks_did_not_all_outlive_its_agent_is_recovered(
    ranks: list[int], generation_offset: int, why: str
) -> None:
    c, job_id = controller_with_job()
    job = c.jobs[job_id]
    again(c, job.members[1], job_id, job.generation + generation_offset, ranks)
    after = c.jobs[job_id]
    assert after.generation == job.generation + 1 and after.state is m.JobState.RECOVERING
    assert not adopted_events(c, job_id)
    assert any(f"its agent restarted: {why}" in d["reason"] for d in c.store.decisions(job_id))


def test_the_first_nodes_agent_restarting_while_a_generation_forms_fails_that_generation() -> None:
    """Its rendezvous store went with the old agent, so adopted ranks could never meet there."""
    c, job_id = controller_with_job()
    first, second = c.jobs[job_id].members
    again(c, second, job_id, c.jobs[job_id].generation, [])  # the second node's ranks died: recovering
    forming = c.jobs[job_id]
    assert forming.state is m.JobState.RECOVERING and forming.members[0] == first
    again(c, first, job_id, forming.generation, [0, 1])
    assert c.jobs[job_id].generation == forming.generation + 1
    assert any("was forming at the rendezvous store" in d["reason"] for d in c.store.decisions(job_id))
