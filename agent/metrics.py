"""The agent's Prometheus endpoint: per-rank training metrics relayed from the ranks' progress and
events files, worker states, and (through agent/health_collector.py) node health.

The ranks do not export metrics themselves: one endpoint per node, no prometheus-client
multiprocess mode and no per-pid series. The agent folds each new progress record into
:class:`TrainingMetrics` as it reads it; the collector turns that state into samples at scrape time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from protos.stanchion.v1 import types_pb2
from stanchion.buildinfo import build_info
from stanchion.vocab import EventKind

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WORKER_STATES = {
    types_pb2.WORKER_STATE_STANDBY: "standby",
    types_pb2.WORKER_STATE_STARTING: "starting",
    types_pb2.WORKER_STATE_TRAINING: "training",
    types_pb2.WORKER_STATE_WAITING: "waiting",
    types_pb2.WORKER_STATE_EXITED: "exited",
    types_pb2.WORKER_STATE_FAILED: "failed",
    types_pb2.WORKER_STATE_HUNG: "hung",
}
# Per-process counters in progress records -> exported counter names.
COUNTERS = {
    "nonfinite_total": "stanchion_train_nonfinite",
    "spikes_total": "stanchion_train_spikes",
    "fingerprint_mismatches_total": "stanchion_fingerprint_mismatches",
    "audit_mismatches_total": "stanchion_audit_mismatches",
    "stragglers_total": "stanchion_straggler_events",
}


@dataclass
class RankSeries:
    last: dict[str, Any] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))
    step_seconds_sum: float = 0.0
    tokens: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)  # carried across rank restarts
    counter_base: dict[str, float] = field(default_factory=dict)


class TrainingMetrics:
    """Accumulated per-(job, rank) state; written by the agent's monitor, read by scrapes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.series: dict[tuple[str, int], RankSeries] = {}
        self.last_checkpoint: dict[str, float] = {}

    def observe_progress(self, job_id: str, rank: int, rec: dict[str, Any]) -> None:
        with self.lock:
            s = self.series.setdefault((job_id, rank), RankSeries())
            dt = float(rec.get("step_time_s") or 0.0)
            if dt > 0:
                s.step_seconds_sum += dt
                i = next((k for k, b in enumerate(STEP_BUCKETS) if dt <= b), len(STEP_BUCKETS))
                s.buckets[i] += 1
            world = max(int(rec.get("world_size") or 1), 1)
            s.tokens += float(rec.get("tokens") or 0) / world
            for key in COUNTERS:
                v = float(rec.get(key) or 0.0)
                # A restarted rank counts from 0 again: keep the exported counter monotonic.
                if v < s.counters.get(key, 0.0) - s.counter_base.get(key, 0.0):
                    s.counter_base[key] = s.counters.get(key, 0.0)
                s.counters[key] = s.counter_base.get(key, 0.0) + v
            s.last = rec

    def observe_event(self, job_id: str, kind: str, rec: dict[str, Any]) -> None:
        if kind == EventKind.CHECKPOINT_COMMITTED:
            with self.lock:
                self.last_checkpoint[job_id] = float(rec.get("t") or 0.0)


