"""Chaos: seeded random real faults against a running cluster, damaged checkpoints, a full disk and a
network partition. The invariant: the final state equals the fault-free run's, bit for bit, or the
run fails with the documented reason. The random kills and stops must end in success: recovering is
the product, so a run that gives up fails the test. Every test prints its seed; STANCHION_TEST_SEED
replays one.

Bounded by default (a few faults per run); STANCHION_CHAOS_FAULTS=N runs N faults per schedule (the
random test's time limit grows with N).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import frozen_pids, golden, job_spec, prepare_data, run_trainer, trainer_cmd

from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion.files import read_jsonl
from stanchion.sdk.manifest import step_dir_name
from stanchion.vocab import EventKind

DATA = "fixture-512"
STEPS = 60
FAULTS = int(os.environ.get("STANCHION_CHAOS_FAULTS", "3"))
KINDS = ("rank_kill", "rank_stop", "agent_kill", "agent_stop", "coordinator_kill", "coordinator_stop")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_data(tmp_path_factory.mktemp("chaosdata") / DATA)


@pytest.fixture(scope="module")
def golden2(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict:
    return golden(tmp_path_factory.mktemp("golden"), data, 2, STEPS)


def new_cluster(root: Path, data: Path, **kw) -> LocalCluster:
    c = LocalCluster(root, tls=False, hang_floor_s=3.0, stop_grace_s=10.0, heartbeat_timeout_s=8.0, **kw)
    shutil.copytree(data, c.data_root / DATA)
    return c


def finished(c: LocalCluster, job_id: str, timeout: float = 400) -> object:
    return c.wait_job({"succeeded", "failed", "cancelled"}, timeout, job_id)


def reasons(c: LocalCluster, job_id: str) -> list[str]:
    return [d.reason for d in c.explain(job_id).decisions]


DOCUMENTED_FAILURES = ("giving up", "rendezvous timed out", "rejected the job's configuration")
ENDED = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED)


def check_invariant(c: LocalCluster, job_id: str, golden_fp: str, *, must_succeed: bool = False) -> None:
    """Success with the fault-free final state; or, unless ``must_succeed``, a documented failure."""
    job = c.job(job_id)
    rs = reasons(c, job_id)
    state = types_pb2.JobState.Name(job.state)
    if job.state == types_pb2.JOB_STATE_SUCCEEDED:
        assert job.final_fingerprint == golden_fp, rs
    elif must_succeed:
        raise AssertionError(f"the job did not succeed ({state}): {job.reason}\n" + "\n".join(rs))
    else:
        failed = job.state == types_pb2.JOB_STATE_FAILED
        assert failed and any(d in job.reason for d in DOCUMENTED_FAILURES), (state, rs)


@pytest.mark.slow
@pytest.mark.timeout(300 + 60 * max(0, FAULTS - 3))
def test_random_kills_and_stops_of_ranks_agents_and_the_coordinator(
    tmp_path: Path, data: Path, golden2: dict, seed: int
) -> None:
    rng = random.Random(seed)
    schedule = sorted(
        (
            (rng.randrange(8, STEPS - 15), rng.choice(KINDS), rng.choice(["node-0", "node-1"]))
            for _ in range(FAULTS)
        ),
        key=lambda x: x[0],
    )
    print(f"[chaos] seed {seed}: {schedule}")
    c = new_cluster(tmp_path / "cluster", data)
    try:
        c.start_coordinator()
        for n in ("node-0", "node-1"):
            c.start_agent(n)
        for s in ("spare-0", "spare-1"):
            c.start_agent(s, spare=True)
        c.wait_warm()
        job_id = c.submit(job_spec("chaos", DATA, nodes=2, steps=STEPS, checkpoint_every=10))
        for step, kind, node in schedule:
            # Each fault waits for a RUNNING job (a job still recovering from the last one is waited for,
            # not let off the rest of its schedule); only the end of the job ends the schedule early.
            c.wait(
                lambda step=step: (
                    (j := c.job(job_id)).state in ENDED
                    or (j.step >= step and j.state == types_pb2.JOB_STATE_RUNNING)
                ),
                300,
                f"step {step} while running",
            )
            job = c.job(job_id)
            if job.state in ENDED:
                print(
                    f"[chaos] the job ended ({types_pb2.JobState.Name(job.state)}) before the fault at step {step}"
                )
                break
            target = node if node in job.nodes else job.nodes[0]
            print(f"[chaos] step {job.step}: {kind} on {target}")
            if kind in ("rank_kill", "rank_stop"):
                ranks = [r for r in c.ranks(target) if r["generation"] == job.generation]
                if ranks:
                    c.signal_pid(ranks[0]["pid"], signal.SIGKILL if kind == "rank_kill" else signal.SIGSTOP)
            elif kind == "agent_kill":
                c.kill_agent(target)
                c.restart_agent(target)
            elif kind == "agent_stop":
                c.send_signal(c.agents[target], signal.SIGSTOP)
                time.sleep(12)  # past the heartbeat timeout: the node is lost and replaced
                c.send_signal(c.agents[target], signal.SIGCONT)
            elif kind == "coordinator_kill":
                c.kill_coordinator()
                c.start_coordinator()
            elif kind == "coordinator_stop":
                c.send_signal(c.coordinator, signal.SIGSTOP)
                time.sleep(4)
                c.send_signal(c.coordinator, signal.SIGCONT)
            c.wait(
                lambda: c.job(job_id).state in (types_pb2.JOB_STATE_RUNNING, *ENDED),
                120,
                "the job to run again",
            )
        finished(c, job_id, timeout=400 + 60 * max(0, FAULTS - 3))
        check_invariant(c, job_id, golden2["fingerprint"], must_succeed=True)
    finally:
        c.stop()


def test_rotten_checkpoints_fall_back_to_the_previous_good_one(
    tmp_path: Path, data: Path, golden2: dict, seed: int
) -> None:
    """The newest checkpoint is truncated and the one before has a flipped bit; then every rank dies,
    so nobody can heal from a peer. The coordinator names the newest good checkpoint it knows; the
    ranks find it rotten, fall back, report why, and the run still ends bit-identical."""
    rng = random.Random(seed)
    print(f"[chaos] seed {seed}")
    # The test holds every rank stopped while it damages the checkpoints: the agents must not take
    # the stopped ranks for frozen ones in that time.
    c = new_cluster(tmp_path / "cluster", data, frozen_after_s=600.0)
    try:
        c.start_coordinator()
        for n in ("node-0", "node-1"):
            c.start_agent(n)
        c.wait_warm()
        job_id = c.submit(job_spec("rot", DATA, nodes=2, steps=STEPS, checkpoint_every=5))
        c.wait(lambda: c.job(job_id).last_good_checkpoint_step >= 25, 300, "three good checkpoints")
        # Freeze every rank first: no checkpoint commits while the files are damaged. A checkpoint is
        # on disk (its manifest written) before the coordinator hears of it, so the newest one the
        # coordinator knows is read first and everything on disk newer than it is damaged too:
        # whichever the coordinator names, the ranks meet both kinds of rot on their way back.
        nodes = c.job(job_id).nodes
        pids = sorted(r["pid"] for n in nodes for r in c.ranks(n))
        for pid in pids:
            c.signal_pid(pid, signal.SIGSTOP)
        c.wait(
            lambda: sorted(p for n in nodes for p in frozen_pids(c.run_root, n)) == pids,
            30,
            "every rank stopped",
        )
        known = c.job(job_id).last_good_checkpoint_step
        root = c.run_root / job_id / "checkpoints"
        committed = sorted(p for p in root.glob("step-*") if (p / "manifest.json").exists())
        newest = root / step_dir_name(known)
        assert newest in committed, (newest, committed)
        before = committed[committed.index(newest) - 1]
        for ck in committed[committed.index(newest) :]:
            f = next(p for p in sorted(ck.iterdir()) if p.suffix == ".distcp")
            f.write_bytes(f.read_bytes()[: -rng.randrange(1, 200)])
        g = next(p for p in sorted(before.iterdir()) if p.suffix == ".distcp")
        raw = bytearray(g.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        g.write_bytes(bytes(raw))
        for pid in pids:  # every rank at once: no live peer to heal from
            c.signal_pid(pid, signal.SIGKILL)
        finished(c, job_id)
        check_invariant(c, job_id, golden2["fingerprint"])
        skipped = {
            Path(e["path"]).name for e in c.events(EventKind.CHECKPOINT_SKIPPED) if e.get("job_id") == job_id
        }
        assert {newest.name, before.name} <= skipped
    finally:
        c.stop()


def test_a_full_disk_during_a_checkpoint_fails_atomically_and_training_continues(
    tmp_path: Path, data: Path, golden2: dict
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and must run as root (make test runs as root in CI)")
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    # Room for about one checkpoint of the small model (params + AdamW state: ~1.6 MB).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(ckpt)], check=True)
    try:
        r = run_trainer(trainer_cmd(data, run, nproc=2, steps=STEPS, extra=["--checkpoint-every", "10"]))
        assert r.returncode == 0, r.stderr[-3000:]
        events = read_jsonl(run / "ranks/rank-00000/events.jsonl")
        # Whichever rank's write hit the full disk reports why; the others name that rank.
        failed = [
            e
            for rank in ("rank-00000", "rank-00001")
            for e in read_jsonl(run / "ranks" / rank / "events.jsonl")
            if e["event"] == EventKind.CHECKPOINT_FAILED
        ]
        committed = [e for e in events if e["event"] == EventKind.CHECKPOINT_COMMITTED]
        assert failed, "the disk never filled up"
        # The short write surfaces as ENOSPC or as torch's serializer error, depending on where it
        # fell; the free space reported with each failure shows the cause either way.
        assert committed and all(e["free_bytes"] < committed[0]["bytes"] for e in failed), failed
        assert all(e["error"].startswith("rank ") for e in failed), failed
        assert committed and committed[0]["step"] == 10
        done = [e for e in events if e["event"] == EventKind.FINISHED][-1]
        assert done["fingerprint"] == golden2["fingerprint"]  # training was never disturbed
        from stanchion.sdk import manifest as mf

        for entry in mf.scan(ckpt):  # nothing half-written counts as committed
            assert (not entry.committed) or mf.verify(entry.path).ok
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], check=False)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def partitionable_cluster(root: Path, data: Path) -> Iterator[tuple[LocalCluster, Callable[[], None]]]:
    """node-0, spare-0 and the coordinator on the host; node-1's agent and ranks in their own network
    namespace behind a veth pair. Yields the cluster and the cut: taking the link down partitions
    node-1 without a connection reset reaching anyone."""
    if shutil.which("ip") is None:
        pytest.fail("`ip` (iproute2) is missing: run `make system-deps` or apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (make test runs as root in CI)")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"stn{tag}", f"sth{tag}", f"stn{tag}"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"this machine does not allow network namespaces: {e.stderr.decode().strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", "10.231.0.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", "10.231.0.2/24", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        c = new_cluster(root, data, host="10.231.0.1")
        try:
            c.start_coordinator()
            c.start_agent("node-0", extra=["--host", "10.231.0.1"], env={"GLOO_SOCKET_IFNAME": host_if})
            c.start_agent(
                "node-1",
                extra=["--host", "10.231.0.2"],
                env={"GLOO_SOCKET_IFNAME": ns_if},
                wrap=["ip", "netns", "exec", ns],
            )
            c.start_agent(
                "spare-0", spare=True, extra=["--host", "10.231.0.1"], env={"GLOO_SOCKET_IFNAME": host_if}
            )
            c.wait_warm()
            yield c, lambda: _ip("link", "set", host_if, "down")
        finally:
            c.stop()
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def ended_without_node_1(c: LocalCluster, job_id: str, golden_fp: str) -> list[str]:
    job = finished(c, job_id, timeout=500)
    rs = reasons(c, job_id)
    assert job.state == types_pb2.JOB_STATE_SUCCEEDED, rs
    assert "node-1" not in job.nodes and any("node-1" in r and ("lost" in r or "silent" in r) for r in rs), rs
    assert job.final_fingerprint == golden_fp, rs
    return rs


def test_a_network_partition_of_one_agent(tmp_path: Path, data: Path, golden2: dict) -> None:
    """Cutting node-1's link partitions it: no connection reset reaches the survivors. The node is
    declared lost, the survivor stuck in a collective is freed by its agent, and the job finishes on
    node-0 and a spare, bit-identical to the fault-free run."""
    with partitionable_cluster(tmp_path / "cluster", data) as (c, cut):
        job_id = c.submit(job_spec("partition", DATA, nodes=2, steps=STEPS, checkpoint_every=5))
        c.wait(lambda: c.job(job_id).step >= 20, 300, "step 20")
        cut()
        ended_without_node_1(c, job_id, golden2["fingerprint"])


def test_a_network_partition_during_the_rendezvous(tmp_path: Path, data: Path, golden2: dict) -> None:
    """A second fault while a generation forms: rank 1 crashes at step 12, generation 2 re-forms in
    place, and node-0's survivor freezes as it joins (holding the rendezvous open) while node-1 is
    cut off. Resumed, the survivor must leave generation 2's rendezvous for the one without node-1
    and heal the spare from its own state: the fault-free final state, no step lost to a restore."""
    with partitionable_cluster(tmp_path / "cluster", data) as (c, cut):
        job_id = c.submit(
            job_spec(
                "partition-rdzv",
                DATA,
                nodes=2,
                steps=STEPS,
                faults=[
                    {"kind": "crash", "step": 12, "rank": 1},
                    {"kind": "freeze", "at": "join", "step": 2, "node": "node-0"},
                ],
            )
        )
        pids = c.wait(
            lambda: frozen_pids(c.run_root, "node-0"), 120, "node-0's rank frozen joining generation 2"
        )
        assert c.job(job_id).generation == 2
        cut()
        c.wait(lambda: c.job(job_id).generation >= 3, 120, "a generation decided without the cut-off node-1")
        c.signal_pid(pids[0], signal.SIGCONT)
        rs = ended_without_node_1(c, job_id, golden2["fingerprint"])
        assert not any("restoring checkpoint" in r for r in rs), f"the survivor's state was given up: {rs}"
