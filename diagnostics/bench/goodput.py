"""`stanchion bench goodput`: a job through a seeded fault schedule; ETTR, lost steps, recovery times.

One invocation runs, on one local cluster (a coordinator, 2 nodes x 1 worker, spare nodes;
plaintext gRPC; agents with a small ``--hang-floor-s``):

1. the **fault-free** job of the configuration: its median step time is ETTR's yardstick and its
   final fingerprint the golden one;
2. the **faulted** job: every fault of the schedule fires inside its rank at its step, from the
   trainer's fault injector (the job spec's schedule), so a busy machine cannot delay one past its
   step: a crash SIGKILLs the rank's process as its step starts, a hang SIGSTOPs the process (every
   thread) inside its step, before the gradient all-reduce (the agent kills the rank once the kernel
   says it is stopped and its heartbeat has been silent for 0.25 s), a slow rank sleeps
   in each step of its window, and silent corruption flips a bit of a parameter or of optimizer
   state (caught by the replica fingerprints). A fault that ends the process records when it fired
   before it does;
3. **torchrun** (``--max-restarts``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) on the same trainer
   flags, with the same schedule's **crashes only**, fired the same way (torchrun has no hang
   detector, and a bit flip in one replica goes unnoticed without Stanchion's coordinator).

Schedules (stanchion/sdk/faults.py ``generate_schedule``: Poisson arrivals, seeded; mix 70% crash, 12%
hang, 8% slow rank, 10% silent corruption): S1 one fault per 2,000 steps on average, S2 one per 200.

ETTR: steps that survive x the fault-free run's median step time / wall time,
the wall time running from the start of the first step to the end of the last one (detection,
restart, restore and redone steps included; job start-up and the final evaluation are not, and
are the same with or without faults). The same formula applied to the fault-free run itself is
``ettr_fault_free``: the ceiling this machine allows (checkpoint stalls, periodic checks, slow
steps from other load).
"""

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostics.bench import torchft as tft
from diagnostics.bench.common import BenchError, Progress, envelope, goal, median, ratio, shown, warmup_steps
from diagnostics.bench.recovery import (
    NODES,
    TorchrunJob,
    first_decision_after,
    job_records,
    job_spec,
    measure_recovery,
    model_sets,
    start_cluster,
    torchrun_command,
    trainer_args,
    wait_standbys,
)
from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until

SCHEDULES = {"S1": 2000.0, "S2": 200.0}  # mean steps between faults
MIX = {"crash": 0.70, "hang": 0.12, "slow": 0.08, "bitflip": 0.10}
ENDS_PROCESS = ("crash", "hang")  # a new generation recovers (the others are handled in place)
# Normalized and time-local ETTR, each at least this (a schedule without one has no ETTR goal).
ETTR_GOALS = {"S1": 0.99, "S2": 0.95}
HANG_RECOVERY_GOAL_S = 1.0  # median, from the SIGSTOP to the next step of the recovered generation
BITFLIP_REDONE_GOAL = 3  # median steps redone per bit flip
CRASH_VS_TORCHRUN_GOAL = 0.05  # Stanchion's median crash recovery / torchrun's, in the same invocation
CRASH_VS_TORCHFT_GOAL = 0.5  # ... / torchft's
DEFAULT_STEPS = {"S1": 6000, "S2": 2000}
DETECTED_BY = {"crash": ("crashed",), "hang": ("hung",), "bitflip": ("replica fingerprints", "nonfinite")}
TERMINAL = {types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED}


# ---------------------------------------------------------------------------------------------
# Pure helpers


def goodput_schedule(
    name: str, seed: int, steps: int, *, world_size: int = len(NODES), mean_interval: float | None = None
) -> list[dict[str, Any]]:
    """The seeded fault schedule of ``name`` (S1, S2, or any name with ``mean_interval``)."""
    from stanchion.sdk.faults import generate_schedule

    interval = mean_interval if mean_interval is not None else SCHEDULES[name]
    return generate_schedule(seed, steps=steps, world_size=world_size, mean_interval=interval, mix=MIX)


def fault_step(f: Mapping[str, Any]) -> int:
    return int(f["step"] if "step" in f else f["from_step"])


