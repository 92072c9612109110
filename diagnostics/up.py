"""`stanchion up`: the whole product on one machine, with real faults if asked.

It starts a coordinator and agents on 127.0.0.1 (fresh mTLS certificates unless --insecure),
prepares the default corpus if needed, submits a job, shows progress live, and (with --chaos SEED)
injects a seeded schedule of real faults: a SIGKILLed rank, a SIGSTOPped (hung) rank, a killed agent,
a killed and restarted coordinator, a bit flip and a NaN. It ends with a summary: steps, restarts by
reason, recovery times, lost steps, ETTR, final validation loss and sampled text. Every process it
started is stopped on exit and on Ctrl-C.
"""

from __future__ import annotations

import json
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.localcluster import LocalCluster

EXTERNAL = ("crash", "hang", "agent", "coordinator")  # faults `up` causes from outside the ranks
INTERNAL = ("bitflip", "nan")  # faults the ranks' injector fires (the job spec's schedule)


@dataclass
class Fault:
    kind: str
    step: int  # training step at (or after) which it is injected
    target: str = ""  # node id
    injected_at: float | None = None
    generation_before: int = 0
    detail: str = ""


@dataclass
class UpOptions:
    run_dir: Path
    nodes: int = 2
    spares: int = 1
    workers_per_node: int = 1
    steps: int = 300
    preset: str = "tiny"
    corpus: str = "sotu"
    vocab_size: int = 2048
    chaos: int | None = None
    tls: bool = True
    sets: dict[str, Any] = field(default_factory=dict)
    samples: int = 3
    hang_floor_s: float = 5.0


