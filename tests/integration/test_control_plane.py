"""The control plane end to end: a coordinator and agents as real processes on 127.0.0.1, real
faults (SIGKILL, SIGSTOP, killed agents and coordinators, injected NaNs, bit flips and mercurial
cores), and the invariant that the final state equals a fault-free run's, bit for bit."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from support import golden, job_spec, reset_cluster, three_node_cluster

from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion.vocab import EventKind

STEPS = 40
DATA = "fixture-512"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, small_data_module: Path):
    with three_node_cluster(tmp_path_factory.mktemp("cluster"), small_data_module, DATA) as c:
        yield c


@pytest.fixture(scope="module")
def small_data_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support import prepare_data

    return prepare_data(tmp_path_factory.mktemp("cpdata") / DATA)


@pytest.fixture(scope="module")
def golden3(tmp_path_factory: pytest.TempPathFactory, small_data_module: Path) -> dict:
    return golden(tmp_path_factory.mktemp("golden"), small_data_module, 3)


def reset(c: LocalCluster) -> None:
    """Every node eligible again, every agent up, before the next scenario."""
    reset_cluster(c, 4)


def run_job(c: LocalCluster, name: str, **kw) -> str:
    reset(c)
    return c.submit(job_spec(name, DATA, nodes=3, steps=kw.pop("steps", STEPS), **kw))


def progressed(c: LocalCluster, job_id: str, step: int) -> bool:
    return c.job(job_id).step >= step


def finish(c: LocalCluster, job_id: str, timeout: float = 240) -> object:
    job = c.wait_job({"succeeded", "failed", "cancelled"}, timeout, job_id)
    reasons = [d.reason for d in c.explain(job_id).decisions]
    assert job.state == types_pb2.JOB_STATE_SUCCEEDED, (
        f"job ended in {types_pb2.JobState.Name(job.state)}: {reasons}"
    )
    return job


def reasons(c: LocalCluster, job_id: str) -> list[str]:
    return [d.reason for d in c.explain(job_id).decisions]


def rank_pid(c: LocalCluster, job_id: str, rank: int) -> int:
    job = c.job(job_id)
    node = job.nodes[rank]
    live = [r for r in c.ranks(node) if r["generation"] == job.generation]
    assert live, f"no live rank on {node}"
    return live[-1]["pid"]


def test_rank_crash_heals_from_a_live_peer_without_losing_steps(cluster: LocalCluster, golden3: dict) -> None:
    job_id = run_job(cluster, "crash")
    cluster.wait(lambda: progressed(cluster, job_id, 12), 120, "step 12")
    cluster.signal_pid(rank_pid(cluster, job_id, 1), signal.SIGKILL)
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    assert job.restarts == 1
    assert any(
        "crashed: signal SIGKILL" in r and "heal the replacement from a live peer" in r
        for r in reasons(cluster, job_id)
    )
    healed = [
        e for e in cluster.events(EventKind.HEALED) if e.get("job_id") == job_id and e["generation"] == 2
    ]
    assert healed, "the replacement did not heal from a peer"


def test_a_collective_wedged_with_every_rank_alive_ends_at_its_deadline(
    cluster: LocalCluster, golden3: dict
) -> None:
    """Rank 2 blocks inside a collective that never completes, its peers in their all-reduce: all
    alive, all in a collective, so only a collective deadline ends it (gloo's own timeout is 300 s).
    Every rank's deadline here is twice the 3 s step limit (their collectives' usual durations are
    milliseconds), so the agents may take the peers in the same poll as rank 2 (then the job
    restores its checkpoint) or rank 2 alone (then the peers heal it): either way the job is
    recovering within seconds and ends on the fault-free state."""
    job_id = run_job(cluster, "wedge", faults=[{"kind": "wedge", "step": 12, "rank": 2}])
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    (fired,) = [e for e in cluster.events(EventKind.FAULT_INJECTED) if e.get("job_id") == job_id]
    decisions = [d for d in cluster.explain(job_id).decisions if "past its deadline" in d.reason]
    assert decisions, reasons(cluster, job_id)
    assert re.search(r"blocked in 'gradient all-reduce[^']*' for \d", decisions[0].reason), decisions[
        0
    ].reason
    # the deadline (6 s) and a poll after it, far from the backend's 300 s
    assert decisions[0].time - fired["t"] < 30, (decisions[0].time - fired["t"], decisions[0].reason)


def test_hung_rank_is_killed_by_its_agent_and_replaced(cluster: LocalCluster, golden3: dict) -> None:
    job_id = run_job(cluster, "hang")
    cluster.wait(lambda: progressed(cluster, job_id, 12), 120, "step 12")
    pid = rank_pid(cluster, job_id, 2)
    cluster.signal_pid(pid, signal.SIGSTOP)
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    assert_frozen_rank_detected_fast(reasons(cluster, job_id), rank=2)


def assert_frozen_rank_detected_fast(rs: list[str], rank: int) -> None:
    """The agent judged the stopped rank frozen from its silent heartbeat, not by a step limit, and
    within 0.5 s of its last heartbeat (which came no later than the SIGSTOP)."""
    hung = [r for r in rs if "hung" in r]
    assert len(hung) == 1 and f"rank {rank} " in hung[0], rs
    m = re.search(r"stopped by a signal \(process state T\): no heartbeat for ([0-9.]+)s", hung[0])
    assert m, hung[0]
    assert float(m.group(1)) <= 0.5, hung[0]


def test_a_rank_frozen_in_the_final_checkpoint_is_replaced_and_its_peers_keep_their_state(
    cluster: LocalCluster, golden3: dict
) -> None:
    # Rank 2 stops in the checkpoint after the last step, which every rank writes in the foreground:
    # its peers wait for it inside that checkpoint's collectives. They must be seen as waiting on a
    # peer (not killed as hung themselves, which left no live state and restored an older checkpoint),
    # and the end of training (evaluation, final checkpoint) is redone by the re-formed generation.
    job_id = run_job(
        cluster, "freeze-final", faults=[{"kind": "freeze", "step": STEPS, "rank": 2, "at": "checkpoint"}]
    )
    job = finish(cluster, job_id, timeout=180)
    why = reasons(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"], why
    assert_frozen_rank_detected_fast(why, rank=2)
    mine = [e for e in cluster.events() if e.get("job_id") == job_id]
    assert not [e for e in mine if e["event"] == EventKind.RESTORED], why
    healed = [e["step"] for e in mine if e["event"] == EventKind.HEALED and e["generation"] == 2]
    assert healed and set(healed) == {STEPS}, healed  # the replacement took the survivors' final state
    assert STEPS in [e["step"] for e in mine if e["event"] == EventKind.CHECKPOINT_COMMITTED]


@pytest.mark.parametrize("at", ["checkpoint", "commit"])
def test_a_rank_frozen_while_an_async_checkpoint_is_in_flight_does_not_wedge_the_recovery(
    cluster: LocalCluster, golden3: dict, at: str
) -> None:
    # Rank 2 stops (SIGSTOP, every thread) just before it joins the asynchronous checkpoint of
    # step 10 ("checkpoint"), or after writing its part and before the commit vote while its main
    # thread trains on ("commit"): its peers hold a checkpoint in flight that can never complete.
    # The agents detect the hang, the group re-forms, and the checkpoint is abandoned, never committed.
    job_id = run_job(cluster, f"freeze-{at}", faults=[{"kind": "freeze", "step": 10, "rank": 2, "at": at}])
    job = finish(cluster, job_id, timeout=180)
    assert job.final_fingerprint == golden3["fingerprint"], reasons(cluster, job_id)
    assert_frozen_rank_detected_fast(reasons(cluster, job_id), rank=2)
    committed = [
        e["step"] for e in cluster.events(EventKind.CHECKPOINT_COMMITTED) if e.get("job_id") == job_id
    ]
    assert 10 not in committed or any(
        e["step"] == 10 and e["generation"] > 1
        for e in cluster.events(EventKind.CHECKPOINT_COMMITTED)
        if e.get("job_id") == job_id
    ), committed


def test_a_generation_that_cannot_form_escalates_to_fresh_processes_then_leaves_the_node_out(
    cluster: LocalCluster, golden3: dict
) -> None:
    # Rank 1 crashes at step 12. The in-place generation 2 never forms: node-2's rank freezes as it
    # joins. Past the first-step deadline the recovery escalates to new processes from the last good
    # checkpoint (generation 3), where node-2's new rank freezes as it joins too; then node-2 is left
    # out and cordoned, and the spare takes its place. The run still ends on the fault-free state.
    job_id = run_job(
        cluster,
        "ladder",
        first_step_timeout_s=15,
        faults=[
            {"kind": "crash", "step": 12, "rank": 1},
            {"kind": "freeze", "at": "join", "step": 2, "node": "node-2"},
            {"kind": "freeze", "at": "join", "step": 3, "node": "node-2"},
        ],
    )
    job = finish(cluster, job_id, timeout=240)
    rs = reasons(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"], rs
    assert any(
        "generation 2 did not complete its first step within 15s" in r and "escalating to fresh" in r
        for r in rs
    ), rs
    assert any(
        "generation 3 did not complete its first step" in r and "leaving out node-2" in r for r in rs
    ), rs
    assert "node-2" not in job.nodes and "spare-0" in job.nodes
    cordoned = {n.node_id: n.reason for n in cluster.nodes() if n.state == types_pb2.NODE_STATE_CORDONED}
    assert "did not join generation 3" in cordoned.get("node-2", ""), cordoned


def test_a_straggler_is_named_and_under_the_replace_policy_a_spare_takes_its_place(
    cluster: LocalCluster, golden3: dict
) -> None:
    # node-2's rank sleeps 0.3 s at the start of each step from step 6 on (a slow machine follows the
    # machine, not the rank): its own compute is about ten times its peers'. Named after the warm-up
    # and a window of 5 steps, it is replaced by the spare, which heals from the survivors: no step
    # lost, and the run ends on the fault-free state. Its peers, slowed as much in wall time, are
    # never named. (A ratio of 3: three ranks share these two cores, and none must be named for it.)
    job_id = run_job(
        cluster,
        "straggler",
        straggler_policy="replace",
        faults=[{"kind": "slow", "node": "node-2", "from_step": 6, "delay_s": 0.3}],
        trainer={"integrity": {"straggler_window": 5, "straggler_ratio": 3.0}},
    )
    job = finish(cluster, job_id)
    rs = reasons(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"], rs
    named = [r for r in rs if "is a straggler" in r]
    assert len(named) == 1 and named[0].startswith("rank 2 on node-2 is a straggler at step "), rs
    assert "straggler_policy replace: a spare takes node-2's place" in named[0], named
    assert "node-2" not in job.nodes and "spare-0" in job.nodes, job.nodes
    mine = [e for e in cluster.events() if e.get("job_id") == job_id]
    reported = [e for e in mine if e["event"] == EventKind.STRAGGLER]
    assert [e["rank"] for e in reported] == [2] and reported[0]["ratio"] > 3.0, reported
    assert not [e for e in mine if e["event"] == EventKind.RESTORED], "the spare must heal from a peer"


@pytest.mark.parametrize("k", [1, 20])
def test_a_bit_flip_then_a_crash_of_the_flipped_rank_never_heals_the_damage_into_the_run(
    cluster: LocalCluster, golden3: dict, k: int
) -> None:
    # Rank 0's parameters take a bit flip at step 21; rank 0 is killed at step 23. Its corrupted
    # gradients may have reached the all-reduce, so every survivor may carry the damage while they
    # still agree with each other: a heal must not copy it. At K = 1 the flip is caught at its own
    # step (the majority names rank 0); at K = 20 the heal first goes back to the last agreement.
    job_id = run_job(
        cluster,
        f"flip-crash-k{k}",
        faults=[
            {"kind": "bitflip", "step": 21, "node": "node-0", "target": "param", "bit": 20},
            {"kind": "crash", "step": 23, "rank": 0},
        ],
        trainer={"integrity": {"fingerprint_every": k}},
    )
    job = finish(cluster, job_id)
    rs = reasons(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"], rs
    if k == 20:
        rolled = [e for e in cluster.events(EventKind.HEAL_ROLLBACK) if e.get("job_id") == job_id]
        assert rolled and all(e["step"] == 20 and e["from_step"] == 22 for e in rolled), rolled


def test_nan_is_replayed_in_place_and_leaves_no_trace(cluster: LocalCluster, golden3: dict) -> None:
    job_id = run_job(
        cluster,
        "nan",
        faults=[{"kind": "nan", "step": 15, "rank": 1}],
        trainer={"integrity": {"snapshot_every": 5, "fingerprint_every": 5}},
    )
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    rs = reasons(cluster, job_id)
    assert any("nonfinite at step 15: rolling back in place and replaying" in r for r in rs), rs
    assert job.restarts == 0


def test_a_nan_that_recurs_at_the_same_data_skips_that_window(cluster: LocalCluster, golden3: dict) -> None:
    # A poisoned batch: the NaN follows the data (index 14, trained at step 15), on every pass over it.
    job_id = run_job(
        cluster,
        "nan-data",
        faults=[{"kind": "nan", "data_index": 14, "rank": 1, "repeat": True}],
        trainer={"integrity": {"snapshot_every": 5, "fingerprint_every": 5}},
    )
    job = finish(cluster, job_id)
    rs = reasons(cluster, job_id)
    assert any("recurred at the same data" in r for r in rs), rs
    assert [(w.start, w.length) for w in job.skip_windows] == [(14, 8)]
    # Data skipped on purpose: the state differs, but the run is healthy and close to the clean one.
    assert job.final_fingerprint != golden3["fingerprint"]
    recs = [r for r in cluster.progress() if r.get("generation") == job.generation and r["rank"] == 0]
    by_step = {r["step"]: r["data_index"] for r in recs}
    assert by_step[15] == 14 + 8 and by_step[14] == 13
    val = [e for e in cluster.events(EventKind.FINISHED) if e.get("fingerprint") == job.final_fingerprint][0][
        "val_loss"
    ]
    assert abs(val - golden3["val_loss"]) / golden3["val_loss"] < 0.05


def test_a_named_fingerprint_mismatch_cordons_the_node_and_the_majority_heals_a_spare(
    cluster: LocalCluster, golden3: dict
) -> None:
    job_id = run_job(
        cluster,
        "flip",
        faults=[{"kind": "bitflip", "step": 14, "node": "node-2", "target": "param", "bit": 20}],
        trainer={"integrity": {"fingerprint_every": 2}},
    )
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    assert "node-2" not in job.nodes and "spare-0" in job.nodes
    cordoned = {n.node_id: n.reason for n in cluster.nodes() if n.state == types_pb2.NODE_STATE_CORDONED}
    assert "node-2" in cordoned and "diverged" in cordoned["node-2"]


def test_a_mercurial_core_named_by_the_audit_is_replaced_and_the_survivors_roll_back(
    cluster: LocalCluster, golden3: dict
) -> None:
    job_id = run_job(
        cluster,
        "audit",
        faults=[{"kind": "compute", "node": "node-1", "from_step": 12, "prob": 1.0}],
        trainer={"integrity": {"audit_every": 5, "fingerprint_every": 5, "snapshot_every": 5}},
    )
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"], reasons(cluster, job_id)
    assert "node-1" not in job.nodes
    assert any("audit at step 15" in r and "roll back to step 10" in r for r in reasons(cluster, job_id))


def test_a_restarted_agent_adopts_its_ranks_and_training_never_stops(
    cluster: LocalCluster, golden3: dict
) -> None:
    """An agent killed (a crash) and an agent restarted as `systemctl restart` does it (the hand-over
    signal): both nodes' ranks train on, the new agents adopt them, and nothing restarts."""
    from agent.daemon import HAND_OVER_SIGNAL
    from stanchion.vocab import CoordinatorEventKind

    # Paced steps (a `slow` fault changes timing only) so that both restarts land mid-run.
    job_id = run_job(cluster, "adopt", steps=80, faults=[{"kind": "slow", "from_step": 0, "delay_s": 0.3}])
    cluster.wait(lambda: progressed(cluster, job_id, 5), 120, "step 5")
    before = cluster.job(job_id)

    def pids(node: str) -> list[int]:  # this job's live ranks on the node
        return sorted(r["pid"] for r in cluster.ranks(node) if r["job_id"] == job_id)

    alive = {n: pids(n) for n in ("node-1", "node-2")}
    assert all(alive.values()), alive

    def adopted() -> set[str]:
        return {e.node_id for e in cluster.job_events(job_id) if e.kind == CoordinatorEventKind.RANKS_ADOPTED}

    cluster.kill_agent("node-1")  # SIGKILL: the agent crashed
    cluster.restart_agent("node-1")
    cluster.wait(lambda: "node-1" in adopted(), 60, "node-1's new agent to adopt its ranks")
    old = cluster.agents["node-2"]
    cluster.kill_agent("node-2", HAND_OVER_SIGNAL)
    assert old.popen.wait(30) == 0, cluster.tail(old)
    cluster.restart_agent("node-2")
    cluster.wait(lambda: "node-2" in adopted(), 60, "node-2's new agent to adopt its ranks")
    assert cluster.job(job_id).step < 80, "the restarts landed after the run: pace it slower"
    for node, before_pids in alive.items():  # the same processes, now the new agents' own
        assert pids(node) == before_pids, node

    job = finish(cluster, job_id)
    assert job.generation == before.generation and job.restarts == 0, reasons(cluster, job_id)
    assert job.final_fingerprint == golden(Path(cluster.root), cluster.data_root / DATA, 3, 80)["fingerprint"]


