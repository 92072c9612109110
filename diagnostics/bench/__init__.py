"""Benchmarks behind `stanchion bench` (the commands are diagnostics/commands/bench.py).

- :mod:`~diagnostics.bench.common`: what every benchmark shares (statistics, the JSON envelope,
  trainer runs as real processes, work directories);
- :mod:`~diagnostics.bench.trainer`: Stanchion's trainer beside plain torch DDP, and the DDP
  baseline worker;
- :mod:`~diagnostics.bench.integrity`: fingerprint throughput and the cost of the protections;
- :mod:`~diagnostics.bench.recovery`: one rank killed, beside torchrun;
- :mod:`~diagnostics.bench.goodput`: ETTR through seeded fault schedules;
- :mod:`~diagnostics.bench.coordinator`: how many agents one coordinator process carries;
- :mod:`~diagnostics.bench.report`: docs/benchmarks.md from docs/bench/*.json, its prose in
  diagnostics/bench/text/*.md.

Worker processes that benchmarks start run ``python -m diagnostics.bench`` (``__main__.py``).
"""
