"""`stanchion bench agent-restart`: what an agent's crash costs training, adopted or not.

Two local clusters train the same job side by side (a coordinator, 2 nodes of 1 worker and a spare
node each, plaintext gRPC). In each trial, once the job completed ``kill_step``, node-1's agent gets
SIGKILL and is started again at once (as systemd's ``Restart=on-failure`` would):

- **adopted** (the product default): the ranks outlive their agent and the new agent adopts them.
- **ranks die with the agent** (``--orphan-grace-s 0``: Stanchion's earlier behaviour, and what any
  launcher whose workers are its children gets, torchrun's included): node-1's rank dies with its
  agent, and the job recovers as from a crash (a new generation, the replacement healed from the
  live peer).

Measured from the fault, per trial: the **training time lost**: from rank 0's last step completed
before the kill to its first step completed at least 1 s after the new agent served (and, for the
old behaviour, after the first step of the recovered generation), minus the time those steps take
at the median step interval before the kill; **lost steps** (the newest step before the kill minus
the step training went on from); whether a **new generation** was needed; and, for adoption, the
kill to the coordinator's ``ranks_adopted`` event. Trials alternate in ABBA order.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diagnostics.bench.common import BenchError, Progress, envelope, goal, interleaved, median, ratio
from diagnostics.bench.recovery import (
    NODES,
    Tail,
    job_records,
    job_spec,
    live_rank,
    model_sets,
    newest_step_before,
    start_cluster,
    wait_standbys,
)
from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion import procs
from stanchion.vocab import CoordinatorEventKind, EventKind
from stanchion.waiting import wait_until

SYSTEMS = ("adopted", "ranks die")
TARGET = NODES[1]  # the agent killed: not the one hosting the rendezvous store
SETTLE_S = 1.0  # the window ends this long after the new agent served (and the job recovered)


def time_lost(
    records: Sequence[Mapping[str, Any]], killed_t: float, settled_t: float
) -> tuple[float, int] | None:
    """(seconds lost, steps in the window) from rank 0's progress ``records`` (one job, time
    order not assumed): the window runs from rank 0's last record before ``killed_t`` to its first
    record at or after ``settled_t``; the seconds lost are the window's length minus the steps it
    holds at the median interval between rank 0's records before the kill. None when the records
    do not cover the window (the job ended too soon: give it more steps)."""
    rank0 = sorted((r for r in records if r.get("rank") == 0), key=lambda r: r["t"])
    before = [r for r in rank0 if r["t"] <= killed_t]
    after = [r for r in rank0 if r["t"] >= settled_t]
    if len(before) < 3 or not after:
        return None
    intervals = [b["t"] - a["t"] for a, b in zip(before, before[1:], strict=False)]
    start, end = before[-1], after[0]
    steps = int(end["step"]) - int(start["step"])
    return max(0.0, end["t"] - start["t"] - steps * statistics.median(intervals)), steps


def agent_trial(
    cluster: LocalCluster,
    *,
    name: str,
    data_name: str,
    steps: int,
    kill_step: int,
    sets: Mapping[str, Any],
    timeout_s: float,
    progress: Progress,
) -> dict[str, Any]:
    """One job; SIGKILL node-1's agent once the job completed ``kill_step``, and start it again."""
    wait_standbys(cluster, 120.0)
    job_id = cluster.submit(job_spec(name, data_name, steps=steps, checkpoint_every=steps, sets=sets))
    tail = Tail(cluster.run_root, "workers/*/w*/progress.jsonl")

    def reached() -> dict[str, Any] | None:
        tail.poll()
        recs = [r for r in tail.records if r.get("job_id") == job_id and r["step"] >= kill_step]
        return recs[-1] if recs else None

    generation = int(
        wait_until(reached, timeout_s, f"{name}: step {kill_step}", interval_s=0.01)["generation"]
    )
    pid, _ = wait_until(
        lambda: live_rank(cluster, job_id, 1, generation), 30.0, f"{name}: rank 1's pid", interval_s=0.01
    )
    killed_t = time.time()
    cluster.kill_agent(TARGET)
    cluster.restart_agent(TARGET)  # returns once the new agent serves (it adopted what it found)
    served_t = time.time()
    survived = procs.identify(pid) is not None
    progress(
        f"  {name}: SIGKILL the agent of {TARGET}; its successor served after {served_t - killed_t:.2f} s"
    )
    job = cluster.wait_job({"succeeded", "failed", "cancelled"}, timeout_s, job_id)
    if job.state != types_pb2.JOB_STATE_SUCCEEDED:
        raise BenchError(f"{name}: job {job_id} ended in state {job.state}: {job.reason}")
    recs = job_records(cluster.progress(), job_id)
    newer = [r["t"] for r in recs if r["t"] > killed_t and int(r.get("generation", 0)) > generation]
    settled_t = max([served_t, *newer[:1]]) + SETTLE_S
    lost = time_lost(recs, killed_t, settled_t)
    if lost is None:
        raise BenchError(
            f"{name}: the job ended before {SETTLE_S:g} s after its recovery", hint="give it more --steps"
        )
    events = cluster.job_events(job_id)
    adopted = [e.time for e in events if e.kind == CoordinatorEventKind.RANKS_ADOPTED and e.time > killed_t]
    resumed = [
        int(e.get("resumed_step", e.get("step", 0)))
        for e in job_records(cluster.events(), job_id)
        if e.get("event") == EventKind.STARTED and e["t"] > killed_t
    ]
    before = newest_step_before(recs, killed_t)
    return {
        "job_id": job_id,
        "rank_pid": pid,
        "rank_survived": survived,
        "agent_served_s": served_t - killed_t,
        "adopted_s": adopted[0] - killed_t if adopted else None,
        "new_generation": job.generation > generation,
        "restarts": job.restarts,
        "time_lost_s": lost[0],
        "window_steps": lost[1],
        "steps_before": before,
        "lost_steps": before - min(resumed) if resumed else 0,
        "final_fingerprint": job.final_fingerprint,
    }


