"""Chaos: a second fault while the job is still recovering from the first.

Each scenario crashes rank 1 at step 12, so generation 2 re-forms in place; a rank of generation 2
freezes as it joins (a fault-schedule entry), which holds the rendezvous open while the test lands
the second fault: that rank killed while the survivors wait to heal it, the replacement standby
killed before it joins, the coordinator killed and restarted, an agent killed and restarted. The
invariant is the same as for single faults: the job succeeds and ends on the fault-free state, bit
for bit. Every wait has a deadline and says what it waited for.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support import frozen_pids, golden, job_spec, prepare_data, reset_cluster, three_node_cluster

from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2

DATA = "fixture-512"
STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_data(tmp_path_factory.mktemp("secdata") / DATA)


@pytest.fixture(scope="module")
def golden3(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict:
    return golden(tmp_path_factory.mktemp("golden"), data, 3, STEPS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, data: Path):
    with three_node_cluster(tmp_path_factory.mktemp("second"), data, DATA) as c:
        yield c


def start(c: LocalCluster, name: str, frozen_node: str) -> tuple[str, int]:
    """Submit the job; return it and the pid of ``frozen_node``'s rank, frozen joining generation 2."""
    reset_cluster(c, 4)
    job_id = c.submit(
        job_spec(
            name,
            DATA,
            nodes=3,
            steps=STEPS,
            faults=[
                {"kind": "crash", "step": 12, "rank": 1},
                {"kind": "freeze", "at": "join", "step": 2, "node": frozen_node},
            ],
        )
    )
    pids = c.wait(
        lambda: frozen_pids(c.run_root, frozen_node), 120, f"{frozen_node}'s rank frozen joining generation 2"
    )
    assert c.job(job_id).generation == 2
    return job_id, pids[0]


def succeeded_on_golden(c: LocalCluster, job_id: str, golden_fp: str) -> list[str]:
    job = c.wait_job({"succeeded", "failed", "cancelled"}, 240, job_id)
    rs = [d.reason for d in c.explain(job_id).decisions]
    assert job.state == types_pb2.JOB_STATE_SUCCEEDED, (
        f"job ended in {types_pb2.JobState.Name(job.state)}: {rs}"
    )
    assert job.final_fingerprint == golden_fp, rs
    return rs


@pytest.mark.parametrize(
    ("node", "who"),
    [
        ("node-0", "a survivor that holds state, while the generation heals"),
        ("node-1", "the replacement standby"),
    ],
)
def test_a_rank_killed_before_the_re_formed_generation_steps(
    cluster: LocalCluster, golden3: dict, node: str, who: str
) -> None:
    job_id, pid = start(cluster, f"second-kill-{node}", node)
    print(f"[second fault] SIGKILL {who} on {node} (pid {pid})")
    cluster.signal_pid(pid, signal.SIGKILL)
    rs = succeeded_on_golden(cluster, job_id, golden3["fingerprint"])
    assert any(f"on {node} crashed" in r and "generation 3" in r for r in rs), rs


def test_the_coordinator_killed_while_a_generation_forms(cluster: LocalCluster, golden3: dict) -> None:
    job_id, pid = start(cluster, "second-coordinator", "node-2")
    cluster.kill_coordinator()
    cluster.start_coordinator()
    cluster.signal_pid(pid, signal.SIGCONT)  # the rendezvous completes under the new coordinator
    succeeded_on_golden(cluster, job_id, golden3["fingerprint"])


def test_an_agent_restarted_while_a_generation_forms(cluster: LocalCluster, golden3: dict) -> None:
    job_id, pid = start(cluster, "second-agent", "node-2")
    cluster.kill_agent("node-0")  # its ranks die with it
    cluster.restart_agent("node-0")
    cluster.signal_pid(pid, signal.SIGCONT)
    rs = succeeded_on_golden(cluster, job_id, golden3["fingerprint"])
    assert any("node-0" in r and "generation 3" in r for r in rs), rs
