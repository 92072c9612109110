"""`stanchion bench checkpoint`'s arithmetic and its section of docs/benchmarks.md, from records."""

from __future__ import annotations

import json
from pathlib import Path

from diagnostics.bench import report as rp
from diagnostics.bench.checkpoint import summarize


def rec(kind: str, blocked: float, excess: float, usual: float = 3.0, rnd: int = 0) -> dict:
    return {
        "kind": kind,
        "round": rnd,
        "blocked_s": blocked,
        "window_excess_s": excess,
        "ordinary_step_s": usual,
    }


def test_medians_per_kind_and_the_ratio_of_the_medians() -> None:
    records = [
        rec("plain", 1.0, 1.5),
        rec("stanchion", 0.25, 0.5),
        rec("stanchion", 0.5, 0.75, rnd=1),
        rec("plain", 2.0, 2.5, rnd=1),
        rec("plain", 4.0, 2.0, rnd=2),
        rec("stanchion", 1.0, 0.25, rnd=2),
    ]
    s = summarize(records)
    assert s["plain"] == {
        "checkpoints": 3,
        "blocked_s": 2.0,
        "window_excess_s": 2.0,
        "ordinary_step_s": 3.0,
        "blocked_s_each": [1.0, 2.0, 4.0],
    }
    assert s["stanchion"]["blocked_s"] == 0.5 and s["stanchion"]["window_excess_s"] == 0.5
    assert s["blocked_ratio"] == 0.25


def test_the_report_section_shows_both_kinds_and_the_ratio(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    results = summarize([rec("plain", 2.0, 2.5), rec("stanchion", 0.5, 0.25)])
    results["notes"] = ["reduced for CPU: micro batch 1"]
    doc = {
        "benchmark": "checkpoint",
        "command": "stanchion bench checkpoint --json --out docs/bench/checkpoint.json",
        "finished_at": "2026-12-07T15:00:00+0000",
        "settings": {"presets": ["gpt2-124m"], "nproc": 2, "rounds": 1, "gap": 3, "window": 2},
        "results": {"presets": {"gpt2-124m": results}},
    }
    (bench / "checkpoint.json").write_text(json.dumps(doc))
    text = "\n".join(rp.checkpoint_section(rp.Report(bench, tmp_path / "b.md", changes=lambda c, p: [])))
    assert "| gpt2-124m | dcp.async_save | **2.00** | 2.00 | 2.50 | 3.00 |" in text
    assert "| gpt2-124m | Stanchion | **0.500** | 0.500 | 0.250 | 3.00 |" in text
    assert "| gpt2-124m | Stanchion ÷ plain | **0.250** |" in text
    assert "reduced for CPU: micro batch 1" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rp.checkpoint_section(rp.Report(empty, tmp_path / "b.md")) == [
        "## Checkpoint stall: Stanchion beside plain dcp.async_save",
        "",
        rp.NOT_MEASURED,
        "",
    ]
