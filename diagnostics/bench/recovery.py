"""`stanchion bench recovery`: kill one rank, time the way back, beside torchrun in the same run.

What is measured, per trial (recovery time = fault injected -> first training step
completed in the new generation; lost work = steps computed and then thrown away):

- **Stanchion**: a :class:`~diagnostics.localcluster.LocalCluster` (a coordinator, 2 nodes of 1
  worker and a spare node, plaintext gRPC) trains a job; at the chosen step rank 1's process gets
  SIGKILL. Recovery is the first progress record (any rank) of a newer generation, minus the kill
  time; lost steps are the newest step completed before the kill minus the step the new
  generation resumed from (its ``started`` events carry ``resumed_step``; ``healed`` says it came
  from a live peer, ``restored`` from a checkpoint).
- **torchrun**: ``torchrun --standalone --nproc-per-node 2 --max-restarts K -m trainer`` with the
  same trainer flags (model, data, steps, checkpoint cadence) and
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (without it restarted gloo workers often read a stale
  store, a known torchrun/gloo problem). At the same step rank 1's process gets SIGKILL; torchrun restarts
  every worker and the trainer resumes from its newest good checkpoint. Recovery is the first
  progress record written after the restarted processes' ``started`` event, minus the kill time.

The two sides alternate in ABBA order (diagnostics/bench/common.py ``interleaved``). The pieces that
`bench goodput` shares live here too: the cluster, standby readiness, incremental progress tails,
finding a live rank's pid, and :func:`measure_recovery`, the one definition of recovery and lost
steps both benchmarks use.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.bench.common import (
    QUICK_MODEL,
    REPO,
    BenchError,
    Progress,
    bench_env,
    envelope,
    goal,
    interleaved,
    median,
    ratio,
    shown,
    torchrun,
)
from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion.files import read_jsonl
from stanchion.sdk import liveness
from stanchion.vocab import EventKind, Resume
from stanchion.waiting import wait_until

NODES = ("node-0", "node-1")
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # torchrun's gloo stale-store bug
RECOVERY_GOAL = 0.25  # Stanchion's median recovery at most a quarter of torchrun's
TORCHFT_GOAL = 0.5  # and at most half of torchft's
# The integration tests' small model (diagnostics/bench/common.py QUICK_MODEL) keeps the spike detector
# quiet as they do: spikes are real in a model this small, and they are not the fault under test.
SMALL_QUIET = ("integrity.spike_loss_z=1e9", "integrity.spike_grad_z=1e9")


# ---------------------------------------------------------------------------------------------
# Pure helpers: what a kill cost, from the records ranks wrote


@dataclass(frozen=True)
class Recovery:
    """What one injected fault cost, from progress records and events (all times ``time.time()``)."""

    injected_t: float
    steps_before: int  # where the run stood at the fault: its newest completed step
    resume_step: int | None  # the step the recovered ranks resumed from
    # A Resume value (peer, checkpoint, fresh), or the bench's own: none (no recovery seen) or an
    # in-place one (no new generation or process).
    resume_source: str
    restarted_t: float | None  # the recovered ranks' first `started` event
    first_step_t: float | None  # their first completed step
    generation: int | None = None  # the generation that recovered (Stanchion)
    resume_reason: str = ""  # why its ranks restored a checkpoint (their `restored` events say)

    @property
    def recovery_s(self) -> float | None:
        return None if self.first_step_t is None else self.first_step_t - self.injected_t

    @property
    def lost_steps(self) -> int | None:
        return None if self.resume_step is None else max(0, self.steps_before - self.resume_step)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else t - self.injected_t

        return {
            "steps_before": self.steps_before,
            "resume_step": self.resume_step,
            "resume_source": self.resume_source,
            "lost_steps": self.lost_steps,
            "recovery_s": self.recovery_s,
            "restarted_s": rel(self.restarted_t),
            "first_step_s": rel(self.first_step_t),
            "generation": self.generation,
            "resume_reason": self.resume_reason,
            **extra,
        }


def newest_step_before(records: Iterable[Mapping[str, Any]], t: float) -> int:
    """Where the run stood at time ``t``: the step of each rank's newest record at or before ``t``,
    the highest over ranks (0 before the first step). A rank's newest record, not its highest step:
    after a rollback or a restore the run stands at the step it went back to, and a later fault can
    only lose the steps computed since."""
    newest: dict[Any, Mapping[str, Any]] = {}
    for r in records:
        if r["t"] <= t and (r.get("rank") not in newest or r["t"] >= newest[r.get("rank")]["t"]):
            newest[r.get("rank")] = r
    return max((int(r["step"]) for r in newest.values()), default=0)


def measure_recovery(
    progress: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    injected_t: float,
    *,
    old_generation: int | None = None,
) -> Recovery:
    """Recovery from a fault injected at ``injected_t``.

    With ``old_generation`` (Stanchion) the recovered ranks are those of the generation that wrote
    the first progress record newer than ``old_generation`` after the fault. Without it (torchrun:
    new processes, no generations) they are the first process per rank whose ``started`` event came
    after the fault, and their first step is the first progress record after that event (a
    survivor may still finish a step just after the kill, before its launcher stops it). The step
    they resumed from is the smallest ``resumed_step`` of their ``started`` events;
    ``steps_before`` is where the run stood at the fault (:func:`newest_step_before`).
    """
    before = newest_step_before(progress, injected_t)
    after = sorted((e for e in events if e["t"] > injected_t), key=lambda e: e["t"])
    if old_generation is not None:
        newer = [r for r in progress if r["t"] > injected_t and int(r.get("generation", -1)) > old_generation]
        if not newer:
            return Recovery(injected_t, before, None, "none", None, None)
        first = min(newer, key=lambda r: r["t"])
        gen = int(first["generation"])
        group = [
            e for e in after if e.get("event") == EventKind.STARTED and int(e.get("generation", -1)) == gen
        ]
        related = [e for e in after if int(e.get("generation", -1)) == gen]
        first_t: float | None = first["t"]
    else:
        gen = None
        group, seen = [], set()
        for e in after:
            if e.get("event") == EventKind.STARTED and e.get("rank") not in seen:
                seen.add(e.get("rank"))
                group.append(e)
        if not group:
            return Recovery(injected_t, before, None, "none", None, None)
        last = max(e["t"] for e in group)
        related = [e for e in after if e["t"] <= last]
        firsts = [r["t"] for r in progress if r["t"] > min(e["t"] for e in group)]
        first_t = min(firsts) if firsts else None
    if not group:
        return Recovery(injected_t, before, None, "none", None, first_t, gen)
    resume = min(int(e.get("resumed_step", e.get("step", 0))) for e in group)
    kinds = {e.get("event") for e in related}
    source = Resume.FRESH
    if EventKind.HEALED in kinds:
        source = Resume.PEER
    elif EventKind.RESTORED in kinds:
        source = Resume.CHECKPOINT
    reasons = sorted(
        {str(e["reason"]) for e in related if e.get("event") == EventKind.RESTORED and e.get("reason")}
    )
    return Recovery(
        injected_t, before, resume, source, min(e["t"] for e in group), first_t, gen, "; ".join(reasons)
    )


def first_decision_after(decisions: Iterable[Any], t: float, words: Sequence[str]) -> Any | None:
    """The coordinator's first decision after ``t`` whose reason contains one of ``words``."""
    hits = [d for d in decisions if d.time > t and any(w in d.reason for w in words)]
    return min(hits, key=lambda d: d.time) if hits else None