def trainer_faults(faults: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The schedule as the trainer's fault injector takes it (stanchion/sdk/faults.py), entry for entry
    (an entry's position is its id in the ``fault_injected`` events): a hang is the process stopped
    (SIGSTOP, every thread) inside its step, which only its agent's hang detection can end."""
    return [
        {"kind": "freeze", "at": "step", "step": f["step"], "rank": f["rank"]}
        if f["kind"] == "hang"
        else dict(f)
        for f in faults
    ]


def fired_faults(
    faults: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    kinds: Sequence[str] = ENDS_PROCESS,
) -> list["Injection"]:
    """The faults of ``kinds`` that fired, from the ranks' ``fault_injected`` events (the schedule
    given to the trainer as ``trainer_faults(faults)``), in the order they fired."""
    fired = {int(e["id"]): e for e in events if e.get("event") == EventKind.FAULT_INJECTED and "id" in e}
    out = []
    for i, f in enumerate(faults):
        e = fired.get(i)
        if f["kind"] not in kinds or e is None:
            continue
        how = "SIGKILLed itself as step {} began" if f["kind"] == "crash" else "SIGSTOPped itself in step {}"
        out.append(
            Injection(
                dict(f),
                step=int(e["step"]) - 1,
                t=float(e["t"]),
                generation=int(e.get("generation", 0)),
                detail=f"rank {e.get('rank')} " + how.format(e["step"]),
            )
        )
    return sorted(out, key=lambda i: i.t)


def final_trajectory(records: Sequence[Mapping[str, Any]], rank: int = 0) -> dict[int, dict[str, Any]]:
    """Step -> the newest record of ``rank`` for that step (a redone step's last computation wins)."""
    out: dict[int, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["t"]):
        if r.get("rank") == rank:
            out[int(r["step"])] = dict(r)
    return out


def training_window(records: Sequence[Mapping[str, Any]], steps: int, rank: int = 0) -> tuple[float, float]:
    """(start of the first step, end of the last step ``steps``) from ``rank``'s records."""
    mine = [r for r in records if r.get("rank") == rank]
    firsts = [r for r in mine if int(r["step"]) == 1]
    lasts = [r for r in mine if int(r["step"]) == steps]
    if not firsts or not lasts:
        raise ValueError(f"no record of step 1 or step {steps} for rank {rank}")
    start = min(r["t"] - float(r.get("step_time_s", 0.0)) for r in firsts)
    return start, max(r["t"] for r in lasts)


def ettr(steps_survived: int, median_step_s: float, wall_s: float) -> float | None:
    """ETTR: steps that survive x fault-free median step time / wall time."""
    return ratio(steps_survived * median_step_s, wall_s)


def step_median(records: Sequence[Mapping[str, Any]], steps: int, rank: int = 0) -> float:
    """Median ``step_time_s`` of ``rank``'s final trajectory, warm-up steps dropped."""
    traj = final_trajectory(records, rank)
    warm = warmup_steps(steps)
    return median(r["step_time_s"] for s, r in traj.items() if s > warm and "step_time_s" in r)


def lost_steps(records: Sequence[Mapping[str, Any]], steps_survived: int, rank: int = 0) -> int:
    """Steps computed and thrown away: ``rank``'s records beyond the steps that survived."""
    return max(0, sum(1 for r in records if r.get("rank") == rank) - steps_survived)


def loss_series(records: Sequence[Mapping[str, Any]], t0: float, rank: int = 0) -> dict[str, Any]:
    """The surviving trajectory as parallel lists: loss per step from step 1, and when each step
    ended (seconds after ``t0``)."""
    traj = final_trajectory(records, rank)
    steps = sorted(traj)
    return {
        "first_step": steps[0] if steps else 1,
        "loss": [traj[s]["loss"] for s in steps],
        "t_s": [traj[s]["t"] - t0 for s in steps],
    }


def slow_cost(
    records: Sequence[Mapping[str, Any]], fault: Mapping[str, Any], median_step_s: float, rank: int = 0
) -> dict[str, Any]:
    """What a slow-rank window cost: its steps' time beyond the fault-free median."""
    lo, hi = int(fault["from_step"]), int(fault.get("until_step", -1))
    traj = final_trajectory(records, rank)
    window = [r["step_time_s"] for s, r in traj.items() if s > lo and (hi < 0 or s <= hi)]
    return {
        "steps": len(window),
        "delay_s_per_step": fault.get("delay_s"),
        "extra_s": sum(window) - len(window) * median_step_s if window else 0.0,
    }


def confidence_note(schedule: str, occurred: int, expected: float) -> str:
    """How much a count of ``occurred`` faults can say about a fault rate (Poisson)."""
    spread = f"a Poisson count of {occurred} has a relative standard error of about " + (
        f"{100 / occurred**0.5:.0f}%" if occurred else "100% (none occurred)"
    )
    level = "low" if occurred < 10 else "moderate" if occurred < 30 else "good"
    return (
        f"{schedule}: {occurred} faults occurred where {expected:.1f} were expected on average; {spread}; "
        f"confidence in the ETTR as a figure for this fault rate is {level}"
    )


# ---------------------------------------------------------------------------------------------
# Running a job and injecting faults


@dataclass
class Injection:
    fault: dict[str, Any]
    step: int = 0  # the newest step completed when it fired
    t: float = 0.0
    generation: int = 0
    detail: str = ""


def job_state(cluster: LocalCluster, job_id: str) -> Any | None:
    try:
        return cluster.job(job_id)
    except Exception:  # noqa: BLE001 - a busy coordinator: try again next poll
        return None


def run_stanchion_job(
    cluster: LocalCluster, spec: str, *, timeout_s: float, progress: Progress, label: str
) -> tuple[str, Any]:
    """Submit ``spec`` (its faults fire inside the ranks) and wait for the job to end, reporting its
    progress every 500 steps. Returns (job id, job)."""
    wait_standbys(cluster, 120.0)
    job_id = cluster.submit(spec)
    last_report = 0

    def ended() -> Any | None:
        nonlocal last_report
        job = job_state(cluster, job_id)
        if job is not None and job.state in TERMINAL:
            return job
        if job is not None and job.step >= last_report + 500:
            last_report = job.step - job.step % 500
            progress(f"  {label}: step {job.step}, generation {job.generation}")
        return None

    try:
        return job_id, wait_until(ended, timeout_s, f"job {job_id} to finish", interval_s=0.2)
    except TimeoutError as e:
        raise BenchError(f"{label}: {e}") from None


def stanchion_recoveries(
    injections: Sequence[Injection],
    recs: Sequence[Mapping[str, Any]],
    evs: Sequence[Mapping[str, Any]],
    decisions: Sequence[Any],
) -> list[dict[str, Any]]:
    """Per external fault: recovery figures and the coordinator's detecting decision."""
    out = []
    for inj in injections:
        r = measure_recovery(recs, evs, inj.t, old_generation=inj.generation)
        d = first_decision_after(decisions, inj.t, DETECTED_BY[inj.fault["kind"]])
        out.append(
            r.as_dict(
                kind=inj.fault["kind"],
                scheduled_step=fault_step(inj.fault),
                injected_step=inj.step,
                injected_t=inj.t,
                rank=inj.fault["rank"],
                detail=inj.detail,
                detected_s=None if d is None else d.time - inj.t,
                decision=None if d is None else d.reason[:300],
            )
        )
    return out


def internal_recoveries(
    internal: Sequence[Mapping[str, Any]],
    recs: Sequence[Mapping[str, Any]],
    evs: Sequence[Mapping[str, Any]],
    decisions: Sequence[Any],
    median_step_s: float,
) -> list[dict[str, Any]]:
    """Per trainer-injected fault: bit flips (fired -> detected -> rolled back -> first step after
    the rollback, and the steps the rollback threw away) and slow windows (their extra time)."""
    out = []
    fired = [e for e in evs if e.get("event") == EventKind.FAULT_INJECTED]
    for f in internal:
        if f["kind"] == "slow":
            traj = final_trajectory(recs)
            start = traj.get(fault_step(f) + 1)
            out.append(
                {
                    "kind": "slow",
                    "scheduled_step": fault_step(f),
                    "rank": f["rank"],
                    "injected_t": None if start is None else start["t"] - start["step_time_s"],
                    **slow_cost(recs, f, median_step_s),
                }
            )
            continue
        mine = [e for e in fired if e.get("fault") == "bitflip" and int(e["step"]) == int(f["step"])]
        row: dict[str, Any] = {
            "kind": "bitflip",
            "scheduled_step": int(f["step"]),
            "rank": f["rank"],
            "target": f["target"],
            "bit": f["bit"],
        }
        if not mine:
            row["detail"] = "did not fire (the run ended or was past this step when it would have)"
            out.append(row)
            continue
        # The flip happens inside step S, after its optimizer step; the trainer records it at the
        # end of that step, after the step's own fingerprint check (which may already have caught
        # it). So detections count from the start of the step computation in which it fired.
        step = int(f["step"])
        fired_t = min(e["t"] for e in mine)
        firing = [r for r in recs if int(r["step"]) == step and r["t"] >= fired_t]
        step_start = min(r["t"] - float(r.get("step_time_s", 0.0)) for r in firing) if firing else fired_t
        row["tensor"] = mine[0].get("tensor")
        detect = sorted(
            (
                e
                for e in evs
                if e["t"] >= step_start
                and int(e.get("step", -1)) >= step
                and e.get("event") in (EventKind.FINGERPRINT_MISMATCH, EventKind.NONFINITE)
            ),
            key=lambda e: e["t"],
        )
        t0 = min(fired_t, detect[0]["t"]) if detect else fired_t
        rollback = sorted(
            (e for e in evs if e["t"] >= t0 and e.get("event") == EventKind.ROLLBACK), key=lambda e: e["t"]
        )
        d = first_decision_after(decisions, t0, DETECTED_BY["bitflip"])
        row.update(
            injected_step=int(f["step"]),
            injected_t=t0,
            detected_by=detect[0]["event"] if detect else None,
            detected_step=detect[0]["step"] if detect else None,
            detected_s=detect[0]["t"] - t0 if detect else None,
            decision=None if d is None else d.reason[:300],
        )
        if rollback:
            rb = rollback[0]
            firsts = [r["t"] for r in recs if r["t"] > rb["t"]]
            row.update(
                restarted_s=rb["t"] - t0,
                first_step_s=min(firsts) - t0 if firsts else None,
                recovery_s=min(firsts) - t0 if firsts else None,
                steps_before=int(rb.get("from_step", 0)),
                resume_step=int(rb["step"]),
                lost_steps=int(rb.get("from_step", 0)) - int(rb["step"]),
                resume_source="snapshot (in place)",
            )
        else:
            # A restart instead of an in-place rollback: the generation that followed it.
            gens = [int(e["generation"]) for e in mine]
            r = measure_recovery(recs, evs, t0, old_generation=max(gens))
            row.update(r.as_dict())
        out.append(row)
    return out


def run_torchrun_job(
    run_dir: Path, flags: Sequence[str], restarts: int, *, timeout_s: float
) -> tuple[TorchrunJob, float]:
    """torchrun on ``flags`` (their ``--faults`` schedule fires inside the ranks) allowing
    ``restarts`` restarts. Returns (the job, wall seconds of the launch)."""
    job = TorchrunJob(run_dir, torchrun_command(flags, run_dir, max_restarts=restarts))
    t_start = time.time()
    job.start()
    try:
        code = job.wait(timeout_s)
    except BaseException:
        job.stop()
        raise
    if code != 0:
        raise job.failed(code)
    return job, time.time() - t_start


def torchft_run(
    run_dir: Path,
    data: Path,
    steps: int,
    sets: Mapping[str, Any],
    crashes: Sequence[Mapping[str, Any]],
    crash_file: Path,
    median_clean: float,
    golden: str | None,
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """torchft (diagnostics/bench/torchft.py) through the schedule's crashes: its summary as
    :func:`run_summary` gives it, from a replica that trained to the end, and each crash's recovery."""
    job = tft.TorchftJob(run_dir, data, steps, sets, faults=crash_file, max_restarts=len(crashes) + 3)
    t0 = time.time()
    job.start()
    try:
        job.wait(timeout_s)
    except BaseException:
        job.stop()
        raise
    assert job.events is not None
    recs, evs = job.records(), job.events.records
    done = sorted(e["rank"] for e in evs if e.get("event") == EventKind.FINISHED)
    if not done:
        raise BenchError("torchft: no replica finished", hint=f"see {run_dir / 'logs'}")
    # run_summary reads rank 0's records: those of the first replica that trained to the end
    mine = [{**r, "rank": 0} for r in recs if r.get("rank") == done[0]]
    out = run_summary(mine, steps, median_clean)
    rows = []
    origin = training_window(mine, steps)[0]
    for inj in fired_faults(crashes, evs):
        r, full = tft.torchft_recovery(recs, evs, inj.t)
        rows.append(
            r.as_dict(
                kind="crash",
                scheduled_step=fault_step(inj.fault),
                injected_step=inj.step,
                rank=inj.fault["rank"],
                detail=inj.detail,
                full_world_s=full,
                at_s=inj.t - origin,
            )
        )
    final = [e.get("fingerprint") for e in evs if e.get("event") == EventKind.FINISHED]
    out.update(
        command=shown(job.command(0, Path("RUN_DIR"))),
        summarized_replica=done[0],
        faults=rows,
        recovery_s=[x["recovery_s"] for x in rows],
        full_world_s=[x["full_world_s"] for x in rows],
        uncommitted_steps=sum(1 for r in job.progress.records if not r.get("committed"))
        if job.progress
        else None,
        restarts=job.restarts,
        launch_wall_s=time.time() - t0,
        final_fingerprints=final,
        final_matches_golden=bool(final) and all(f == golden for f in final),
    )
    return out


def finished_fingerprint(events: Sequence[Mapping[str, Any]]) -> str | None:
    done = [e for e in events if e.get("event") == EventKind.FINISHED and e.get("rank") == 0]
    return done[-1].get("fingerprint") if done else None


def effective_time(
    records: Sequence[Mapping[str, Any]], slow: Sequence[Mapping[str, Any]] = (), rank: int = 0
) -> float:
    """Seconds ``rank`` spent computing the steps that survived, each at its own measured time,
    except that a step inside a slow-rank window counts at most the run's median step time (the
    slowdown is a fault's cost, not training)."""
    traj = final_trajectory(records, rank)
    if not traj:
        return 0.0
    med = median(r["step_time_s"] for r in traj.values())
    total = 0.0
    for s, r in traj.items():
        t = float(r["step_time_s"])
        if any(int(f["from_step"]) < s <= int(f.get("until_step", s)) for f in slow):
            t = min(t, med)
        total += t
    return total


def progress_series(
    records: Sequence[Mapping[str, Any]], t0: float, rank: int = 0, every: int = 10
) -> dict[str, Any]:
    """Every computed step of ``rank`` in time order (redone steps included) as (seconds after
    ``t0``, step), thinned to every ``every``-th record plus each record next to a jump (a stall
    is not a jump; a rollback or a restart from a checkpoint is), which keeps the curve's shape."""
    mine = sorted((r for r in records if r.get("rank") == rank), key=lambda r: r["t"])
    keep = []
    for i, r in enumerate(mine):
        prev_jump = i > 0 and int(mine[i - 1]["step"]) + 1 != int(r["step"])
        next_jump = i + 1 < len(mine) and int(r["step"]) + 1 != int(mine[i + 1]["step"])
        if i % every == 0 or i == len(mine) - 1 or prev_jump or next_jump:
            keep.append(r)
    return {"t_s": [r["t"] - t0 for r in keep], "step": [int(r["step"]) for r in keep]}


def run_summary(
    recs: Sequence[Mapping[str, Any]], steps: int, median_clean: float, slow: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """ETTR, lost steps and the loss series of one finished run from its progress records."""
    start, end = training_window(recs, steps)
    wall = end - start
    own = step_median(recs, steps)
    return {
        "wall_s": wall,
        "ettr": ettr(steps, median_clean, wall),
        "ettr_own_median": ettr(steps, own, wall),
        "ettr_local": ratio(effective_time(recs, slow), wall),
        "median_step_s": own,
        "steps_computed_rank0": sum(1 for r in recs if r.get("rank") == 0),
        "lost_steps": lost_steps(recs, steps),
        "series": loss_series(recs, start),
        "progress": progress_series(recs, start),
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_goodput(
    *,
    schedule: str,
    steps: int,
    seed: int,
    data: Path,
    work_dir: Path,
    command: str,
    model: str = "medium",
    checkpoint_every: int = 100,
    hang_floor_s: float = 2.0,
    spares: int = 1,
    mean_interval: float | None = None,
    torchrun: bool = True,
    torchft: bool = True,
    timeout_s: float = 3600.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    if torchft and (missing := tft.available()) is not None:
        raise BenchError(missing, hint="or leave torchft out with --no-torchft")
    load_at_start = os.getloadavg()
    interval = mean_interval if mean_interval is not None else SCHEDULES[schedule]
    faults = goodput_schedule(schedule, seed, steps, mean_interval=interval)
    internal = [f for f in faults if f["kind"] not in ENDS_PROCESS]  # handled in place
    crashes = [f for f in faults if f["kind"] == "crash"]
    sets = model_sets(model)
    data_name = "bench-data"
    progress(
        f"{schedule}: {len(faults)} faults in {steps} steps (mean interval {interval:g}): "
        + ", ".join(f"{f['kind']}@{fault_step(f)}/r{f['rank']}" for f in faults)
    )
    cluster = start_cluster(
        work_dir / "cluster", data, data_name, spares=spares, hang_floor_s=hang_floor_s, progress=progress
    )
    # max_restarts_without_progress: S2's arrivals can put two faults a few steps apart.
    common = dict(steps=steps, checkpoint_every=checkpoint_every, sets=sets, max_restarts_without_progress=10)
    try:
        progress(f"fault-free job, {steps} steps")
        t0 = time.time()
        clean_id, clean_job = run_stanchion_job(
            cluster,
            job_spec("clean", data_name, **common),
            timeout_s=timeout_s,
            progress=progress,
            label="clean",
        )
        clean_total = time.time() - t0
        if clean_job.state != types_pb2.JOB_STATE_SUCCEEDED:
            raise BenchError(f"the fault-free job ended in state {clean_job.state}: {clean_job.reason}")
        clean_recs = job_records(cluster.progress(), clean_id)
        median_clean = step_median(clean_recs, steps)
        clean = run_summary(clean_recs, steps, median_clean)
        golden = clean_job.final_fingerprint
        progress(
            f"  clean: median step {median_clean:.4f} s, training {clean['wall_s']:.1f} s, "
            f"ETTR ceiling {clean['ettr']:.3f}, fingerprint {golden}"
        )

        progress(f"faulted job: {len(faults)} faults")
        t0 = time.time()
        spec = job_spec("faulted", data_name, faults=trainer_faults(faults), **common)
        fid, fjob = run_stanchion_job(cluster, spec, timeout_s=timeout_s, progress=progress, label="faulted")
        faulted_total = time.time() - t0
        recs = job_records(cluster.progress(), fid)
        evs = job_records(cluster.events(), fid)
        injections = fired_faults(faults, evs)
        decisions = list(cluster.explain(fid).decisions)
        state_name = "succeeded" if fjob.state == types_pb2.JOB_STATE_SUCCEEDED else f"state {fjob.state}"
        faulted: dict[str, Any] = {"job_id": fid, "state": state_name, "restarts": fjob.restarts}
        if fjob.state == types_pb2.JOB_STATE_SUCCEEDED:
            faulted.update(
                run_summary(recs, steps, median_clean, [f for f in internal if f["kind"] == "slow"])
            )
        recoveries = stanchion_recoveries(injections, recs, evs, decisions)
        inner = internal_recoveries(internal, recs, evs, decisions, median_clean)
        origin = (
            training_window(recs, steps)[0]
            if fjob.state == types_pb2.JOB_STATE_SUCCEEDED
            else min(r["t"] for r in recs)
        )
        for row in (*recoveries, *inner):
            t = row.pop("injected_t", None)
            row["at_s"] = None if t is None else t - origin
        final = fjob.final_fingerprint
        faulted.update(
            final_fingerprint=final,
            final_matches_golden=bool(final) and final == golden,
            faults=recoveries + inner,
            decisions=[
                {"at_s": d.time - origin, "reason": d.reason[:300]}
                for d in decisions
                if "checkpoint at step" not in d.reason
            ][:80],
        )
    finally:
        cluster.stop()
    progress(
        f"  faulted: {faulted.get('state')}, ETTR {faulted.get('ettr')}, lost {faulted.get('lost_steps')} steps, "
        f"final matches golden: {faulted['final_matches_golden']}"
    )

    tr: dict[str, Any] | None = None
    crash_file = work_dir / "torchrun-faults.json"  # the crashes only, for the peers
    crash_file.write_text(json.dumps(crashes))
    if torchrun:
        progress(f"torchrun: the schedule's {len(crashes)} crashes")
        flags = [
            *trainer_args(data, steps=steps, checkpoint_every=checkpoint_every, sets=sets),
            "--faults",
            str(crash_file),
        ]
        tjob, twall = run_torchrun_job(work_dir / "torchrun", flags, len(crashes) + 3, timeout_s=timeout_s)
        assert tjob.progress is not None and tjob.events is not None
        trecs, tevs = tjob.progress.records, tjob.events.records
        tinj = fired_faults(crashes, tevs)
        tr = run_summary(trecs, steps, median_clean)
        trec = [
            measure_recovery(trecs, tevs, i.t).as_dict(
                kind="crash",
                scheduled_step=fault_step(i.fault),
                injected_step=i.step,
                rank=i.fault["rank"],
                detail=i.detail,
            )
            for i in tinj
        ]
        torigin = training_window(trecs, steps)[0]
        for row, inj in zip(trec, tinj, strict=True):
            row["at_s"] = inj.t - torigin
        tfinal = finished_fingerprint(tevs)
        tr.update(
            command=shown(torchrun_command(flags, Path("RUN_DIR"), max_restarts=len(crashes) + 3)),
            faults=trec,
            recovery_s=[x["recovery_s"] for x in trec],
            launch_wall_s=twall,
            final_fingerprint=tfinal,
            final_matches_golden=tfinal == golden,
        )
        progress(f"  torchrun: ETTR {tr['ettr']:.3f}, lost {tr['lost_steps']} steps")
    ft = None
    if torchft:
        progress(f"torchft: the schedule's {len(crashes)} crashes")
        ft = torchft_run(
            work_dir / "torchft",
            data,
            steps,
            sets,
            crashes,
            crash_file,
            median_clean,
            golden,
            timeout_s=timeout_s,
        )
        progress(f"  torchft: ETTR {ft['ettr']:.3f}, recoveries {ft['recovery_s']}")

    ext_rec = [x for x in faulted["faults"] if x.get("recovery_s") is not None]
    crash_rec = [x["recovery_s"] for x in ext_rec if x["kind"] == "crash"]
    kinds = {k: sum(1 for f in faults if f["kind"] == k) for k in MIX}
    expected = steps / interval
    results: dict[str, Any] = {
        "schedule": schedule,
        "steps": steps,
        "ettr": faulted.get("ettr"),
        "ettr_fault_free": clean["ettr"],
        "ettr_normalized": ratio(clean["wall_s"], faulted.get("wall_s")),
        "ettr_local": faulted.get("ettr_local"),
        "ettr_local_fault_free": clean["ettr_local"],
        "median_step_drift": ratio(faulted.get("median_step_s"), median_clean),
        "lost_steps": faulted.get("lost_steps"),
        "recovery_s": [x["recovery_s"] for x in ext_rec],
        "recovery_s_median": median(x["recovery_s"] for x in ext_rec) if ext_rec else None,
        "crash_recovery_s_median": median(crash_rec) if crash_rec else None,
        "final_matches_golden": faulted["final_matches_golden"],
        "golden_fingerprint": golden,
        "median_step_s_fault_free": median_clean,
        "faults_scheduled": len(faults),
        "faults_injected": len(injections) + sum(1 for x in inner if x["kind"] == "slow" or "tensor" in x),
        "faults_by_kind": kinds,
        "faults_expected": expected,
        "confidence": confidence_note(schedule, len(faults), expected),
        "schedule_faults": faults,
        "fault_free": {**clean, "job_id": clean_id, "total_s": clean_total},
        "faulted": {**faulted, "total_s": faulted_total},
        "torchrun": tr,
        "torchrun_ettr": None if tr is None else tr["ettr"],
        "torchrun_lost_steps": None if tr is None else tr["lost_steps"],
        "torchrun_recovery_s": None if tr is None else tr["recovery_s"],
        "torchft": ft,
        "torchft_ettr": None if ft is None else ft["ettr"],
        "torchft_lost_steps": None if ft is None else ft["lost_steps"],
        "torchft_recovery_s": None if ft is None else ft["recovery_s"],
        "plain_ddp": "step-time cost of Stanchion's protections against plain DDP: `stanchion bench trainer` "
        "(docs/bench/trainer.json)",
    }
    goals = goodput_goals(results)
    settings = {
        "schedule": schedule,
        "mean_interval_steps": interval,
        "mix": MIX,
        "seed": seed,
        "steps": steps,
        "model": model,
        "model_sets": sets,
        "preset": "tiny",
        "data": str(data),
        "checkpoint_every": checkpoint_every,
        "cluster": f"coordinator + {len(NODES)} nodes x 1 worker + {spares} spare node(s), 127.0.0.1, plaintext gRPC",
        "hang_floor_s": hang_floor_s,
        "hang_detection": "the hangs are SIGSTOPs: the agent kills a rank stopped by a signal whose heartbeat "
        "has been silent for 0.25 s (agent/hangs.py)",
        "torchrun": None
        if not torchrun
        else {
            "crashes_only": True,
            "max_restarts": len(crashes) + 3,
            "env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        },
        "torchft": None
        if not torchft
        else {
            "crashes_only": True,
            "replicas": "2 replica groups of 1 rank, restarted at once when they die",
            "lighthouse": tft.LIGHTHOUSE_FLAGS,
            "worker_timeouts_s": tft.WORKER_TIMEOUTS,
        },
        "order": ["fault-free (Stanchion)", "faulted (Stanchion)"]
        + (["faulted, crashes only (torchrun)"] if torchrun else [])
        + (["faulted, crashes only (torchft)"] if torchft else []),
    }
    notes = [
        "ettr = steps x median step time of the fault-free run / wall time from the start of step 1 to the end "
        "of the last step (rank 0's records); ettr_fault_free applies the same formula to the fault-free run "
        "(the ceiling of this machine: its mean step time exceeds the median under other load); "
        "ettr_normalized = ettr / ettr_fault_free = fault-free wall / faulted wall (moves with load drift "
        "between the two runs: median_step_drift = faulted median step / fault-free median step)",
        "ettr_local = seconds rank 0 spent in steps that survived (each at its own measured step_time_s; "
        "steps in a slow-rank window at most the run's median) / the same wall time: both from the same run, "
        "so other load cancels; ettr_own_median = steps x the run's own median step time / wall",
        "lost_steps = rank 0's progress records - steps that survived (steps computed then thrown away)",
        "recovery_s: per crash or hang, the fault firing -> first step of the recovered generation; per bit "
        "flip, the fault firing -> first step after the rollback",
        "every fault fires inside its rank at its scheduled step (the trainer's fault injector), whatever the "
        "load: a crash SIGKILLs the process as its step begins, a hang SIGSTOPs it inside its step; each "
        "writes when it fired before the process dies or stops (injected_step = the steps completed then)",
        "steps_before = where the run stood when the fault fired (each rank's newest step, the highest); "
        "lost_steps = steps_before - the step the recovered ranks resumed from",
        "torchrun runs the same schedule's crashes only (no hang detection of its own; a replica bit flip "
        "goes unnoticed there); its ETTR uses the same fault-free median (same trainer and model)",
        "torchft runs the same crashes (each replica SIGKILLs itself at its step, as the trainer does; the bench "
        "restarts it at once); recovery_s per crash: the SIGKILL -> the first committed step begun after it "
        "(the survivor going on alone); full_world_s -> both replicas committing again; its ETTR and lost steps "
        "are of a replica that trained to the end (committed steps only); a step the survivor trains alone is "
        "half the global batch yet counts as a step, which flatters torchft's ETTR, and makes its final state "
        "another one than the fault-free run's",
        "the model's spike detector is off (integrity.spike_*_z=1e9), as in the integration tests: spikes "
        "are real in a model this small and are not among the faults under test",
    ]
    return envelope(
        "goodput",
        command,
        settings,
        results,
        goals=goals,
        notes=notes,
        load_at_start=load_at_start,
        headline=("schedule", "steps", "ettr", "lost_steps", "recovery_s", "final_matches_golden"),
    )


def goodput_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of one invocation, from its results (a goal whose fault kind did not occur, or whose
    peer did not run, is left out rather than called met)."""
    schedule, faults = results["schedule"], results["faulted"]["faults"]
    goals = []
    target = ETTR_GOALS.get(schedule)
    if target is not None:
        for key, name, how in (
            (
                "ettr_normalized",
                "normalized ETTR",
                "the fault-free run's wall time / the faulted run's, both from the first step's start to "
                "the last step's end",
            ),
            (
                "ettr_local",
                "time-local ETTR",
                "seconds rank 0 spent in steps that survived / the same wall time, both from the faulted "
                "run (insensitive to load that differs between runs); ettr_local_fault_free is its ceiling",
            ),
        ):
            v = results.get(key)
            goals.append(
                goal(f"{name} >= {target} on {schedule}", v, f">= {target}", _at_least(v, target), how)
            )

    def per_kind(kind: str, field: str) -> list[float]:
        return [x[field] for x in faults if x["kind"] == kind and x.get(field) is not None]

    for kind, field, name, limit, how in (
        (
            "hang",
            "recovery_s",
            f"hang recovery <= {HANG_RECOVERY_GOAL_S:g} s (median)",
            HANG_RECOVERY_GOAL_S,
            "per hang: the SIGSTOP firing -> the first step of the recovered generation",
        ),
        (
            "bitflip",
            "lost_steps",
            f"steps redone per bit flip <= {BITFLIP_REDONE_GOAL} (median)",
            BITFLIP_REDONE_GOAL,
            "per bit flip: the newest step computed when it fired - the step the ranks resumed from",
        ),
    ):
        values = per_kind(kind, field)
        if values:
            v = median(values)
            goals.append(goal(name, v, f"<= {limit:g}", v <= limit, how))
    ended = per_kind("crash", "lost_steps") + per_kind("hang", "lost_steps")
    if ended:
        goals.append(
            goal(
                "steps lost to crashes and hangs == 0",
                float(sum(ended)),
                "== 0",
                sum(ended) == 0,
                "each crash or hang: the newest step computed when it fired - the step the ranks resumed from",
            )
        )
    crash = results.get("crash_recovery_s_median")
    for peer, limit, how in (
        ("torchrun", CRASH_VS_TORCHRUN_GOAL, "from the SIGKILL to the next step"),
        (
            "torchft",
            CRASH_VS_TORCHFT_GOAL,
            "from the SIGKILL to the next step (torchft: the next committed step begun after it)",
        ),
    ):
        theirs = [x for x in results.get(f"{peer}_recovery_s") or () if x is not None]
        if crash is not None and theirs:
            v = ratio(crash, median(theirs))
            goals.append(
                goal(
                    f"crash recovery <= {limit:g} x {peer}'s (medians, same invocation)",
                    v,
                    f"<= {limit:g}",
                    _at_most(v, limit),
                    f"Stanchion's median crash recovery / {peer}'s, each {how}",
                )
            )
    golden = results["final_matches_golden"]
    goals.append(
        goal(
            "final state bit-identical to the fault-free run",
            1.0 if golden else 0.0,
            "== 1 (identical)",
            golden,
            "the faulted job's final fingerprint (parameters and optimizer state) == the fault-free job's",
        )
    )
    return goals


def _at_least(v: float | None, target: float) -> bool | None:
    return None if v is None else v >= target


def _at_most(v: float | None, target: float) -> bool | None:
    return None if v is None else v <= target
