"""`stanchion bench trainer`: Stanchion's trainer beside a plain torch loop (DDP, FSDP2 or HSDP),
and that plain loop itself.

The baseline is :func:`baseline_worker`, run under torchrun as
``python -m diagnostics.bench baseline-worker TRAINER-FLAGS`` (diagnostics/bench/__main__.py): it
parses the trainer's own flags, so both sides train the same model on the same batches with the same
thread count and parallelism (``parallel``, ``hsdp_replicate``). :func:`baseline_command` builds
that command line.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    resolve_flags,
    run_measured,
    shown,
    stanchion_command,
    step_time_stats,
    timed,
    torch_threads,
    torchrun,
    trainer_flags,
    warmup_steps,
    warmup_within,
)

if TYPE_CHECKING:
    from trainer.config import TrainConfig


# ---------------------------------------------------------------------------------------------
# FLOP accounting


def matmul_flops(
    n: int, *, threads: int, device: str = "cpu", dtype: str = "float32", repeats: int = 5
) -> dict[str, Any]:
    """Median FLOP/s of a square (n, n) @ (n, n) matmul: 2·n³ floating-point operations each."""
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    out = torch.empty(n, n, device=device, dtype=dt)

    def once() -> None:
        torch.mm(a, b, out=out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch_threads(threads):
        seconds = median(timed(once, repeats=repeats, warmup=1))
    return {
        "n": n,
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "repeats": repeats,
        "seconds": seconds,
        "flops_per_s": 2.0 * n**3 / seconds,
    }


def model_flops_per_s(flops_per_token: float, tokens_per_s: float) -> float:
    return flops_per_token * tokens_per_s


def flop_utilization(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float | None:
    """Achieved model FLOP/s as a fraction of the measured matmul peak of all ranks together."""
    return ratio(model_flops_per_s(flops_per_token, tokens_per_s), peak_flops_per_s)


def flops_per_token(cfg: TrainConfig, vocab_size: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters) of the configured model, built on the meta device."""
    import torch

    from trainer.config import replace
    from trainer.model import GPT

    model_cfg = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=vocab_size)
    with torch.device("meta"):
        model = GPT(model_cfg)
    return model.flops_per_token(cfg.data.seq_len), model.num_params(non_embedding=False)


# ---------------------------------------------------------------------------------------------
# The plain-DDP baseline (one rank; run under torchrun)


# The plain loops `bench trainer` compares with: name -> what the baseline is, as shown.
BASELINES = {"ddp": "DDP", "fsdp": "FSDP2", "hsdp": "HSDP"}
TRAINER_RATIO_GOAL = 1.03  # Stanchion ÷ the plain loop, median step time, every protection on
# `--attribute`: a third system, Stanchion with every integrity protection off, which splits the
# ratio into the SDK's own step machinery (off ÷ plain) and the protections' work (defaults ÷ off).
UNPROTECTED = "stanchion-off"
PROTECTIONS_OFF = {
    "integrity.fingerprint_every": 0,
    "integrity.audit_every": 0,
    "integrity.snapshot_every": 0,
    "integrity.startup_check": False,
}


def baseline_command(flags: Sequence[str], run_dir: Path, nproc: int) -> list[str]:
    """torchrun running :func:`baseline_worker` on ``nproc`` ranks, through this package's ``__main__``."""
    return torchrun(nproc, "-m", "diagnostics.bench", "baseline-worker", "--run-dir", str(run_dir), *flags)


def data_vocab(data: Path) -> int:
    from trainer.data import TokenData

    return TokenData(data).vocab_size