def summarize_trials(trials: Sequence[Mapping[str, Any]], system: str) -> dict[str, Any]:
    """Medians of the successful trials of one system; None where nothing was measured."""
    ok = [t for t in trials if t["system"] == system and t.get("recovery_s") is not None]
    rec = [t["recovery_s"] for t in ok]
    lost = [t["lost_steps"] for t in ok if t.get("lost_steps") is not None]
    return {
        "trials": len([t for t in trials if t["system"] == system]),
        "measured": len(ok),
        "recovery_s": median(rec) if rec else None,
        "recovery_s_min": min(rec) if rec else None,
        "recovery_s_max": max(rec) if rec else None,
        "lost_steps": median(lost) if lost else None,
        "lost_steps_max": max(lost) if lost else None,
        "first_step_s_phases": {
            k: median(t[k] for t in ok if t.get(k) is not None)
            for k in ("detected_s", "restarted_s")
            if any(t.get(k) is not None for t in ok)
        },
    }


# ---------------------------------------------------------------------------------------------
# Model and trainer settings shared by both sides


# Trainer ``--set`` keys of each benchmarked model on top of the ``tiny`` preset.
MODELS: dict[str, tuple[str, ...]] = {
    "tiny": (),  # the preset as defined
    "small": (*QUICK_MODEL, *SMALL_QUIET),  # the integration tests' 2-layer model: ~15 ms steps here
    # The tiny preset's shape at a quarter of its batch: steps long enough (~70 ms here) that
    # scheduler noise on a shared 2-core machine does not dominate a step's time.
    "medium": ("data.micro_batch_size=2", "data.global_batch_size=4", *SMALL_QUIET),
}
MODEL_HELP = (
    "tiny: the tiny preset as defined; small: the integration tests' 2-layer model (fastest steps); "
    "medium: the tiny preset's shape at batch 4 (steps a few times longer than small's). "
    "small and medium turn the spike detector off."
)


