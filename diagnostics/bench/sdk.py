"""`stanchion bench sdk`: what the SDK costs a user's own training loop, beside the same loop in plain DDP.

The loop is :mod:`diagnostics.bench.sdk_worker`, a self-contained user program (torch and the public
``stanchion`` names only). It runs under torchrun in two modes on the same model, seed and batches:
``plain`` (``DistributedDataParallel``, ``optimizer.step``, ``scheduler.step``, ``zero_grad``) and
``guarded`` (``stanchion.join`` + ``stanchion.guard``, every protection at its default, as
examples/own_loop.py adopts it). Optional *variants* are further guarded configurations with single
protections changed (``--variant fingerprint_every=10``), to show what each one costs.

Every configuration runs once per round, in interleaved rounds (ABBA: the order flips every round,
:func:`~diagnostics.bench.common.interleaved`), so a change in the machine's load reaches all of
them alike. Each rank times whole steps itself with the same boundaries in both modes (see the
worker's docstring); rank 0's times are read after the first steps are dropped as warm-up. The
headline ``ratio`` is the guarded median step time over the plain median (all rounds pooled), next
to the per-round paired ratios and their median, and the goal: ``ratio <= 1.03``.

The medians in the JSON carry 4 significant digits (the envelope's rounding); ``ratio`` is computed
from those stored medians and kept at full precision, so ``ratio == guarded_median_s /
plain_median_s`` holds exactly for anyone reading the file (:func:`with_exact_ratio`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diagnostics.bench.common import (
    Cadence,
    Progress,
    Run,
    envelope,
    goal,
    interleaved,
    median,
    paired_ratios,
    ratio,
    run_measured,
    shown,
    step_time_stats,
    torchrun,
    warmup_steps,
)
from diagnostics.errors import UsageError

SDK_BUDGET = 1.03  # guarded ÷ plain median step time, all protections at their defaults
GOAL_NAME = "SDK per-step cost, all protections at their defaults: guarded / plain median step time"
TUNABLE = ("fingerprint_every", "audit_every", "snapshot_every")  # what a --variant may change


@dataclass(frozen=True)
class ModelSize:
    """The worker's model and batch (diagnostics/bench/sdk_worker.py): its defaults."""

    dim: int = 32
    hidden: int = 512
    layers: int = 4
    batch_size: int = 512
    accum: int = 2

    def flags(self) -> list[str]:
        return [f"--{f.name.replace('_', '-')}={getattr(self, f.name)}" for f in fields(self)]

    def params(self, vocab: int = 256, context: int = 32) -> int:
        """Parameters of the worker's MlpLM of this size (embedding, linear layers, head)."""
        first = context * self.dim * self.hidden + self.hidden
        rest = (self.layers - 1) * (self.hidden * self.hidden + self.hidden)
        return vocab * self.dim + first + rest + self.hidden * vocab + vocab


@dataclass(frozen=True)
class Config:
    """One configuration of the loop: plain, or guarded with some protections changed."""

    name: str
    mode: str  # "plain" or "guarded"
    overrides: tuple[tuple[str, int], ...] = ()

    @property
    def slug(self) -> str:
        """A directory name for this configuration's runs."""
        return "-".join([self.mode, *(f"{k}={v}" for k, v in self.overrides)])

    def flags(self) -> list[str]:
        out = ["--mode", self.mode]
        for key, value in self.overrides:
            out.append(f"--{key.replace('_', '-')}={value}")
        return out

    def protections(self) -> dict[str, Any] | None:
        """The cadences in force (Protections' defaults with the overrides); None when plain."""
        if self.mode == "plain":
            return None
        from stanchion.sdk.protections import Protections

        base = Protections()
        return {k: dict(self.overrides).get(k, getattr(base, k)) for k in TUNABLE}

    def cadence(self) -> Cadence:
        """Which periodic protections are due at a step (the guard's rules; none when plain)."""
        p = self.protections()
        if p is None:
            return Cadence()
        return Cadence(p["fingerprint_every"], p["audit_every"], p["snapshot_every"])


PLAIN = Config("plain", "plain")
GUARDED = Config("guarded", "guarded")