def bench_agent_restart(
    *,
    data: Path,
    work_dir: Path,
    command: str,
    trials: int = 3,
    model: str = "tiny",
    steps: int = 150,
    kill_step: int = 25,
    timeout_s: float = 600.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    if not 0 < kill_step < steps:
        raise BenchError(f"--kill-step {kill_step} must be inside the run (1..{steps - 1})")
    load_at_start = os.getloadavg()
    sets = model_sets(model)
    data_name = "bench-data"
    clusters: dict[str, LocalCluster] = {}
    rows: list[dict[str, Any]] = []
    try:
        for system, extra in (("adopted", ()), ("ranks die", ("--orphan-grace-s", "0"))):
            progress(f"cluster: {system}")
            clusters[system] = start_cluster(
                work_dir / system.replace(" ", "-"), data, data_name, progress=progress, agent_args=extra
            )
        for round_, system in interleaved(list(SYSTEMS), trials):
            progress(f"trial {round_ + 1}/{trials}: {system}")
            row = agent_trial(
                clusters[system],
                name=f"agent-{system.replace(' ', '-')}-{round_}",
                data_name=data_name,
                steps=steps,
                kill_step=kill_step,
                sets=sets,
                timeout_s=timeout_s,
                progress=progress,
            )
            row.update(system=system, round=round_, load_1min=os.getloadavg()[0])
            progress(
                f"  {system}: {row['time_lost_s']:.3f} s lost, {row['lost_steps']} steps lost, "
                f"new generation: {row['new_generation']}"
            )
            rows.append(row)
    finally:
        for c in clusters.values():
            c.stop()

    def summary(system: str) -> dict[str, Any]:
        mine = [r for r in rows if r["system"] == system]
        adopted = [r["adopted_s"] for r in mine if r["adopted_s"] is not None]
        return {
            "trials": len(mine),
            "time_lost_s": median(r["time_lost_s"] for r in mine),
            "time_lost_s_max": max(r["time_lost_s"] for r in mine),
            "lost_steps_max": max(r["lost_steps"] for r in mine),
            "new_generations": sum(r["new_generation"] for r in mine),
            "agent_served_s": median(r["agent_served_s"] for r in mine),
            "adopted_s": median(adopted) if adopted else None,
        }

    ad, die = summary("adopted"), summary("ranks die")
    rel = ratio(ad["time_lost_s"], die["time_lost_s"])
    fingerprints = {r["final_fingerprint"] for r in rows}
    results = {
        "adopted": ad,
        "ranks_die": die,
        "adopted_time_lost_s": ad["time_lost_s"],
        "ranks_die_time_lost_s": die["time_lost_s"],
        "ratio": rel,
        "final_fingerprints_equal": len(fingerprints) == 1,
        "trials": rows,
    }
    goals = [
        goal(
            "an agent restart interrupts no training: no new generation, no lost step",
            ad["new_generations"] + ad["lost_steps_max"],
            "== 0 in every trial",
            ad["new_generations"] == 0 and ad["lost_steps_max"] == 0,
            "adopted trials: generations added by the coordinator + the most steps lost in one",
        )
    ]
    settings = {
        "data": str(data),
        "model": model,
        "model_sets": sets,
        "steps": steps,
        "kill_step": kill_step,
        "trials": trials,
        "target": TARGET,
        "order": [f"{s} r{r}" for r, s in interleaved(list(SYSTEMS), trials)],
        "cluster": f"per side: coordinator + {len(NODES)} nodes x 1 worker + 1 spare node, 127.0.0.1, plaintext",
    }
    notes = [
        "time_lost_s: rank 0's last step before the kill -> its first step at least "
        f"{SETTLE_S:g} s after the new agent served (and after the recovered generation's first step), "
        "minus that many steps at rank 0's median step interval before the kill",
        "agent_served_s: the kill -> the restarted agent's port file (it has imported torch, adopted "
        "what it found and serves); adopted_s: the kill -> the coordinator's ranks_adopted event",
        "both clusters stay up for the whole run; the idle one heartbeats while the other's trial runs",
        "on these 2 cores the new agent's start (importing torch) competes with the ranks for the CPU",
    ]
    return envelope(
        "agent-restart",
        command,
        settings,
        results,
        goals,
        notes,
        load_at_start,
        headline=("adopted_time_lost_s", "ranks_die_time_lost_s", "ratio"),
    )