def model_sets(model: str) -> dict[str, Any]:
    """Trainer ``--set`` keys of the benchmarked model on top of the ``tiny`` preset."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: {', '.join(MODELS)}")
    return dict(s.split("=", 1) for s in MODELS[model])


def nested(sets: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": "1"}`` -> ``{"a": {"b": 1}}``, values parsed as the trainer's --set parses them."""
    from stanchion.settings import parse_assignments

    return parse_assignments([f"{k}={v}" for k, v in sets.items()])


def trainer_args(
    data: Path, *, steps: int, checkpoint_every: int, sets: Mapping[str, Any], preset: str = "tiny"
) -> list[str]:
    """Trainer flags (trainer/cli.py) for the torchrun side; the Stanchion side gets the same
    settings through its job spec (:func:`job_spec`)."""
    flags = [
        "--preset",
        preset,
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(checkpoint_every),
    ]
    for key, value in sets.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def job_spec(
    name: str,
    data_name: str,
    *,
    steps: int,
    checkpoint_every: int,
    sets: Mapping[str, Any],
    faults: Sequence[Mapping[str, Any]] = (),
    preset: str = "tiny",
    nodes: int = len(NODES),
    max_restarts: int = 50,
    max_restarts_without_progress: int = 3,
) -> str:
    from coordinator.jobspec import JobSpec, to_toml
    from stanchion.settings import merge

    trainer = merge(
        {"preset": preset, "steps": steps, "checkpoint_every": checkpoint_every, "data": {"path": data_name}},
        nested(sets),
    )
    spec = JobSpec(
        name=name,
        nodes=nodes,
        min_nodes=1,
        workers_per_node=1,
        max_restarts=max_restarts,
        max_restarts_without_progress=max_restarts_without_progress,
        faults=tuple(dict(f) for f in faults),
        trainer=trainer,
    )
    spec.train_config()  # a bad key is named before anything starts
    return to_toml(spec)


# ---------------------------------------------------------------------------------------------
# Reading what ranks write, incrementally


class Tail:
    """Every record so far of the JSON-lines files matching ``pattern`` under ``root``, read
    incrementally (stanchion.files.JsonlTails)."""

    def __init__(self, root: Path, pattern: str):
        from stanchion.files import JsonlTails

        self.tails = JsonlTails(root, pattern)
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        new = self.tails.read()
        self.records.extend(new)
        return new