class AgentCollector(Collector):
    def __init__(self, agent: Any):
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield build_info("agent")
        tm: TrainingMetrics = self.agent.training_metrics
        labels = ["job_id", "rank"]
        g = {
            name: GaugeMetricFamily(name, help_, labels=labels)
            for name, help_ in (
                ("stanchion_train_step", "Last completed optimizer step."),
                ("stanchion_train_loss", "Training loss of the last step (NaN when non-finite)."),
                ("stanchion_train_grad_norm", "Global gradient norm after the all-reduce."),
                ("stanchion_train_learning_rate", "Learning rate of the last step."),
                ("stanchion_train_last_step_timestamp_seconds", "Unix time of the last step."),
                ("stanchion_checkpoint_stall_seconds", "Training time blocked by the last checkpoint."),
                (
                    "stanchion_train_tokens_per_second",
                    "Tokens per second of the last step, all ranks together.",
                ),
                (
                    "stanchion_straggler_compute_seconds",
                    "The rank's own compute time of its last step: its start to the end of its last "
                    "backward pass, before any wait on a peer.",
                ),
            )
        }
        straggler = GaugeMetricFamily(
            "stanchion_straggler_ratio",
            "Median over the straggler window of the rank's own compute time over its peers' median "
            "(above integrity.straggler_ratio: a straggler; absent until the window fills).",
            labels=labels,
        )
        mfu = GaugeMetricFamily(
            "stanchion_train_mfu_ratio",
            "Model FLOP utilization of the last step against the devices' dense bf16 datasheet peak "
            "(only on GPUs whose peak is known).",
            labels=labels,
        )
        act = GaugeMetricFamily(
            "stanchion_train_activation_norm", "RMS of each block's output.", labels=[*labels, "layer"]
        )
        hist = HistogramMetricFamily(
            "stanchion_train_step_seconds", "Wall time per optimizer step.", labels=labels
        )
        tokens = CounterMetricFamily("stanchion_train_tokens", "Tokens this rank trained on.", labels=labels)
        counters = {
            name: CounterMetricFamily(name, name.replace("_", " "), labels=labels)
            for name in COUNTERS.values()
        }
        with tm.lock:
            for (job_id, rank), s in sorted(tm.series.items()):
                lv = [job_id, str(rank)]
                r = s.last
                g["stanchion_train_step"].add_metric(lv, float(r.get("step", 0)))
                g["stanchion_train_loss"].add_metric(lv, _num(r.get("loss")))
                g["stanchion_train_grad_norm"].add_metric(lv, _num(r.get("grad_norm")))
                g["stanchion_train_learning_rate"].add_metric(lv, _num(r.get("lr")))
                g["stanchion_train_last_step_timestamp_seconds"].add_metric(lv, _num(r.get("t")))
                g["stanchion_checkpoint_stall_seconds"].add_metric(lv, _num(r.get("checkpoint_stall_s", 0.0)))
                g["stanchion_train_tokens_per_second"].add_metric(lv, _num(r.get("tokens_per_s")))
                g["stanchion_straggler_compute_seconds"].add_metric(lv, _num(r.get("compute_s")))
                if r.get("straggler_ratio") is not None:
                    straggler.add_metric(lv, _num(r["straggler_ratio"]))
                if r.get("mfu") is not None:
                    mfu.add_metric(lv, _num(r["mfu"]))
                for layer, v in enumerate(r.get("activation_norms") or []):
                    act.add_metric([*lv, str(layer)], _num(v))
                cum, buckets = 0, []
                for b, n in zip((*map(str, STEP_BUCKETS), "+Inf"), s.buckets, strict=True):
                    cum += n
                    buckets.append((b, cum))
                hist.add_metric(lv, buckets, s.step_seconds_sum)
                tokens.add_metric(lv, s.tokens)
                for key, name in COUNTERS.items():
                    counters[name].add_metric(lv, s.counters.get(key, 0.0))
            ckpt = GaugeMetricFamily(
                "stanchion_last_checkpoint_timestamp_seconds",
                "Unix time of the newest committed checkpoint.",
                labels=["job_id"],
            )
            for job_id, t in tm.last_checkpoint.items():
                ckpt.add_metric([job_id], t)
        yield from g.values()
        yield from (act, mfu, straggler, hist, tokens, *counters.values(), ckpt)
        workers = GaugeMetricFamily("stanchion_agent_workers", "Worker processes by state.", labels=["state"])
        counts = dict.fromkeys(WORKER_STATES.values(), 0)
        for w in list(self.agent.group.workers):
            if w.alive:
                counts[WORKER_STATES.get(w.state, "starting")] += 1
        for state, n in counts.items():
            workers.add_metric([state], n)
        yield workers


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
