"""Bisection orchestration: runs the pure planner (diagnostics/bisect.py) against real agents.

A round's groups run the deterministic trial (trainer/trial.py) in parallel, each group forming its
own process group through its first node's TCPStore. Agents return traces with their heartbeats;
when every group of the round has reported, the planner picks the next round or the verdict. The
verdict is stored, the named nodes are cordoned, and a job waiting in BISECTING resumes without them.

Everything here runs on the controller's task (the single writer).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator import machine as m
from coordinator.bisection.planner import BisectConfig, Round, TrialResult, Verdict, plan
from protos.stanchion.v1 import agent_pb2
from stanchion.vocab import CoordinatorEventKind
from trainer.trial import trace_key

log = logging.getLogger(__name__)

DEFAULT_TRIAL_STEPS = 8
TRIAL_DEADLINE_S = 240.0


class BisectionError(ValueError):
    pass


@dataclass
class Run:
    bisection_id: str
    job_id: str
    suspects: list[str]
    cfg: BisectConfig
    steps: int
    seed: int
    results: list[TrialResult] = field(default_factory=list)
    round: Round | None = None
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # trial id -> group
    traces: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial id -> node -> trace key or None
    round_started: float = 0.0
    state: str = "running"
    verdict: Verdict | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "suspects": self.suspects,
            "faulty": list(v.faulty) if v else [],
            "cleared": list(v.cleared) if v else [],
            "inconclusive": list(v.inconclusive) if v else [],
            "rounds": v.rounds if v else len(self.history),
            "confidence": v.confidence if v else 0.0,
            "reference": v.reference if v else "",
            "reason": v.reason if v else "",
            "history": self.history,
            "steps": self.steps,
            "group_size": self.cfg.group_size,
            "wall_s": time.time() - self.started,
        }


class Bisector:
    def __init__(self, controller: Any):
        self.c = controller
        self.runs: dict[str, Run] = {}

    # -- starting ---------------------------------------------------------------------------------
    def start(
        self,
        nodes: list[str],
        *,
        job_id: str = "",
        steps: int = 0,
        group_size: int = 1,
        p_show: float = 1.0,
        delta: float = 1e-3,
    ) -> Run:
        nodes = nodes or sorted(n for n, r in self.c.nodes.items() if not r.lost and not r.cordoned)
        unknown = [n for n in nodes if n not in self.c.nodes]
        if unknown:
            raise BisectionError(f"unknown node(s) {', '.join(unknown)} (see `stanchion node list`)")
        lost = [n for n in nodes if self.c.nodes[n].lost]
        if lost:
            raise BisectionError(f"node(s) {', '.join(lost)} are lost and cannot run trials")
        if len(nodes) < 2:
            raise BisectionError("a bisection needs at least 2 nodes")
        try:
            cfg = BisectConfig(group_size=group_size or 1, p_show=p_show or 1.0, delta=delta or 1e-3)
        except ValueError as e:
            raise BisectionError(str(e)) from None
        run = Run(
            f"bisect-{uuid.uuid4().hex[:8]}", job_id, list(nodes), cfg, steps or DEFAULT_TRIAL_STEPS, seed=0
        )
        self.runs[run.bisection_id] = run
        self._advance(run)
        return run

    def start_for_job(self, job: m.Job, action: m.StartBisection) -> None:
        try:
            run = self.start(list(action.nodes), job_id=job.job_id)
        except BisectionError as e:
            log.error("[job %s] cannot bisect: %s", job.job_id, e)
            self.c._apply(
                job.job_id, m.BisectionDone("", (), f"the bisection could not start: {e}"), "bisection failed"
            )
            return
        log.info(
            "[job %s] bisection %s started on %s: %s",
            job.job_id,
            run.bisection_id,
            ", ".join(run.suspects),
            action.reason,
        )

    def busy(self, node_id: str) -> bool:
        return any(r.state == "running" and node_id in r.suspects for r in self.runs.values())

    # -- progress ---------------------------------------------------------------------------------
    def on_traces(self, node_id: str, traces: list[agent_pb2.Trace]) -> None:
        for t in traces:
            for run in self.runs.values():
                if t.trial_id in run.groups and run.state == "running":
                    key = trace_key(list(t.loss_bits), list(t.fingerprints)) if t.ok and t.loss_bits else None
                    run.traces.setdefault(t.trial_id, {})[node_id] = key
                    if not t.ok:
                        log.warning("trial %s failed on %s: %s", t.trial_id, node_id, t.error)
                    self._maybe_finish_round(run)

    def tick(self, now: float) -> None:
        for run in list(self.runs.values()):
            if (
                run.state == "running"
                and run.round is not None
                and now - run.round_started > TRIAL_DEADLINE_S
            ):
                for tid, group in run.groups.items():  # whoever did not report failed to run
                    for n in group:
                        run.traces.setdefault(tid, {}).setdefault(n, None)
                self._maybe_finish_round(run)

    def _maybe_finish_round(self, run: Run) -> None:
        if run.round is None or any(len(run.traces.get(t, {})) < len(g) for t, g in run.groups.items()):
            return
        summary = []
        for tid, group in run.groups.items():
            keys = run.traces[tid]
            leader = keys.get(group[0])
            trace = leader if leader is not None and all(keys.get(n) == leader for n in group) else None
            run.results.append(TrialResult(run.round.index, group, trace))
            summary.append(f"{'+'.join(group)}={trace or 'failed'}")
        run.history.append(
            {
                "round": run.round.index,
                "groups": [list(g) for g in run.groups.values()],
                "traces": {"+".join(g): run.traces[t] for t, g in run.groups.items()},
                "summary": "; ".join(summary),
                "reason": run.round.reason,
            }
        )
        self._advance(run)

    def _advance(self, run: Run) -> None:
        outcome = plan(run.suspects, run.results, run.cfg)
        if isinstance(outcome, Verdict):
            self._conclude(run, outcome)
            return
        run.round, run.groups, run.traces = outcome, {}, {}
        run.round_started = time.time()
        for i, group in enumerate(outcome.groups):
            tid = f"{run.bisection_id}-r{outcome.index}-g{i}"
            run.groups[tid] = tuple(group)
            leader = self.c.nodes[group[0]].view("")
            for rank, node_id in enumerate(group):
                self._send(
                    node_id,
                    run,
                    agent_pb2.RunTrial(
                        trial_id=tid,
                        group_rank=rank,
                        group_size=len(group),
                        master_addr=leader.host,
                        master_port=leader.store_port,
                        steps=run.steps,
                        seed=run.seed,
                        workers_per_node=1,
                    ),
                )
        self._save(run)

    def _send(self, node_id: str, run: Run, trial: agent_pb2.RunTrial) -> None:
        rec = self.c.nodes.get(node_id)
        if rec is not None:
            rec.outbox.append(
                agent_pb2.Directive(
                    seq=next(self.c._seq), job_id=run.job_id or run.bisection_id, generation=0, trial=trial
                )
            )

    def _conclude(self, run: Run, v: Verdict) -> None:
        run.verdict, run.state, run.round = v, "done", None
        log.info(
            "bisection %s: %s (rounds %d, confidence %.6f, reference %s)",
            run.bisection_id,
            v.reason,
            v.rounds,
            v.confidence,
            v.reference,
        )
        for node_id in v.faulty:
            self.c._set_node(
                node_id, cordoned=True, reason=f"bisection {run.bisection_id} named it: {v.reason}"[:500]
            )
        self._save(run)
        self.c.store.add_events(
            [(run.job_id, "", CoordinatorEventKind.BISECTION_DONE, 0, 0, -1, time.time(), run.to_json())]
        )
        if run.job_id and run.job_id in self.c.jobs and self.c.jobs[run.job_id].state is m.JobState.BISECTING:
            self.c._apply(
                run.job_id, m.BisectionDone(run.bisection_id, tuple(v.faulty), v.reason), "bisection done"
            )

    def _save(self, run: Run) -> None:
        self.c.store.save_bisection(run.bisection_id, run.job_id, run.state, run.to_json())