def chaos_schedule(seed: int, steps: int, nodes: list[str]) -> list[Fault]:
    """One fault of each kind, at seeded, spread-out steps in the middle of the run."""
    rng = random.Random(seed)
    kinds = list(EXTERNAL + INTERNAL)
    rng.shuffle(kinds)
    lo, hi = int(steps * 0.12), int(steps * 0.85)
    span = (hi - lo) // len(kinds)
    out = []
    for i, kind in enumerate(kinds):
        step = lo + i * span + rng.randrange(max(1, span // 2))
        out.append(Fault(kind, step, rng.choice(nodes)))
    return out


class Up:
    def __init__(self, opts: UpOptions, console: Any):
        self.o = opts
        self.console = console
        self.cluster = LocalCluster(
            opts.run_dir,
            tls=opts.tls,
            hang_floor_s=opts.hang_floor_s,
            stop_grace_s=15.0,
            heartbeat_timeout_s=10.0,
        )
        self.nodes = [f"node-{i}" for i in range(opts.nodes)]
        self.spares = [f"spare-{i}" for i in range(opts.spares)]
        self.faults = chaos_schedule(opts.chaos, opts.steps, self.nodes) if opts.chaos is not None else []
        self.job_id = ""
        self.seen_decisions = 0
        self.started = 0.0
        self.finished = 0.0
        self.data_name = (
            f"{opts.corpus}-{opts.vocab_size}"
            if opts.corpus in ("sotu", "fixture")
            else f"corpus-{opts.vocab_size}"
        )

    # -- setting up ---------------------------------------------------------------------------------
    def prepare_data(self) -> Path:
        from trainer.data import prepare

        out = self.cluster.data_root / self.data_name
        if not (out / "meta.json").exists():
            self.say(f"preparing the {self.o.corpus} corpus (vocab {self.o.vocab_size}) in {out}")
            prepare(self.o.corpus, self.o.vocab_size, out, progress=lambda m: None)
        return out

    def spec(self) -> str:
        from coordinator.jobspec import JobSpec, to_toml
        from trainer.settings import merge

        trainer = merge(
            {"preset": self.o.preset, "steps": self.o.steps, "data": {"path": self.data_name}}, self.o.sets
        )
        faults = []
        for f in self.faults:
            rank = self.nodes.index(f.target) * self.o.workers_per_node if f.target in self.nodes else 0
            if f.kind == "nan":
                faults.append({"kind": "nan", "step": f.step, "rank": rank})
            elif f.kind == "bitflip":
                faults.append({"kind": "bitflip", "step": f.step, "rank": rank, "target": "param", "bit": 24})
        spec = JobSpec(
            name="demo",
            nodes=self.o.nodes,
            min_nodes=1,
            workers_per_node=self.o.workers_per_node,
            faults=tuple(faults),
            trainer=trainer,
        )
        spec.train_config()  # a bad --set names its key before anything starts
        return to_toml(spec)

    def start(self) -> None:
        c = self.cluster
        import shutil

        # A fresh cluster every time: the prepared data is kept, state, runs and logs are not.
        for stale in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
            (c.root / stale).unlink(missing_ok=True)
        for d in ("runs", "logs"):
            shutil.rmtree(c.root / d, ignore_errors=True)
            (c.root / d).mkdir(parents=True)
        if self.o.tls:
            c.init_tls(self.nodes + self.spares)
        c.start_coordinator()
        self.say(
            f"coordinator on {c.address} ({'mTLS' if self.o.tls else 'plaintext'}), metrics on :{c.metrics_port}"
        )
        for n in self.nodes:
            c.start_agent(n, workers=self.o.workers_per_node)
        for s in self.spares:
            c.start_agent(s, workers=self.o.workers_per_node, spare=True)
        self.say(
            f"agents: {', '.join(self.nodes)}"
            + (f"; spares: {', '.join(self.spares)}" if self.spares else "")
        )

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.prepare_data()
        spec = self.spec()
        self.start()
        self.cluster.wait_warm()
        self.job_id = self.cluster.submit(spec)
        self.started = time.time()
        self.say(
            f"job {self.job_id}: {self.o.steps} steps of the {self.o.preset} preset on {self.o.nodes} node(s)"
            + (
                f", chaos seed {self.o.chaos}: " + ", ".join(f"{f.kind}@{f.step}" for f in self.faults)
                if self.faults
                else ""
            )
        )
        job = self.watch()
        self.finished = time.time()
        return self.summary(job)

    def watch(self) -> Any:
        from protos.stanchion.v1 import types_pb2

        live = _Display(self) if self.console.is_terminal else None
        last_print = 0
        try:
            if live:
                live.start()
            while True:
                try:
                    job = self.cluster.job(self.job_id)
                except Exception:  # noqa: BLE001 - the coordinator may be restarting (chaos)
                    time.sleep(0.3)
                    continue
                self.new_decisions()
                self.inject(job)
                state = types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
                rec = self.latest_progress()
                if live:
                    live.update(job, state, rec)
                elif rec and rec.get("step", 0) >= last_print + 25:
                    last_print = rec["step"]
                    self.say(
                        f"step {rec['step']:>5}/{self.o.steps}  loss {rec['loss']:.4f}  "
                        f"{rec.get('tokens_per_s', 0):,.0f} tok/s  gen {job.generation}  {state}"
                    )
                if state in ("succeeded", "failed", "cancelled"):
                    self.new_decisions()
                    return job
                time.sleep(0.25)
        finally:
            if live:
                live.stop()

    def new_decisions(self) -> None:
        try:
            decisions = self.cluster.explain(self.job_id).decisions
        except Exception:  # noqa: BLE001 - the coordinator may be restarting
            return
        for d in decisions[self.seen_decisions :]:
            if "checkpoint at step" in d.reason and "is good" in d.reason:
                continue  # routine; `stanchion job explain` lists them all
            self.say(f"[{time.strftime('%H:%M:%S')}] gen {d.generation}: {d.reason}")
        self.seen_decisions = len(decisions)

    def latest_progress(self) -> dict[str, Any] | None:
        recs = [r for r in self.cluster.progress() if r.get("job_id") == self.job_id and r.get("rank") == 0]
        return recs[-1] if recs else None

    def inject(self, job: Any) -> None:
        for f in self.faults:
            if f.injected_at is not None or f.kind in INTERNAL or job.step < f.step:
                continue
            if job.state not in (2,):  # only while RUNNING, so each fault meets a healthy job
                return
            f.injected_at, f.generation_before = time.time(), job.generation
            if f.target not in job.nodes:  # the scheduled node left the job (replaced earlier): hit a member
                f.target = job.nodes[len(f.kind) % len(job.nodes)]
            c = self.cluster
            if f.kind in ("crash", "hang"):
                ranks = [r for r in c.ranks(f.target) if r["generation"] == job.generation]
                if not ranks:
                    f.detail = "no live rank found"
                    continue
                c.signal_pid(ranks[0]["pid"], signal.SIGKILL if f.kind == "crash" else signal.SIGSTOP)
                f.detail = f"{'SIGKILL' if f.kind == 'crash' else 'SIGSTOP'} rank {ranks[0]['rank']} (pid {ranks[0]['pid']}) on {f.target}"
            elif f.kind == "agent":
                c.kill_agent(f.target)
                f.detail = f"SIGKILL the agent of {f.target} (its ranks die with it)"
                c.restart_agent(f.target)  # as systemd would; it rejoins as a free node
            elif f.kind == "coordinator":
                c.kill_coordinator()
                f.detail = "SIGKILL the coordinator, then restart it on the same state"
                c.start_coordinator()
            self.say(f"[{time.strftime('%H:%M:%S')}] chaos: {f.detail} at step {job.step}")
            return  # one fault at a time

    # -- the summary -----------------------------------------------------------------------------------
    def summary(self, job: Any) -> dict[str, Any]:
        from protos.stanchion.v1 import types_pb2

        recs = [r for r in self.cluster.progress() if r.get("job_id") == self.job_id and r.get("rank") == 0]
        steps = job.step
        final = [r for r in recs if r.get("generation") == job.generation]
        step_times = [r["step_time_s"] for r in recs if r.get("step_time_s")]
        median_step = statistics.median(step_times) if step_times else 0.0
        wall = self.finished - self.started
        explain = self.cluster.explain(self.job_id)
        decisions = list(explain.decisions)
        restarts = _restarts_by_reason(self.cluster, self.job_id)
        recovery = []
        injected = sorted((f for f in self.faults if f.injected_at is not None), key=lambda f: f.injected_at)
        for i, f in enumerate(injected):
            if f.kind == "coordinator":
                continue  # training does not stop while the coordinator restarts: nothing to recover
            until = injected[i + 1].injected_at if i + 1 < len(injected) else float("inf")
            after = [
                r["t"]
                for r in recs
                if f.injected_at < r["t"] < until and r.get("generation", 0) > f.generation_before
            ]
            if after:
                recovery.append(round(min(after) - f.injected_at, 3))
        val = None
        finished = [e for e in self.cluster.events("finished") if e.get("job_id") == self.job_id]
        if finished:
            val = finished[-1].get("val_loss")
        detected = self._detected(decisions)
        meta = json.loads((self.cluster.data_root / self.data_name / "meta.json").read_text())
        out = {
            "job_id": self.job_id,
            "state": types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
            "steps_completed": steps,
            "steps_computed": len(recs),
            "lost_steps": max(0, len(recs) - steps),
            "final_fingerprint": job.final_fingerprint,
            "restarts": restarts,
            "faults_injected": [
                {"kind": f.kind, "step": f.step, "target": f.target, "detail": f.detail}
                for f in self.faults
                if f.injected_at is not None or f.kind in INTERNAL
            ],
            "faults_detected": detected,
            "recovery_seconds": recovery,
            "coordinator_recovery_seconds": _coordinator_recoveries(decisions),
            "wall_seconds": round(wall, 2),
            "median_step_seconds": median_step,
            "ettr": round(min(1.0, steps * median_step / wall), 4) if wall > 0 else None,
            "final_val_loss": val,
            "unigram_entropy_nats": meta.get("unigram_entropy_nats"),
            "generations": job.generation,
            "final_generation_steps": len(final),
        }
        ckpts = sorted((self.cluster.run_root / self.job_id / "checkpoints").glob("step-*"))
        out["samples"] = []
        if self.o.samples and ckpts and out["state"] == "succeeded":
            from trainer.sample import sample_lines

            out["samples"] = sample_lines(ckpts[-1], self.o.samples)
        return out

    def _detected(self, decisions: list[Any]) -> list[dict[str, Any]]:
        signs = {
            "crash": ("crashed",),
            "hang": ("hung",),
            # a killed agent's node is either declared lost, or its restarted agent reports its ranks gone
            "agent": ("lost", "went silent", "its agent restarted"),
            "coordinator": ("coordinator restarted",),
            "nan": ("nonfinite",),
            "bitflip": ("replica fingerprints",),
        }
        out = []
        for f in self.faults:
            if f.kind in EXTERNAL and f.injected_at is None:
                continue  # the job finished before its turn came
            since = f.injected_at if f.injected_at is not None else 0.0  # the trainer's own faults: any time
            hits = [d for d in decisions if d.time >= since and any(s in d.reason for s in signs[f.kind])]
            out.append(
                {"kind": f.kind, "detected": bool(hits), "decision": hits[0].reason[:200] if hits else ""}
            )
        return out


def _restarts_by_reason(cluster: LocalCluster, job_id: str) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(cluster.root / "coordinator.db") as db:
        row = db.execute("SELECT data FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return dict(json.loads(row[0]).get("restarts_by_reason", [])) if row else {}


def _coordinator_recoveries(decisions: list[Any]) -> list[float]:
    import re

    out = []
    for d in decisions:
        m = re.search(r"recovered in ([0-9.]+)s", d.reason)
        if m:
            out.append(float(m.group(1)))
    return out


class _Display:
    """A live panel for terminals (rich)."""

    def __init__(self, up: Up):
        from rich.live import Live

        self.up = up
        self.live = Live(console=up.console, refresh_per_second=4, transient=True)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self, job: Any, state: str, rec: dict[str, Any] | None) -> None:
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        t.add_row("job", self.up.job_id, "state", state, "generation", str(job.generation))
        if rec:
            t.add_row(
                "step",
                f"{rec['step']}/{self.up.o.steps}",
                "loss",
                f"{rec['loss']:.4f}",
                "tokens/s",
                f"{rec.get('tokens_per_s', 0):,.0f}",
            )
        t.add_row(
            "restarts",
            str(job.restarts),
            "nodes",
            ",".join(job.nodes),
            "elapsed",
            f"{time.time() - self.up.started:.0f}s",
        )
        self.live.update(t)