def parse_variant(text: str) -> Config:
    """``fingerprint_every=10`` or ``fingerprint_every=10,audit_every=0``: a guarded configuration
    with those protections changed (0 disables one). UsageError on anything else."""
    overrides: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in TUNABLE:
            raise UsageError(
                f"--variant {text!r}: expected KEY=N[,KEY=N], KEY one of {', '.join(TUNABLE)}",
                hint="e.g. --variant fingerprint_every=10",
            )
        if key in overrides:
            raise UsageError(f"--variant {text!r}: {key} given twice")
        try:
            n = int(value)
        except ValueError:
            raise UsageError(f"--variant {text!r}: {key} must be an integer >= 0") from None
        if n < 0:
            raise UsageError(f"--variant {text!r}: {key} must be >= 0 (0 disables it)")
        overrides[key] = n
    items = tuple(overrides.items())
    return Config("guarded " + ",".join(f"{k}={v}" for k, v in items), "guarded", items)


def configurations(variants: Sequence[str]) -> list[Config]:
    """plain, guarded (all defaults), then each variant once (a repeated one is a UsageError)."""
    configs = [PLAIN, GUARDED]
    for text in variants:
        c = parse_variant(text)
        if any(c.name == other.name for other in configs):
            raise UsageError(f"--variant {text!r}: given twice")
        configs.append(c)
    return configs


def sdk_command(
    config: Config,
    run_dir: Path,
    *,
    nproc: int,
    steps: int,
    size: ModelSize,
    threads: int,
    checkpoint_every: int = 0,
) -> list[str]:
    """torchrun running the worker (diagnostics/bench/sdk_worker.py) on ``nproc`` ranks."""
    return torchrun(
        nproc,
        "-m",
        "diagnostics.bench",
        "sdk-worker",
        *config.flags(),
        "--run-dir",
        str(run_dir),
        f"--steps={steps}",
        *size.flags(),
        f"--threads={threads}",
        f"--checkpoint-every={checkpoint_every}",
    )


def comparison(runs: Sequence[Run], plain_runs: Sequence[Run], cadence: Cadence) -> dict[str, Any]:
    """Step-time ratios of a guarded configuration's runs over the plain runs: pooled median, p10,
    amortized (each class of step at its median), per round and the median of the rounds."""
    mine, base = (
        step_time_stats(runs, cadence)["step_time_s"],
        step_time_stats(plain_runs, Cadence())["step_time_s"],
    )
    per_round = paired_ratios(runs, plain_runs)
    valid = [r for r in per_round if r is not None]
    return {
        "ratio_median": ratio(mine["median"], base["median"]),
        "ratio_p10": ratio(mine["p10"], base["p10"]),
        "ratio_amortized": ratio(mine["amortized"], base["amortized"]),
        "ratio_per_round": per_round,
        "ratio_median_of_rounds": median(valid) if valid else None,
    }


