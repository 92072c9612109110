"""`stanchion bench integrity`: fingerprint throughput, and what each protection costs a step."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diagnostics.bench.common import (
    GB,
    QUICK_MODEL,
    Cadence,
    Progress,
    Run,
    envelope,
    goal,
    interleaved,
    median,
    paired_ratios,
    ratio,
    relative_change,
    resolve_flags,
    run_measured,
    shown,
    stanchion_command,
    step_time_stats,
    torch_threads,
    trainer_flags,
    warmup_steps,
    warmup_within,
)
from diagnostics.errors import UsageError

PROTECTION_BUDGET = 0.05  # all protections at their defaults: at most 5% of step time


def checksum_throughput(nbytes: int, *, repeats: int, threads: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """GB/s (1e9 bytes / s, bytes of the tensor over the median time) of the replica fingerprint,
    of memcpy (``Tensor.copy_`` into a preallocated, already-touched tensor) at each thread count,
    and of zlib.crc32 and sha256 on the same bytes. Repetitions go round-robin over the cases."""
    import hashlib
    import zlib

    import torch

    from stanchion.sdk.fingerprint import tensor_fingerprint

    gen = torch.Generator().manual_seed(0)
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_(generator=gen)  # (n,) fp32
    dst = torch.zeros_like(src)  # zeros_like writes every page: no page faults inside the timing
    buf = src.numpy()  # the same memory, for the Python hashes
    cases: dict[str, tuple[int, Callable[[], Any]]] = {}
    for n in threads:
        suffix = f"{n}_thread" + ("s" if n > 1 else "")
        cases[f"fingerprint_{suffix}"] = (n, lambda: tensor_fingerprint(src))
        cases[f"memcpy_{suffix}"] = (n, lambda: dst.copy_(src))
    cases["zlib_crc32_1_thread"] = (1, lambda: zlib.crc32(buf))
    cases["sha256_1_thread"] = (1, lambda: hashlib.sha256(buf).digest())
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(repeats + 1):  # the first pass is warm-up
        for name, (n, fn) in cases.items():
            with torch_threads(n):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            if rep:
                seconds[name].append(dt)
    gb = nbytes / GB
    rates = {
        k: {"gb_per_s": gb / median(v), "gb_per_s_min": gb / max(v), "gb_per_s_max": gb / min(v)}
        for k, v in seconds.items()
    }
    return {
        "tensor_bytes": nbytes,
        "repeats": repeats,
        "gb_per_s": rates,
        "fingerprint_vs_memcpy_1_thread": ratio(
            rates["fingerprint_1_thread"]["gb_per_s"], rates["memcpy_1_thread"]["gb_per_s"]
        ),
    }


def protection_settings() -> dict[str, dict[str, Any]]:
    """name -> integrity settings of each measured configuration (defaults from Protections)."""
    from stanchion.sdk.protections import Protections

    d = Protections()
    off = {
        "integrity.fingerprint_every": 0,
        "integrity.audit_every": 0,
        "integrity.snapshot_every": 0,
        "integrity.startup_check": False,
    }
    return {
        "baseline": off,
        "fingerprint_k1": {**off, "integrity.fingerprint_every": 1},
        "fingerprint_default": {**off, "integrity.fingerprint_every": d.fingerprint_every},
        "audit_default": {**off, "integrity.audit_every": d.audit_every},
        # A snapshot is taken only at a step whose fingerprint check passed: it cannot run alone.
        "snapshots_default": {
            **off,
            "integrity.fingerprint_every": d.fingerprint_every,
            "integrity.snapshot_every": d.snapshot_every,
        },
        "all_defaults": {
            "integrity.fingerprint_every": d.fingerprint_every,
            "integrity.audit_every": d.audit_every,
            "integrity.snapshot_every": d.snapshot_every,
            "integrity.startup_check": d.startup_check,
        },
    }


def cadence_advice(
    costs: Mapping[str, float | None], total: float | None, budget: float = PROTECTION_BUDGET
) -> dict[str, Any] | None:
    """When ``total`` exceeds ``budget``: the protection that dominates and the cadence at which it
    would fit, assuming a periodic cost scales as 1 / cadence. None when within budget."""
    from stanchion.sdk.protections import Protections

    if total is None or total <= budget:
        return None
    known = {k: v for k, v in costs.items() if v is not None}
    if not known:
        return {"dominant": None, "advice": "no per-protection cost could be measured"}
    name = max(known, key=lambda k: known[k])
    key = {"fingerprint": "fingerprint_every", "audit": "audit_every", "snapshot": "snapshot_every"}[name]
    cadence = getattr(Protections(), key)
    room = budget - (total - known[name])
    if room <= 0:
        return {
            "dominant": name,
            "cost": known[name],
            "advice": f"the other protections alone exceed {budget:.0%}: changing integrity.{key} is not enough",
        }
    new = math.ceil(cadence * known[name] / room)
    if name == "snapshot":  # effective only at fingerprint steps: keep it a multiple of K
        k = Protections().fingerprint_every
        new = k * math.ceil(new / k)
    return {
        "dominant": name,
        "cost": known[name],
        "suggested": {f"integrity.{key}": new},
        "advice": f"integrity.{key}={new} (now {cadence}) would bring the total to about {budget:.0%} or less",
    }


def bench_integrity(
    *,
    data: Path,
    work_dir: Path,
    command: str,
    quick: bool = False,
    tensor_mb: int | None = None,
    repeats: int | None = None,
    steps: int | None = None,
    rounds: int | None = None,
    nproc: int = 2,
    protections: Sequence[str] | None = None,
    timeout_s: float = 1800.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """(a) fingerprint throughput beside memcpy, crc32 and sha256; (b) the step-time cost of each
    protection from real ``nproc``-rank runs of the tiny preset, interleaved in ABBA rounds."""
    load_at_start = os.getloadavg()
    settings_by_name = protection_settings()
    names = list(protections or (("baseline", "all_defaults") if quick else settings_by_name))
    unknown = [n for n in names if n not in settings_by_name]
    if unknown:
        raise UsageError(
            f"unknown protection configuration(s): {', '.join(unknown)}",
            hint=f"choose from: {', '.join(settings_by_name)}",
        )
    if "baseline" not in names:
        names.insert(0, "baseline")
    tensor_mb = tensor_mb or (8 if quick else 256)
    repeats = repeats or (3 if quick else 7)
    steps = steps or (6 if quick else 120)
    rounds = rounds or (1 if quick else 3)
    warmup = warmup_steps(steps)

    throughput = checksum_throughput(tensor_mb * 2**20, repeats=repeats)

    model_sets = dict(s.split("=", 1) for s in QUICK_MODEL) if quick else {}
    flags_by_name = {}
    for name in names:
        sets = {**model_sets, **settings_by_name[name], "eval_batches": 1, **warmup_within("tiny", steps)}
        flags_by_name[name] = trainer_flags("tiny", data, steps, sets)
    threads = resolve_flags(flags_by_name["baseline"]).threads
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for round_, name in interleaved(names, rounds):
        run_dir = work_dir / "protections" / f"{name}-r{round_}"
        cmd = stanchion_command(flags_by_name[name], run_dir, nproc)
        runs[name].append(
            run_measured(
                f"{name} round {round_}",
                cmd,
                run_dir,
                round_=round_,
                warmup=warmup,
                threads=threads,
                timeout_s=timeout_s,
                progress=progress,
            )
        )

    configs: dict[str, Any] = {}
    for name in names:
        cadence = Cadence.of(resolve_flags(flags_by_name[name]), nproc)
        configs[name] = {"sets": settings_by_name[name], **step_time_stats(runs[name], cadence)}
    base = configs["baseline"]["step_time_s"]
    for name, c in configs.items():
        c["overhead_median"] = relative_change(c["step_time_s"]["median"], base["median"])
        c["overhead_amortized"] = relative_change(c["step_time_s"]["amortized"], base["amortized"])
        c["overhead_p10"] = relative_change(c["step_time_s"]["p10"], base["p10"])
        per_round = [None if r is None else r - 1 for r in paired_ratios(runs[name], runs["baseline"])]
        c["overhead_per_round"] = per_round
        c["overhead_median_of_rounds"] = median(r for r in per_round if r is not None)
        if name == "baseline":
            c["overhead_within_run"] = 0.0

    def cost(name: str) -> float | None:
        c = configs.get(name)
        if c is None:
            return None
        return c["overhead_within_run"] if c["overhead_within_run"] is not None else c["overhead_median"]

    snap = cost("snapshots_default")
    fp = cost("fingerprint_default")
    per_protection = {
        "fingerprint": fp,
        "audit": cost("audit_default"),
        "snapshot": None if snap is None or fp is None else snap - fp,
    }
    total = cost("all_defaults")
    fp_ratio = throughput["fingerprint_vs_memcpy_1_thread"]
    goals = [
        goal(
            "fingerprint throughput >= single-thread memcpy",
            fp_ratio,
            ">= 1.0",
            None if fp_ratio is None else fp_ratio >= 1.0,
            "fingerprint_1_thread GB/s / memcpy_1_thread GB/s, medians of the same run",
        ),
        goal(
            f"all protections at their defaults <= {PROTECTION_BUDGET:.0%} of step time",
            total,
            f"<= {PROTECTION_BUDGET}",
            None if total is None else total <= PROTECTION_BUDGET,
            "all_defaults overhead_within_run: extra time of its due steps over its ordinary steps, "
            "amortized over all measured steps (overhead_amortized: the same against the baseline runs)",
        ),
    ]
    if quick:  # too small and too short to judge anything: the goals' values are not measurements
        goals = [{**g, "met": None, "how": "--quick: not a measurement; " + g["how"]} for g in goals]
    results = {
        "throughput": throughput,
        "protections": {
            "configs": configs,
            "cost_per_protection": per_protection,
            "advice": cadence_advice(per_protection, total),
        },
    }
    settings = {
        "data": str(data),
        "quick": quick,
        "tensor_mb": tensor_mb,
        "repeats": repeats,
        "nproc": nproc,
        "preset": "tiny",
        "model_sets": list(QUICK_MODEL) if quick else [],
        "steps_per_run": steps,
        "warmup_steps_dropped": warmup,
        "rounds": rounds,
        "threads_per_rank": threads,
        "order": [f"{name} r{r}" for r, name in interleaved(names, rounds)],
        "command_baseline": shown(stanchion_command(flags_by_name["baseline"], Path("RUN_DIR"), nproc)),
    }
    notes = [
        "GB/s = tensor bytes / median seconds (1 GB = 1e9 bytes); memcpy reads and writes each byte once",
        "overhead_* = (step time - baseline) / baseline: median = pooled medians (cannot see a cost paid "
        "every K steps); amortized = class-stratified means; within_run = due steps vs the same run's "
        "ordinary steps (noise-robust, blind to costs paid on every step)",
        "cost_per_protection.snapshot = snapshots_default - fingerprint_default (a snapshot needs a "
        "passing fingerprint check at the same step)",
        "startup_check is a one-time cost before step 1 and is in no step time (see runs[].wall_s)",
        "checkpoints are off in every run (--checkpoint-every 0)",
    ]
    return envelope(
        "integrity", command, settings, results, goals=goals, notes=notes, load_at_start=load_at_start
    )