# ---------------------------------------------------------------------------------------------
# The Stanchion side: a local cluster


def start_cluster(
    root: Path,
    data: Path,
    data_name: str,
    *,
    spares: int = 1,
    hang_floor_s: float = 5.0,
    agent_args: Sequence[str] = (),
    progress: Progress,
) -> LocalCluster:
    """A coordinator, the agents of :data:`NODES` (1 worker each, with ``agent_args``) and ``spares``
    spare nodes on 127.0.0.1, plaintext gRPC (TLS changes nothing on the recovery path but the
    handshake of a fresh connection), with ``data`` copied under the data root as ``data_name``."""
    cluster = LocalCluster(
        root, tls=False, hang_floor_s=hang_floor_s, stop_grace_s=10.0, heartbeat_timeout_s=10.0
    )
    shutil.copytree(data, cluster.data_root / data_name, dirs_exist_ok=True)
    try:
        cluster.start_coordinator()
        for n in NODES:
            cluster.start_agent(n, extra=list(agent_args))
        for i in range(spares):
            cluster.start_agent(f"spare-{i}", spare=True, extra=list(agent_args))
        progress(
            f"cluster: coordinator {cluster.address} (plaintext), agents {', '.join(cluster.agents)}, "
            f"hang floor {hang_floor_s:g} s"
        )
        wait_standbys(cluster, 180.0)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def standby_ready(cluster: LocalCluster, node: str) -> bool:
    """Whether ``node`` has a warm standby: a live process whose last event is ``standby``."""
    for w in (cluster.run_root / "workers" / node).glob("w*"):
        evs = read_jsonl(w / "events.jsonl")
        if evs and evs[-1].get("event") == EventKind.STANDBY and _pid_alive(int(evs[-1].get("pid", 0))):
            return True
    return False


def wait_standbys(cluster: LocalCluster, timeout_s: float) -> None:
    """Every agent has a warm standby (as in steady state: a replacement rank is always ready)."""
    wait_until(
        lambda: all(standby_ready(cluster, n) for n in cluster.agents),
        timeout_s,
        "every agent's standby rank to warm up",
        interval_s=0.1,
    )


def live_rank(cluster: LocalCluster, job_id: str, rank: int, generation: int) -> tuple[int, str] | None:
    """(pid, node) of the live process that is ``rank`` of ``job_id`` in ``generation``: the newest
    ``started`` event of each worker directory names its job, rank, generation and pid (a rank of
    an earlier job may still be alive for a moment, with the same rank and generation numbers)."""
    for w in cluster.run_root.glob("workers/*/w*"):
        started = [e for e in read_jsonl(w / "events.jsonl") if e.get("event") == EventKind.STARTED]
        if not started:
            continue
        e = started[-1]
        if (e.get("job_id"), e.get("rank"), e.get("generation")) == (job_id, rank, generation):
            pid = int(e.get("pid", 0))
            if pid and _pid_alive(pid):
                return pid, w.parent.name
    return None