def baseline_worker(argv: Sequence[str]) -> int:
    """Train like a plain torch loop would, with Stanchion's model, optimizer, LR schedule and
    batches (trainer.data.get_batch), and write ``step_time_s`` records where the trainer does.
    ``parallel=ddp``: a DistributedDataParallel loop; ``parallel=fsdp``: FSDP2 (``fully_shard``,
    HSDP with ``hsdp_replicate`` > 1), sharded as the trainer shards (trainer.loop.shard_gpt).

    Left out on purpose, because they are what Stanchion adds: activation-norm tracking, per-layer
    grad norms, the per-step control all-gather, fingerprints, the audit, snapshots and
    deterministic algorithms. The loss is read every step (a host sync), as a logging loop does.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stanchion.files import JsonlWriter
    from stanchion.sdk.parallel import env_topology, pick_device
    from trainer.cli import parser
    from trainer.config import replace
    from trainer.data import TokenData, get_batch
    from trainer.loop import shard_gpt
    from trainer.model import GPT
    from trainer.optim import build_optimizer, lr_at, set_lr

    args = parser().parse_args(list(argv))
    cfg = resolve_flags(list(argv))
    rank, world, local_rank, _ = env_topology()
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, local_rank)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    data = TokenData(cfg.data.path)
    model_cfg = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=data.vocab_size)
    model = GPT(model_cfg)
    model.init_weights(cfg.seed)
    model.to(device)
    sharded = cfg.parallel == "fsdp"
    if sharded:  # FSDP2 casts to bf16 itself (its mixed-precision policy), as the trainer does
        shard_gpt(model, device.type, world, cfg.hsdp_replicate, cfg.precision)
        net: torch.nn.Module = model
    else:
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = build_optimizer(model, cfg.optim, device_type=device.type)
    accum = cfg.check_world(world)
    autocast = cuda and cfg.precision == "bf16" and not sharded
    out = JsonlWriter(Path(args.run_dir) / "ranks" / f"rank-{rank:05d}" / "progress.jsonl")
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    for index in range(cfg.steps):
        t0 = time.perf_counter()
        set_lr(opt, lr_at(index, cfg.optim, cfg.steps))
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(
                data,
                seed=cfg.seed,
                step=index,
                dp_rank=rank,
                dp_world=world,
                micro_step=micro,
                micro_batch_size=cfg.data.micro_batch_size,
                grad_accum=accum,
                seq_len=cfg.data.seq_len,
            )
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = micro == accum - 1  # gradients are reduced once per step
            if sharded:
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
                sync = contextlib.nullcontext()
            else:
                sync = net.no_sync() if not last else contextlib.nullcontext()  # type: ignore[operator]
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                    _, loss = net(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss_sum) / accum  # .item() is a host sync: the step is finished after it
        step_time = time.perf_counter() - t0
        out.write(
            {
                "step": index + 1,
                "loss": loss_value,
                "step_time_s": step_time,
                "tokens": tokens,
                "tokens_per_s": tokens / step_time,
                "rank": rank,
                "world_size": world,
            }
        )
    out.close()
    # DDP and FSDP sit in reference cycles: freed by the garbage collector now, with the process
    # group, rather than in the interpreter's shutdown, where a gloo thread still releasing the last
    # collective's tensors aborts the process (see examples/nanogpt_plain.py).
    del net, model, opt
    gc.collect()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# Benchmark: trainer (Stanchion vs plain DDP)


@dataclass(frozen=True)
class TrainerPlan:
    preset: str
    flags: tuple[str, ...]
    steps: int
    warmup: int
    notes: tuple[str, ...] = ()
    sets: dict[str, Any] = field(default_factory=dict)


def trainer_plan(
    preset: str, *, data: Path, steps: int | None, nproc: int, cuda: bool, parallel: str = "ddp"
) -> TrainerPlan:
    """What `bench trainer` runs for ``preset``: the preset, made to fit this machine and ``nproc``,
    with the ``parallel`` layout of :data:`BASELINES` (hsdp: 2 replica groups of nproc / 2 shards).

    On a CPU anything bigger than ``tiny`` gets 1 sequence per rank per step at seq_len <= 256 and
    20 steps (the last checks fingerprints and takes a snapshot); on a GPU the preset's own batch
    shape runs in bf16. Every change is listed in ``notes``.
    """
    from trainer.config import resolve

    if parallel not in BASELINES:
        raise ValueError(f"--parallel {parallel!r}: choose one of {', '.join(BASELINES)}")
    if parallel == "hsdp" and (nproc < 2 or nproc % 2):
        raise ValueError(f"--parallel hsdp needs an even --nproc (2 replica groups); got {nproc}")
    base = resolve(preset)
    sets: dict[str, Any] = {"eval_batches": 1}  # the final evaluation is not timed; keep it short
    notes = [
        "checkpoints off (--checkpoint-every 0): a checkpoint's stall is not part of step_time_s",
        "eval_batches=1: the final evaluation is not timed",
    ]
    micro, global_batch, seq = base.data.micro_batch_size, base.data.global_batch_size, base.data.seq_len
    if not cuda and preset != "tiny":
        micro, global_batch, seq = 1, nproc, min(seq, 256)
        notes.append(
            f"reduced for CPU: micro batch 1, global batch {nproc} (= nproc), seq_len {seq}; "
            f"the preset trains {base.data.global_batch_size} x {base.data.seq_len}"
        )
    per_step = micro * nproc
    if global_batch % per_step:
        global_batch = max(1, global_batch // per_step) * per_step
        notes.append(
            f"global batch {global_batch}: the preset's {base.data.global_batch_size} does not divide "
            f"over {nproc} ranks x micro batch {micro}"
        )
    for key, value, default in (
        ("data.micro_batch_size", micro, base.data.micro_batch_size),
        ("data.global_batch_size", global_batch, base.data.global_batch_size),
        ("data.seq_len", seq, base.data.seq_len),
    ):
        if value != default:
            sets[key] = value
    layout = {
        "parallel": "ddp" if parallel == "ddp" else "fsdp",
        "hsdp_replicate": 2 if parallel == "hsdp" else 1,
    }
    if (base.parallel, base.hsdp_replicate) != (layout["parallel"], layout["hsdp_replicate"]):
        sets.update({k: v for k, v in layout.items() if v != getattr(base, k)})
        notes.append(
            f"parallel={layout['parallel']}, hsdp_replicate={layout['hsdp_replicate']} (the preset uses "
            f"{base.parallel}, {base.hsdp_replicate}): the baseline is plain {BASELINES[parallel]}"
        )
    if cuda and base.precision != "bf16":
        sets["precision"] = "bf16"
    n_steps = steps or (100 if preset == "tiny" else 20 if not cuda else 50)
    if within := warmup_within(preset, n_steps):
        sets.update(within)
        notes.append(f"optim.warmup_steps={n_steps}: the preset's {base.optim.warmup_steps} exceeds the run")
    flags = tuple(trainer_flags(preset, data, n_steps, sets))
    return TrainerPlan(preset, flags, n_steps, warmup_steps(n_steps), tuple(notes), sets)


def bench_trainer(
    *,
    data: Path,
    presets: Sequence[str],
    steps: int | None,
    nproc: int,
    rounds: int,
    work_dir: Path,
    command: str,
    timeout_s: float = 1800.0,
    progress: Progress = lambda _: None,
    parallel: str = "ddp",
    attribute: bool = False,
) -> dict[str, Any]:
    """Stanchion's trainer (its real CLI, all protections at their defaults) beside the plain torch
    loop ``parallel`` names (:data:`BASELINES`), per preset: step time, tokens/s, and model FLOP/s
    as a fraction of the measured matmul peak. ``attribute``: a third system in every round,
    Stanchion with the protections of :data:`PROTECTIONS_OFF` off.

    The peak is a roofline-style ceiling: the median FLOP/s of a square matmul (fp32 2048 on a CPU
    with ``threads`` torch threads, as each rank uses; bf16 8192 on a GPU) times the number of ranks,
    measured before and after the training runs, the higher of the two taken.
    """
    import torch

    load_at_start = os.getloadavg()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    plans = [
        trainer_plan(p, data=data, steps=steps, nproc=nproc, cuda=cuda, parallel=parallel) for p in presets
    ]
    base = parallel  # the baseline's name in the runs and the results
    cfgs = {p.preset: resolve_flags(p.flags) for p in plans}
    threads = next(iter(cfgs.values())).threads
    mm = (
        dict(n=8192, dtype="bfloat16", device="cuda", threads=threads)
        if cuda
        else dict(n=2048, threads=threads)
    )
    matmul_before = matmul_flops(**mm)  # type: ignore[arg-type]
    vocab = data_vocab(data)
    runs: dict[tuple[str, str], list[Run]] = {}
    systems = ["stanchion", base] + ([UNPROTECTED] if attribute else [])
    off_flags = tuple(f for k, v in PROTECTIONS_OFF.items() for f in ("--set", f"{k}={str(v).lower()}"))
    for plan in plans:
        for round_, system in interleaved(systems, rounds):
            run_dir = work_dir / plan.preset / f"{system}-r{round_}"
            if system == base:
                cmd = baseline_command(plan.flags, run_dir, nproc)
            else:
                cmd = stanchion_command(
                    plan.flags + (off_flags if system == UNPROTECTED else ()), run_dir, nproc
                )
            runs.setdefault((plan.preset, system), []).append(
                run_measured(
                    f"{plan.preset} {system} round {round_}",
                    cmd,
                    run_dir,
                    round_=round_,
                    warmup=plan.warmup,
                    threads=threads,
                    timeout_s=timeout_s,
                    progress=progress,
                )
            )
    matmul_after = matmul_flops(**mm)  # type: ignore[arg-type]
    per_rank = max(matmul_before["flops_per_s"], matmul_after["flops_per_s"])
    peak = per_rank * nproc
    results: dict[str, Any] = {
        "matmul": {
            **{k: v for k, v in matmul_before.items() if k not in ("seconds", "flops_per_s")},
            "flops_per_s_per_rank_before": matmul_before["flops_per_s"],
            "flops_per_s_per_rank_after": matmul_after["flops_per_s"],
            "peak_flops_per_s": peak,
            "ranks": nproc,
        },
        "presets": {},
    }
    goals = []
    for plan in plans:
        cfg = cfgs[plan.preset]
        fpt, params = flops_per_token(cfg, vocab)
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        entry: dict[str, Any] = {
            "config": {
                "steps": plan.steps,
                "warmup_steps_dropped": plan.warmup,
                "sets": plan.sets,
                "params": params,
                "flops_per_token": fpt,
                "seq_len": cfg.data.seq_len,
                "micro_batch_size": cfg.data.micro_batch_size,
                "global_batch_size": cfg.data.global_batch_size,
                "tokens_per_step": tokens_per_step,
                "precision": cfg.precision,
                "threads_per_rank": cfg.threads,
                "integrity": {
                    "fingerprint_every": cfg.integrity.fingerprint_every,
                    "audit_every": cfg.integrity.audit_every,
                    "snapshot_every": cfg.integrity.snapshot_every,
                },
                "notes": list(plan.notes),
            }
        }
        for system in systems:
            system_runs = runs[(plan.preset, system)]
            cadence = Cadence.of(cfg, nproc) if system == "stanchion" else Cadence()
            stats = step_time_stats(system_runs, cadence)
            med = stats["step_time_s"]["median"]
            stats.update(
                command=shown(system_runs[0].command),
                tokens_per_s=tokens_per_step / med,
                tokens_per_s_amortized=tokens_per_step / stats["step_time_s"]["amortized"],
                model_flops_per_s=model_flops_per_s(fpt, tokens_per_step / med),
                flop_utilization=flop_utilization(fpt, tokens_per_step / med, peak),
            )
            entry[system] = stats
        s, d = entry["stanchion"]["step_time_s"], entry[base]["step_time_s"]
        per_round = paired_ratios(runs[(plan.preset, "stanchion")], runs[(plan.preset, base)])
        vs = entry[f"stanchion_vs_{base}"] = {
            "step_time_ratio_median": ratio(s["median"], d["median"]),
            "step_time_ratio_amortized": ratio(s["amortized"], d["amortized"]),
            "step_time_ratio_p10": ratio(s["p10"], d["p10"]),
            "step_time_ratio_per_round": per_round,
            "step_time_ratio_median_of_rounds": median(r for r in per_round if r is not None),
        }
        if attribute:
            off = runs[(plan.preset, UNPROTECTED)]
            machinery = paired_ratios(off, runs[(plan.preset, base)])
            protections = paired_ratios(runs[(plan.preset, "stanchion")], off)
            entry["attribution"] = {
                "protections_off": dict(PROTECTIONS_OFF),
                f"off_vs_{base}_per_round": machinery,
                f"off_vs_{base}": median(r for r in machinery if r is not None),
                "defaults_vs_off_per_round": protections,
                "defaults_vs_off": median(r for r in protections if r is not None),
            }
        results["presets"][plan.preset] = entry
        value = vs["step_time_ratio_median_of_rounds"]
        goals.append(
            goal(
                f"{plan.preset}: Stanchion ÷ plain {BASELINES[base]} step time, all protections at their defaults",
                value,
                "<= 1.03",
                None if value is None else value <= TRAINER_RATIO_GOAL,
                "median over rounds of (Stanchion's median step time / the baseline's, same round)",
            )
        )
    settings = {
        "data": str(data),
        "presets": list(presets),
        "nproc": nproc,
        "rounds": rounds,
        "device": device,
        "threads_per_rank": threads,
        "parallel": base,
        "order": f"ABBA: {', '.join(systems)}; then {', '.join(reversed(systems))}",
        "attribute": attribute,
    }
    notes = [
        "step_time_s: rank 0's time from the start of a step to its end, from its progress records "
        f"(Stanchion: trainer/loop.py; {BASELINES[base]}: diagnostics/bench/trainer.py baseline_worker); "
        "warm-up steps dropped",
        "amortized: mean step time with each class of step (which protections were due) at its median",
        "flop_utilization = flops_per_token x tokens_per_s / (matmul FLOP/s per rank x ranks); "
        "flops_per_token = 6N + 12 L d T (trainer/model.py), N including the lm_head",
        f"step_time_ratio > 1: Stanchion is slower than plain {BASELINES[base]} by that factor",
    ]
    if attribute:
        notes.append(
            f"attribution: {UNPROTECTED} is Stanchion with "
            + ", ".join(f"{k}={v}" for k, v in PROTECTIONS_OFF.items())
            + f"; off_vs_{base} is the SDK's own step machinery, defaults_vs_off the protections' work "
            "(each the median over rounds of the ratio of run medians of the same round)"
        )
    return envelope(
        "trainer", command, settings, results, goals=goals, notes=notes, load_at_start=load_at_start
    )