def summarize(
    configs: Sequence[Config], runs: Mapping[str, Sequence[Run]], workers: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The results of a benchmark from its runs (by configuration name) and what each
    configuration's worker reported (``worker.json``: parameters, protections, counters)."""
    plain_runs = runs[PLAIN.name]
    out: dict[str, Any] = {}
    for c in configs:
        stats = step_time_stats(runs[c.name], c.cadence())
        stats.update(
            mode=c.mode,
            protections=c.protections(),
            command=shown(runs[c.name][0].command),
            counters=workers.get(c.name, {}).get("counters"),
        )
        if c.mode == "guarded":
            stats["vs_plain"] = comparison(runs[c.name], plain_runs, c.cadence())
        out[c.name] = stats
    head = out[GUARDED.name]["vs_plain"]
    return {
        "plain_median_s": out[PLAIN.name]["step_time_s"]["median"],
        "guarded_median_s": out[GUARDED.name]["step_time_s"]["median"],
        "ratio": head["ratio_median"],
        "ratio_p10": head["ratio_p10"],
        "ratio_amortized": head["ratio_amortized"],
        "ratio_per_round": head["ratio_per_round"],
        "ratio_median_of_rounds": head["ratio_median_of_rounds"],
        "configs": out,
    }


HEADLINE = ("ratio", "plain_median_s", "guarded_median_s", "ratio_per_round", "ratio_median_of_rounds")


def with_exact_ratio(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute ``ratio`` (top level, results, the goal) from the medians as stored in ``result``
    (already rounded by the envelope), at full precision, and judge the goal on it: the JSON's
    ``ratio`` is then exactly ``guarded_median_s / plain_median_s``."""
    r = result["results"]
    exact = r["guarded_median_s"] / r["plain_median_s"]
    r["ratio"] = result["ratio"] = exact
    r["configs"][GUARDED.name]["vs_plain"]["ratio_median"] = exact
    for g in result["goals"]:
        if g["goal"] == GOAL_NAME:
            g["value"], g["met"] = exact, exact <= SDK_BUDGET
    return result


def read_worker(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / "worker.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def bench_sdk(
    *,
    steps: int,
    nproc: int,
    rounds: int,
    size: ModelSize,
    variants: Sequence[str] = (),
    threads: int = 1,
    checkpoint_every: int = 0,
    work_dir: Path,
    command: str,
    timeout_s: float = 900.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """Run every configuration ``rounds`` times in ABBA order and report step times and ratios."""
    load_at_start = os.getloadavg()
    configs = configurations(variants)
    warmup = warmup_steps(steps)
    runs: dict[str, list[Run]] = {c.name: [] for c in configs}
    workers: dict[str, dict[str, Any]] = {}
    for round_, c in interleaved(configs, rounds):
        run_dir = work_dir / f"{c.slug}-r{round_}"
        cmd = sdk_command(
            c,
            run_dir,
            nproc=nproc,
            steps=steps,
            size=size,
            threads=threads,
            checkpoint_every=checkpoint_every,
        )
        runs[c.name].append(
            run_measured(
                f"{c.name} round {round_}",
                cmd,
                run_dir,
                round_=round_,
                warmup=warmup,
                threads=threads,
                timeout_s=timeout_s,
                progress=progress,
            )
        )
        workers.setdefault(c.name, read_worker(run_dir))
    results = summarize(configs, runs, workers)
    params = next((w["params"] for w in workers.values() if "params" in w), size.params())
    results["model"] = {
        "class": "MlpLM (diagnostics/bench/sdk_worker.py)",
        **{f.name: getattr(size, f.name) for f in fields(size)},
        "params": params,
        "context": 32,
        "vocab": 256,
        "sequences_per_step_per_rank": size.batch_size * size.accum,
        "optimizer": "AdamW (torch defaults: foreach), LambdaLR warm-up + cosine, grad clip 1.0",
    }
    settings = {
        "steps": steps,
        "warmup_steps_dropped": warmup,
        "nproc": nproc,
        "rounds": rounds,
        "threads_per_rank": threads,
        "device": {name: w.get("device") for name, w in workers.items()},
        "checkpoint_every": checkpoint_every,
        "configs": [c.name for c in configs],
        "order": "ABBA: " + ", ".join(c.name for c in configs) + "; then the reverse",
    }
    goals = [
        goal(
            GOAL_NAME,
            results["ratio"],
            f"<= {SDK_BUDGET}",
            None if results["ratio"] is None else results["ratio"] <= SDK_BUDGET,
            "median step time of the guarded loop (all protections at their defaults) over that of "
            "the same loop under plain DDP, all rounds pooled, rank 0, warm-up steps dropped",
        )
    ]
    notes = [
        "step_time_s: rank 0's perf_counter around a whole step, the same boundaries in both modes "
        "(diagnostics/bench/sdk_worker.py); the first warmup_steps_dropped steps of each run are dropped",
        "plain: DistributedDataParallel (gloo, bucketed all-reduce overlapped with backward, no_sync on "
        "all but the last micro-batch), clip_grad_norm_, AdamW, LambdaLR, zero_grad, the loss read every step",
        "guarded: stanchion.join + stanchion.guard as in examples/own_loop.py, Protections() defaults "
        "(or the variant's), checkpoints off unless checkpoint_every says otherwise",
        "both modes: the same seed and weights, the same batches, torch.use_deterministic_algorithms(True), "
        "threads_per_rank torch threads",
        "ratio > 1: the guarded loop is slower than the plain one by that factor; ratio is computed from "
        "the stored medians at full precision",
        "amortized: mean step time with each class of step (which protections were due) at its median",
    ]
    result = envelope(
        "sdk", command, settings, results, goals, notes, load_at_start=load_at_start, headline=HEADLINE
    )
    return with_exact_ratio(result)