def job_records(records: Iterable[Mapping[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in records if r.get("job_id") == job_id]


def stanchion_trial(
    cluster: LocalCluster,
    *,
    name: str,
    data_name: str,
    steps: int,
    checkpoint_every: int,
    kill_step: int,
    sets: Mapping[str, Any],
    timeout_s: float,
    progress: Progress,
) -> dict[str, Any]:
    """One job on the cluster; SIGKILL rank 1 once any rank completed ``kill_step``."""
    wait_standbys(cluster, 120.0)
    spec = job_spec(name, data_name, steps=steps, checkpoint_every=checkpoint_every, sets=sets)
    job_id = cluster.submit(spec)
    tail = Tail(cluster.run_root, "workers/*/w*/progress.jsonl")

    def reached() -> dict[str, Any] | None:
        tail.poll()
        recs = [r for r in tail.records if r.get("job_id") == job_id and r["step"] >= kill_step]
        return recs[-1] if recs else None

    rec = wait_until(reached, timeout_s, f"{name}: step {kill_step}", interval_s=0.01)
    generation = int(rec["generation"])
    pid, node = wait_until(
        lambda: live_rank(cluster, job_id, 1, generation), 30.0, f"{name}: rank 1's pid", interval_s=0.01
    )
    # Steady state: the node's replacement standby (spawned when the job took the last one) is warm.
    warm_wait_t = time.time()
    wait_until(lambda: standby_ready(cluster, node), 120.0, f"{name}: a warm standby on {node}")
    warm_wait_s = time.time() - warm_wait_t
    tail.poll()
    step_at_kill = max(int(r["step"]) for r in tail.records if r.get("job_id") == job_id)
    if step_at_kill >= steps - 1 or not _pid_alive(pid):
        raise BenchError(
            f"{name}: the job reached step {step_at_kill} of {steps} before {node} had a warm standby again",
            hint="give the job more --steps (a standby takes several seconds to import torch)",
        )
    killed_t = time.time()
    os.kill(pid, signal.SIGKILL)
    progress(
        f"  {name}: SIGKILL rank 1 (pid {pid}) on {node}, generation {generation}, after step {step_at_kill}"
        + (f" (waited {warm_wait_s:.1f} s for its standby to warm)" if warm_wait_s > 0.1 else "")
    )
    job = cluster.wait_job({"succeeded", "failed", "cancelled"}, timeout_s, job_id)
    decisions = list(cluster.explain(job_id).decisions)
    if job.state != types_pb2.JOB_STATE_SUCCEEDED:
        raise BenchError(
            f"{name}: job {job_id} ended in state {job.state}: {job.reason}",
            hint=f"see {cluster.root / 'logs'}",
        )
    recs = job_records(cluster.progress(), job_id)
    evs = job_records(cluster.events(), job_id)
    r = measure_recovery(recs, evs, killed_t, old_generation=generation)
    detected = first_decision_after(decisions, killed_t, ("crashed", "exited", "lost", "died"))
    return r.as_dict(
        job_id=job_id,
        killed_pid=pid,
        old_generation=generation,
        standby_wait_s=warm_wait_s,
        detected_s=None if detected is None else detected.time - killed_t,
        decision=None if detected is None else detected.reason[:300],
        restarts=job.restarts,
        final_fingerprint=job.final_fingerprint,
    )


# ---------------------------------------------------------------------------------------------
# The torchrun side


def torchrun_command(
    flags: Sequence[str], run_dir: Path, *, nproc: int = 2, max_restarts: int = 3
) -> list[str]:
    return torchrun(nproc, "-m", "trainer", "--run-dir", str(run_dir), *flags, max_restarts=max_restarts)


@dataclass
class TorchrunJob:
    """One torchrun launch of the trainer, watched through the files its ranks write."""

    run_dir: Path
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    progress: Tail | None = None
    events: Tail | None = None
    kills: list[dict[str, Any]] = field(default_factory=list)

    def start(self, threads: int = 1) -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        self.log = self.run_dir / "torchrun.log"
        env = {**bench_env(threads), **TORCHRUN_ENV}
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        self.progress = Tail(self.run_dir, "ranks/rank-*/progress.jsonl")
        self.events = Tail(self.run_dir, "ranks/rank-*/events.jsonl")

    def poll(self) -> None:
        assert self.progress is not None and self.events is not None
        self.progress.poll()
        self.events.poll()

    def newest_step(self) -> int:
        self.poll()
        assert self.progress is not None
        return max((int(r["step"]) for r in self.progress.records), default=0)

    def rank_pid(self, rank: int) -> int | None:
        """The rank's current process (each new process beats into the same heartbeat), if it is
        alive and a trainer."""
        beat = liveness.read(self.run_dir / "ranks" / f"rank-{rank:05d}")
        if beat is None:
            return None
        pid = beat.pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"trainer" in cmdline and _pid_alive(pid) else None

    def kill_rank(self, rank: int) -> tuple[int, float]:
        """SIGKILL the rank's live process (never one this job already killed)."""

        def fresh() -> int | None:
            pid = self.rank_pid(rank)
            return pid if pid is not None and pid not in {k["pid"] for k in self.kills} else None

        pid = wait_until(fresh, 30.0, f"torchrun rank {rank}'s process", interval_s=0.01)
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        self.kills.append({"pid": pid, "t": t, "rank": rank})
        return pid, t

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"torchrun: no result after {timeout_s:.0f} s", hint=f"see {self.log}") from None
        self.poll()
        return code

    def stop(self) -> None:
        """SIGKILL the launcher's session (the launcher and its workers), which this module started."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def failed(self, code: int) -> BenchError:
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log else []
        return BenchError(f"torchrun exited with code {code}: {' '.join(tail)[:300]}", hint=f"see {self.log}")


def torchrun_detected_t(log_text: str, after_t: float) -> float | None:
    """When torchrun's agent logged the worker failure (its ``failed (exitcode: ...)`` line, glog
    timestamp ``E1127 13:24:28.277000``, local time), first at or after ``after_t`` - 1 s."""
    import datetime
    import re

    year = time.localtime(after_t).tm_year
    for m in re.finditer(
        r"^[EWI](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}(?:\.\d+)?) .*failed \(exitcode", log_text, re.M
    ):
        mon, day, hh, mm = (int(x) for x in m.groups()[:4])
        sec = float(m.group(5))
        t = datetime.datetime(year, mon, day, hh, mm).timestamp() + sec
        if t >= after_t - 1.0:
            return t
    return None


def torchrun_trial(
    run_dir: Path,
    flags: Sequence[str],
    *,
    kill_step: int,
    max_restarts: int,
    timeout_s: float,
    progress: Progress,
) -> dict[str, Any]:
    job = TorchrunJob(run_dir, torchrun_command(flags, run_dir, max_restarts=max_restarts))
    job.start()
    try:
        wait_until(
            lambda: job.newest_step() >= kill_step, timeout_s, f"torchrun step {kill_step}", interval_s=0.01
        )
        pid, killed_t = job.kill_rank(1)
        progress(f"  torchrun: SIGKILL rank 1 (pid {pid}) after step {job.newest_step()}")
        code = job.wait(timeout_s)
    except BaseException:
        job.stop()
        raise
    if code != 0:
        raise job.failed(code)
    assert job.progress is not None and job.events is not None
    r = measure_recovery(job.progress.records, job.events.records, killed_t)
    done = [e for e in job.events.records if e.get("event") == EventKind.FINISHED and e.get("rank") == 0]
    detected = torchrun_detected_t(job.log.read_text(errors="replace"), killed_t) if job.log else None
    return r.as_dict(
        killed_pid=pid,
        detected_s=None if detected is None else detected - killed_t,
        command=shown(job.cmd),
        final_fingerprint=done[-1].get("fingerprint") if done else None,
    )


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_recovery(
    *,
    data: Path,
    work_dir: Path,
    command: str,
    trials: int = 5,
    model: str = "tiny",
    steps: int = 60,
    checkpoint_every: int = 20,
    kill_step: int = 25,
    max_restarts: int = 3,
    torchft: bool = True,
    timeout_s: float = 600.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    from diagnostics.bench import torchft as tft  # imports this module

    if not 0 < kill_step < steps:
        raise BenchError(f"--kill-step {kill_step} must be inside the run (1..{steps - 1})")
    if torchft and (missing := tft.available()) is not None:
        raise BenchError(missing, hint="or leave torchft out with --no-torchft")
    systems = ["stanchion", "torchrun", *(["torchft"] if torchft else [])]
    load_at_start = os.getloadavg()
    sets = model_sets(model)
    data_name = "bench-data"
    flags = trainer_args(data, steps=steps, checkpoint_every=checkpoint_every, sets=sets)
    trial_rows: list[dict[str, Any]] = []
    cluster = start_cluster(work_dir / "cluster", data, data_name, spares=1, progress=progress)
    try:
        for round_, system in interleaved(systems, trials):
            progress(f"trial {round_ + 1}/{trials}: {system}")
            t0 = time.time()
            if system == "stanchion":
                row = stanchion_trial(
                    cluster,
                    name=f"recovery-{round_}",
                    data_name=data_name,
                    steps=steps,
                    checkpoint_every=checkpoint_every,
                    kill_step=kill_step,
                    sets=sets,
                    timeout_s=timeout_s,
                    progress=progress,
                )
            elif system == "torchrun":
                row = torchrun_trial(
                    work_dir / "torchrun" / f"trial-{round_}",
                    flags,
                    kill_step=kill_step,
                    max_restarts=max_restarts,
                    timeout_s=timeout_s,
                    progress=progress,
                )
            else:
                row = tft.torchft_trial(
                    work_dir / "torchft" / f"trial-{round_}",
                    data=data,
                    steps=steps,
                    sets=sets,
                    kill_step=kill_step,
                    timeout_s=timeout_s,
                    progress=progress,
                )
            row.update(system=system, round=round_, wall_s=time.time() - t0, load_1min=os.getloadavg()[0])
            progress(
                f"  {system}: recovery {row['recovery_s']:.3f} s, lost {row['lost_steps']} steps "
                f"(resumed from {row['resume_source']} at step {row['resume_step']}, "
                f"{row['steps_before']} completed before the kill)"
                if row["recovery_s"] is not None
                else f"  {system}: no recovery seen"
            )
            trial_rows.append(row)
    finally:
        cluster.stop()
    st, tr = summarize_trials(trial_rows, "stanchion"), summarize_trials(trial_rows, "torchrun")
    ft = summarize_trials(trial_rows, "torchft") if torchft else None
    if ft is not None:
        full = [t["full_world_s"] for t in trial_rows if t["system"] == "torchft" and t.get("full_world_s")]
        ft["full_world_s"] = median(full) if full else None
    # Stanchion and torchrun train the same job whatever was killed; torchft does not (a survivor
    # alone averages only its own gradients), so its final state is reported apart.
    fingerprints = {t["final_fingerprint"] for t in trial_rows if t["system"] != "torchft"}

    def per_round(other: str) -> list[float | None]:
        return [
            ratio(s["recovery_s"], t["recovery_s"])
            for s, t in zip(
                sorted((x for x in trial_rows if x["system"] == "stanchion"), key=lambda x: x["round"]),
                sorted((x for x in trial_rows if x["system"] == other), key=lambda x: x["round"]),
                strict=False,
            )
        ]

    rt = ratio(st["recovery_s"], tr["recovery_s"])
    rft = None if ft is None else ratio(st["recovery_s"], ft["recovery_s"])
    results = {
        "stanchion_recovery_s": st["recovery_s"],
        "torchrun_recovery_s": tr["recovery_s"],
        "ratio": rt,
        "ratio_per_round": per_round("torchrun"),
        "stanchion_lost_steps": st["lost_steps"],
        "torchrun_lost_steps": tr["lost_steps"],
        "torchft_recovery_s": None if ft is None else ft["recovery_s"],
        "torchft_lost_steps": None if ft is None else ft["lost_steps"],
        "torchft_full_world_s": None if ft is None else ft["full_world_s"],
        "ratio_vs_torchft": rft,
        "ratio_vs_torchft_per_round": per_round("torchft") if ft is not None else [],
        "stanchion": st,
        "torchrun": tr,
        "torchft": ft,
        # Every trial of both systems trains the same job: one final state, whatever was killed.
        "final_fingerprints_equal": len(fingerprints) == 1,
        "final_fingerprints": sorted(str(f) for f in fingerprints),
        "trials": trial_rows,
    }
    goals = [
        goal(
            f"Stanchion recovery <= {RECOVERY_GOAL} x torchrun's",
            rt,
            f"<= {RECOVERY_GOAL}",
            None if rt is None else rt <= RECOVERY_GOAL,
            "median kill-to-first-step of Stanchion / median of torchrun, same run, ABBA order",
        ),
        goal(
            "0 lost steps for a single-rank crash while a data-parallel peer lives",
            st["lost_steps_max"],
            "== 0 in every trial",
            None if st["lost_steps_max"] is None else st["lost_steps_max"] == 0,
            "max over Stanchion trials of (newest step completed before the kill - resumed step)",
        ),
    ]
    if ft is not None:
        goals.append(
            goal(
                f"Stanchion recovery <= {TORCHFT_GOAL} x torchft's",
                rft,
                f"<= {TORCHFT_GOAL}",
                None if rft is None else rft <= TORCHFT_GOAL,
                "median kill-to-first-step of Stanchion / median kill-to-first-committed-step-started-"
                "after-the-kill of torchft (its survivor going on), same run, interleaved",
            )
        )
    settings = {
        "data": str(data),
        "model": model,
        "model_sets": sets,
        "preset": "tiny",
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "kill_step": kill_step,
        "trials": trials,
        "order": [f"{s} r{r}" for r, s in interleaved(systems, trials)],
        "stanchion": {
            "cluster": f"coordinator + {len(NODES)} nodes x 1 worker + 1 spare node, 127.0.0.1",
            "tls": False,
            "standby": "each agent keeps one warm standby rank (the product default); the benchmark "
            "waits until every agent has one before each trial",
        },
        "torchrun": {
            "command": shown(torchrun_command(flags, Path("RUN_DIR"), max_restarts=max_restarts)),
            "env": TORCHRUN_ENV,
            "max_restarts": max_restarts,
        },
        "torchft": None
        if not torchft
        else {
            "worker": shown(tft.TorchftJob(Path("RUN_DIR"), data, steps, sets).command(0)),
            "lighthouse": shown(tft.lighthouse_command(0)),
            "env": tft.TORCHFT_ENV,
            "replicas": "2 replica groups of 1 rank; the bench restarts a dead one at once",
        },
    }
    notes = [
        "recovery_s: SIGKILL of rank 1 -> first progress record (any rank) of the recovered ranks "
        "(Stanchion: a newer generation; torchrun: the restarted processes), time.time() on one machine",
        "lost_steps: newest step any rank completed before the kill - the step the recovered ranks "
        "resumed from (their `started` events' resumed_step); a step cut short by the kill is not counted",
        "restarted_s: the recovered ranks' first `started` event (process group formed, state restored); "
        "detected_s: Stanchion, the coordinator's decision about the crash; torchrun, its agent's log line "
        "`failed (exitcode: -9)` (glog timestamps have microseconds)",
        "the kill lands at a random point inside the step after kill_step was observed (polled every 10 ms); "
        "on the Stanchion side it waits, if needed, until rank 1's node has a warm standby again (the job's "
        "start took the previous one): standby_wait_s, so a trial measures the steady state",
        "the Stanchion cluster idles (heartbeats, warm standbys) while the torchrun trials run",
        "torchft (diagnostics/bench/torchft.py): recovery_s is the kill -> the first committed step that "
        "started after it, on any replica (the survivor goes on alone once the lighthouse has declared "
        "the dead replica gone: 1 s without heartbeats); full_world_s -> the first committed step with "
        "both replicas again (the restarted process healed from the survivor over HTTP); lost_steps: "
        "newest committed step at the kill - the step the survivor went on from; its final state differs "
        "from the others' (while alone the survivor averages only its own gradients)",
    ]
    return envelope(
        "recovery",
        command,
        settings,
        results,
        goals=goals,
        notes=notes,
        load_at_start=load_at_start,
        headline=(
            "stanchion_recovery_s",
            "torchrun_recovery_s",
            "ratio",
            "stanchion_lost_steps",
            "torchrun_lost_steps",
            "torchft_recovery_s",
            "ratio_vs_torchft",
            "torchft_lost_steps",
            "trials",
        ),
    )