def test_node_loss_is_replaced_by_a_spare(cluster: LocalCluster, golden3: dict) -> None:
    job_id = run_job(cluster, "nodeloss")
    cluster.wait(lambda: progressed(cluster, job_id, 12), 120, "step 12")
    cluster.kill_node("node-1")  # the agent and its ranks
    job = finish(cluster, job_id)
    assert job.final_fingerprint == golden3["fingerprint"]
    assert "spare-0" in job.nodes and "node-1" not in job.nodes
    assert any("node-1 went silent" in r or "node node-1 lost" in r for r in reasons(cluster, job_id))


def test_without_a_spare_data_parallelism_shrinks_keeping_the_global_batch(
    cluster: LocalCluster, golden3: dict
) -> None:
    from protos.stanchion.v1 import operator_pb2

    reset(cluster)
    cluster.rpc("CordonNode", operator_pb2.CordonNodeRequest(node_id="spare-0", reason="test: no spare"))
    job_id = cluster.submit(job_spec("shrink", DATA, nodes=3, steps=STEPS))
    cluster.wait(lambda: progressed(cluster, job_id, 12), 120, "step 12")
    cluster.kill_node("node-2")
    job = finish(cluster, job_id)
    assert list(job.nodes) == ["node-0", "node-1"]
    assert any("shrinks from 3 to 2 nodes" in r for r in reasons(cluster, job_id))
    started = [
        e
        for e in cluster.events(EventKind.STARTED)
        if e.get("job_id") == job_id and e["generation"] == job.generation
    ]
    assert {e["world_size"] for e in started} == {2}
    final_gen = [
        r for r in cluster.progress() if r.get("job_id") == job_id and r["generation"] == job.generation
    ]
    assert final_gen and {r["micro_batches"] for r in final_gen} == {3}  # the global batch is kept
    val = [e for e in cluster.events(EventKind.FINISHED) if e.get("fingerprint") == job.final_fingerprint][0][
        "val_loss"
    ]
    assert abs(val - golden3["val_loss"]) / golden3["val_loss"] < 0.05


def test_coordinator_sigkill_mid_run_training_continues_and_nothing_restarts(
    cluster: LocalCluster, golden3: dict
) -> None:
    # Paced steps (a `slow` fault changes timing only) so the restart lands mid-run, not at the end.
    job_id = run_job(
        cluster, "coordkill", steps=80, faults=[{"kind": "slow", "from_step": 0, "delay_s": 0.15}]
    )
    cluster.wait(lambda: progressed(cluster, job_id, 10), 120, "step 10")
    before = cluster.job(job_id)
    cluster.kill_coordinator()

    def newest_step() -> int:  # of this job: an earlier one of the module may have run as long
        return max(r["step"] for r in cluster.progress() if r.get("job_id") == job_id)

    steps_before = newest_step()
    cluster.start_coordinator()
    job = finish(cluster, job_id)
    assert job.generation == before.generation and job.restarts == 0
    assert newest_step() > steps_before  # ranks trained while it was down
    assert any("reconciled" in r and "nothing restarted" in r for r in reasons(cluster, job_id))
    assert job.final_fingerprint == golden(Path(cluster.root), cluster.data_root / DATA, 3, 80)["fingerprint"]
