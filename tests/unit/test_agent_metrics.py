"""The agent's training metrics from progress records: throughput always, MFU only where a rank
recorded one (a GPU whose peak is known), never a made-up value."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from agent.metrics import AgentCollector, TrainingMetrics


def scrape(tm: TrainingMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(AgentCollector(SimpleNamespace(training_metrics=tm, group=SimpleNamespace(workers=[]))))
    return generate_latest(registry).decode()


def test_tokens_per_second_is_exported_and_mfu_only_where_recorded():
    tm = TrainingMetrics()
    base = {"step": 3, "loss": 2.5, "world_size": 2, "tokens": 4096, "step_time_s": 0.5}
    tm.observe_progress("j", 0, {**base, "tokens_per_s": 8192.0, "mfu": 0.41})
    tm.observe_progress("j", 1, {**base, "tokens_per_s": 8192.0})
    text = scrape(tm)
    assert 'stanchion_train_tokens_per_second{job_id="j",rank="0"} 8192.0' in text
    assert 'stanchion_train_tokens_per_second{job_id="j",rank="1"} 8192.0' in text
    assert 'stanchion_train_mfu_ratio{job_id="j",rank="0"} 0.41' in text
    assert 'stanchion_train_mfu_ratio{job_id="j",rank="1"}' not in text
