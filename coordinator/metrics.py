"""The coordinator's Prometheus endpoint: values read at scrape time from the controller."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator import machine as m
from coordinator.controller import Controller
from stanchion.buildinfo import build_info
from stanchion.net import bind_http
from stanchion.vocab import RestartReason

RECOVERY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
NODE_STATES = ("ready", "cordoned", "draining", "lost")


class CoordinatorCollector(Collector):
    def __init__(self, controller: Controller, clock: Callable[[], float] = time.time):
        self.c = controller
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self.c.snapshot()
        jobs: dict[str, m.Job] = snap["jobs"]
        nodes = snap["nodes"]
        now = self.clock()
        yield build_info("coordinator")
        state = GaugeMetricFamily(
            "stanchion_job_state", "1 for the job's current state.", labels=["job_id", "state"]
        )
        step = GaugeMetricFamily(
            "stanchion_job_step", "Newest optimizer step reported by the job.", labels=["job_id"]
        )
        restarts = CounterMetricFamily(
            "stanchion_job_restarts", "Generations restarted, by reason.", labels=["job_id", "reason"]
        )
        recovery = HistogramMetricFamily(
            "stanchion_recovery_seconds",
            "From the fault (its agent's account) to the first step of the new generation.",
            labels=["job_id"],
        )
        goodput = GaugeMetricFamily(
            "stanchion_goodput_ratio",
            "Steps in the current lineage x median step time / wall time since launch.",
            labels=["job_id"],
        )
        good_step = GaugeMetricFamily(
            "stanchion_last_good_checkpoint_step", "Step of the newest good checkpoint.", labels=["job_id"]
        )
        good_time = GaugeMetricFamily(
            "stanchion_last_good_checkpoint_timestamp_seconds",
            "Unix time the newest good checkpoint was recorded.",
            labels=["job_id"],
        )
        deadline = GaugeMetricFamily(
            "stanchion_first_step_deadline_seconds",
            "How long the job's next generation may take from launch to its first step before the "
            "recovery escalates (derived from the job's own launches unless the spec sets it).",
            labels=["job_id"],
        )
        rung = GaugeMetricFamily(
            "stanchion_recovery_rung",
            "Escalation rung of the recovery in progress: 0 in place, 1 fresh processes from the last "
            "good checkpoint, 2 without the nodes that did not join.",
            labels=["job_id"],
        )
        first_step = GaugeMetricFamily(
            "stanchion_first_step_seconds",
            "Launch to first completed step of the job's most recent generation that formed.",
            labels=["job_id"],
        )
        for job_id, job in jobs.items():
            deadline.add_metric([job_id], m.first_step_deadline_s(job))
            rung.add_metric([job_id], job.rung)
            if job.first_step_s:
                first_step.add_metric([job_id], job.first_step_s[-1])
            for s in m.JobState:
                state.add_metric([job_id, s.value], 1.0 if job.state is s else 0.0)
            step.add_metric([job_id], job.step)
            counts = dict(job.restarts_by_reason)
            for reason in sorted({*RestartReason, *counts}):  # every known reason, 0 until counted
                restarts.add_metric([job_id, reason], counts.get(reason, 0))
            buckets, total = [], 0
            for b in RECOVERY_BUCKETS:
                buckets.append((str(b), sum(1 for r in job.recoveries if r <= b)))
            buckets.append(("+Inf", len(job.recoveries)))
            total = sum(job.recoveries)
            recovery.add_metric([job_id], buckets, total)
            ratio = self._goodput(job, nodes, now)
            if ratio is not None:
                goodput.add_metric([job_id], ratio)
            good = job.last_good
            if good is not None:
                good_step.add_metric([job_id], good.step)
                row = next((c for c in self.c.store.checkpoints(job_id) if c["step"] == good.step), None)
                if row is not None:
                    good_time.add_metric([job_id], row["time"])
        yield from (
            state,
            step,
            restarts,
            recovery,
            goodput,
            good_step,
            good_time,
            deadline,
            rung,
            first_step,
        )

        age = GaugeMetricFamily(
            "stanchion_node_heartbeat_age_seconds",
            "Seconds since the node's last heartbeat.",
            labels=["node"],
        )
        counts = {s: 0 for s in NODE_STATES}
        for node_id, rec in nodes.items():
            age.add_metric([node_id], max(0.0, now - rec.last_seen))
            counts[
                (
                    "lost"
                    if rec.lost
                    else "draining"
                    if rec.draining
                    else "cordoned"
                    if rec.cordoned
                    else "ready"
                )
            ] += 1
        yield age
        by_state = GaugeMetricFamily("stanchion_nodes", "Registered nodes by state.", labels=["state"])
        for s, n in counts.items():
            by_state.add_metric([s], n)
        yield by_state
        bis = CounterMetricFamily(
            "stanchion_bisections", "Bisections finished, by result.", labels=["result"]
        )
        results = {"found": 0, "clean": 0, "failed": 0}
        for b in self.c.store.bisections():
            if b["state"] in ("done", "failed"):
                key = (
                    "failed" if b["state"] == "failed" else ("found" if b["data"].get("faulty") else "clean")
                )
                results[key] += 1
        for k, v in results.items():
            bis.add_metric([k], v)
        yield bis
        hb = CounterMetricFamily("stanchion_heartbeats", "Agent heartbeats handled.")
        hb.add_metric([], self.c.heartbeats)
        yield hb

    def _goodput(self, job: m.Job, nodes: dict[str, Any], now: float) -> float | None:
        if job.started is None or job.step <= 0:
            return None
        times = [nodes[n].step_time_s for n in job.members if n in nodes and nodes[n].step_time_s > 0]
        if not times:
            return None
        end = job.state_since if job.state in m.TERMINAL else now
        wall = max(end - job.started, 1e-9)
        return min(1.0, job.step * statistics.median(times) / wall)


def start_metrics(controller: Controller, addr: str, port: int) -> tuple[Any, int]:
    """Serve /metrics on a fresh registry (never the global one); returns (server, bound port)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(CoordinatorCollector(controller))
    server, _thread = bind_http(
        lambda: start_http_server(port, addr=addr, registry=registry), "--metrics-port", f"{addr}:{port}"
    )
    return server, server.server_port
