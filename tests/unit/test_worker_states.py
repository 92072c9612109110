"""How an agent reads a rank's state from the records it writes (agent/workers.py ``poll``): the
order of a rank's own records decides, not the order in which one poll happens to read two files."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.config import AgentConfig
from agent.workers import Worker, WorkerGroup
from protos.stanchion.v1 import types_pb2
from stanchion.sdk import liveness
from stanchion.sdk.contract import WorkerPaths
from stanchion.vocab import EventKind


def fake_proc(pid: int) -> Any:
    proc = SimpleNamespace(returncode=None, pid=pid, signals=[])
    proc.send_signal = proc.signals.append
    proc.kill = lambda: proc.signals.append(signal.SIGKILL)
    return proc


def append(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def test_a_step_read_after_the_rank_left_its_generation_does_not_make_it_training_again(
    tmp_path: Path,
) -> None:
    """What cost steps in a recovery (bench goodput: 2 of 17 runs here, once in CI): a peer crashed
    as step 69 began; the survivor finished step 68, its all-reduce of step 69 failed, and it waited
    for its next assignment. One poll read both records, the `collective_failed` event first, then
    the progress record of step 68: that record, written before the rank left, turned it back to
    training, and with no step for 1 s outside any collective the agent killed the survivor as hung,
    so the next generation had no live state to heal from and restored a checkpoint (8 steps lost)."""
    cfg = AgentConfig(node_id="node-0", insecure=True, run_root=str(tmp_path / "runs"), hang_floor_s=1.0)
    group = WorkerGroup(cfg)
    root = tmp_path / "w00004"
    root.mkdir()
    w = Worker(4, fake_proc(4242), WorkerPaths(root), 0.0, job_id="j", slot=0, rank=0, generation=4)
    w.state = types_pb2.WORKER_STATE_STARTING
    group.workers.append(w)
    t = time.time()
    w.assigned_at = w.last_progress_at = t - 0.1
    base = {"generation": 4, "job_id": "j", "rank": 0}
    append(w.paths.events, {"event": EventKind.STARTED, "t": t - 0.05, "step": 67, **base})
    group.poll(now=t)
    assert w.state == types_pb2.WORKER_STATE_STARTING
    # the step, then the failed collective, both written before the agent's next poll
    append(w.paths.progress, {"step": 68, "t": t - 0.02, "step_time_s": 0.01, **base})
    append(w.paths.events, {"event": EventKind.COLLECTIVE_FAILED, "t": t - 0.01, "step": 68, **base})
    group.poll(now=t)
    assert w.state == types_pb2.WORKER_STATE_WAITING
    # alive, waiting for its assignment (not in a collective), for longer than the hang floor
    (root / liveness.HEARTBEAT_FILE).write_bytes(liveness.Beat(4242, t + 5.0, 68).encode())
    group.poll(now=t + 5.0)
    assert not w.hung and w.proc.signals == [], "the survivor waiting for its assignment was killed as hung"
    assert w.state == types_pb2.WORKER_STATE_WAITING
    # a step it trains after it left (a later record) still counts: a new generation formed
    append(
        w.paths.events, {"event": EventKind.STARTED, "t": t + 5.1, "step": 68, **{**base, "generation": 5}}
    )
    append(w.paths.progress, {"step": 69, "t": t + 5.2, "step_time_s": 0.01, **{**base, "generation": 5}})
    group.poll(now=t + 5.3)
    assert w.state == types_pb2.WORKER_STATE_TRAINING and w.step == 69
