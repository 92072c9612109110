"""Benchmarks behind `stanchion bench`: one function per benchmark, shared helpers around them.

Every benchmark follows the same rules, because the machines it runs on are shared and noisy:

- Peers are measured side by side in the same invocation, in interleaved rounds (ABBA: the order
  flips every round), never against a figure from another day.
- Figures are medians of repetitions; comparisons are ratios of medians.
- Trainer step times come from the trainer's own progress records (``step_time_s`` of rank 0), read
  from a real multi-process run started through the real command line; the first steps are dropped
  as warm-up.
- Each benchmark returns one JSON-able dict built by :func:`envelope`: the exact command, the
  machine, the settings, the results and the goals it checks.

Periodic protections (fingerprints every K steps, the audit every M) cost nothing on most steps and
something on a few, so a plain median of step times cannot see them. Besides the median, step times
are therefore also summarised per *class* of step (which protections were due at that step):
``amortized`` is the mean step time with each class represented by its median
(:func:`stratified_mean`), and ``within_run`` is the extra time of the due steps relative to the
same run's ordinary steps (:func:`periodic_overhead`), which cancels the run-to-run noise.

The plain-DDP baseline of `bench trainer` is :func:`ddp_worker`, run under torchrun as
``python -m diagnostics.bench ddp-worker TRAINER-FLAGS``: it parses the trainer's own flags, so both
sides train the same model on the same batches with the same thread count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diagnostics.errors import EXIT_FAILURE, CliError, UsageError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
Progress = Callable[[str], None]  # where a benchmark reports what it is doing (stderr in the CLI)
PROTECTION_BUDGET = 0.05  # all protections at their defaults: at most 5% of step time
# A smaller model for --quick runs (the integration tests' SMALL): seconds per run, for checking shapes.
QUICK_MODEL = (
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.global_batch_size=4",
)


class BenchError(CliError):
    """A benchmark run failed; the message names the run and the hint its log."""

    def __init__(self, message: str, *, hint: str = ""):
        super().__init__(message, hint=hint, exit_code=EXIT_FAILURE)


# ---------------------------------------------------------------------------------------------
# Statistics


def median(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals:
        raise ValueError("median of no values")
    return float(statistics.median(vals))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline: 0.03 means 3% slower than the baseline."""
    r = ratio(value, baseline)
    return None if r is None else r - 1.0


def p10(values: Sequence[float]) -> float:
    """The 10th percentile. Load from other processes only ever adds time, so the fast tail is the
    figure it disturbs least; it also leaves out steps that do something every 10th step or rarer."""
    vals = list(values)
    if len(vals) < 2:
        return median(vals)
    return statistics.quantiles(vals, n=10, method="inclusive")[0]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": median(values),
        "p10": p10(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def stratified_mean(by_class: Mapping[Hashable, Sequence[float]]) -> float:
    """Σ_g (n_g / n) · median_g: the mean of all samples with each class represented by its median.

    With one class this is the median. It is what a mean step time would be without the outliers
    a shared machine adds, while still charging the rare expensive steps their share.
    """
    n = sum(len(v) for v in by_class.values())
    if n == 0:
        raise ValueError("stratified mean of no values")
    return sum(len(v) * median(v) for v in by_class.values() if v) / n


def periodic_overhead(by_class: Mapping[tuple[str, ...], Sequence[float]]) -> float | None:
    """Σ_g n_g · (median_g − median_ordinary) / (n · median_ordinary), over the classes of steps at
    which something was due; ``()`` is the ordinary class. None without ordinary steps (e.g. K=1).

    Both sides come from the same run, so run-to-run noise cancels; what it cannot see is a cost
    spread over every step (it would raise the ordinary median too)."""
    ordinary = by_class.get((), [])
    if not ordinary:
        return None
    base = median(ordinary)
    n = sum(len(v) for v in by_class.values())
    extra = sum(len(v) * (median(v) - base) for k, v in by_class.items() if k and v)
    return extra / (n * base)


def sig(x: Any, digits: int = 4) -> Any:
    """Round floats (also inside dicts and lists) to ``digits`` significant digits for JSON."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sig(v, digits) for v in x]
    return x


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The report every benchmark returns


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def source_state() -> dict[str, Any]:
    """The commit measured and whether the working tree differed from it (read-only git calls)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "modified_files": None if status is None else len(status.splitlines()),
    }


def envelope(
    benchmark: str,
    command: str,
    settings: Mapping[str, Any],
    results: Mapping[str, Any],
    goals: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    load_at_start: Sequence[float] | None = None,
    headline: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON shape shared by every benchmark. The load averages (1, 5, 15 min) say how busy the
    shared machine was: at the start, before any of the benchmark's own work, and at the end.
    ``headline`` names the results a script reads first; they are also copied to the top level."""
    results = sig(dict(results))
    missing = [k for k in headline if k not in results]
    if missing:
        raise KeyError(f"headline keys missing from the {benchmark} results: {', '.join(missing)}")
    load = {
        "at_start": None if load_at_start is None else [round(x, 2) for x in load_at_start],
        "at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return {
        **{k: results[k] for k in headline},
        "benchmark": benchmark,
        "command": command,
        "machine": {**machine(), "load_average_1_5_15": load},
        "source": source_state(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": dict(settings),
        "results": results,
        "goals": [sig(dict(g)) for g in goals],
        "notes": list(notes),
    }


def goal(name: str, value: float | None, target: str, met: bool | None, how: str) -> dict[str, Any]:
    return {"goal": name, "value": value, "target": target, "met": met, "how": how}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def paired_ratios(runs: Sequence[Run], baselines: Sequence[Run]) -> list[float | None]:
    """Per round, the median step time of a run over that of the baseline run of the same round:
    the two ran next to each other, so a change in the machine's load affects both alike."""
    base = {b.round: median(b.step_times.values()) for b in baselines}
    return [ratio(median(r.step_times.values()), base.get(r.round)) for r in runs]


def interleaved(items: Sequence[Any], rounds: int) -> list[tuple[int, Any]]:
    """(round, item) in ABBA order: odd rounds run the items in reverse, so slow drift in the
    machine's load does not favour whichever item always runs first."""
    order = []
    for r in range(rounds):
        seq = items if r % 2 == 0 else list(reversed(items))
        order.extend((r, it) for it in seq)
    return order


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
# Trainer runs as real processes


@dataclass(frozen=True)
class Cadence:
    """Which periodic protections are due at a step (the trainer's own rules, trainer/loop.py)."""

    fingerprint_every: int = 0
    audit_every: int = 0
    snapshot_every: int = 0  # a snapshot is taken only at a step whose fingerprint check passed

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int) -> Cadence:
        ic = cfg.integrity
        audit = ic.audit_every if world_size > 1 and cfg.parallel == "ddp" else 0
        return cls(ic.fingerprint_every, audit, ic.snapshot_every)

    def due(self, step: int) -> tuple[str, ...]:
        fp = bool(self.fingerprint_every) and step % self.fingerprint_every == 0
        out = ["fingerprint"] if fp else []
        if self.audit_every and step % self.audit_every == 0:
            out.append("audit")
        if fp and self.snapshot_every and step % self.snapshot_every == 0:
            out.append("snapshot")
        return tuple(out)


@dataclass
class Run:
    """One measured trainer run: rank 0's step times after warm-up."""

    label: str
    round: int
    command: list[str]
    step_times: dict[int, float]  # step -> seconds
    wall_s: float

    def by_class(self, cadence: Cadence) -> dict[tuple[str, ...], list[float]]:
        out: dict[tuple[str, ...], list[float]] = {}
        for step, t in sorted(self.step_times.items()):
            out.setdefault(cadence.due(step), []).append(t)
        return out


def bench_env(threads: int) -> dict[str, str]:
    """The environment of a benchmarked run: fixed thread counts, no Stanchion contract variables
    (an agent's STANCHION_* settings would change what the trainer does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANCHION_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_step_times(run_dir: Path, *, warmup: int) -> dict[int, float]:
    """``step_time_s`` by step from rank 0's progress.jsonl, steps 1..warmup dropped (the newest
    record of a step wins, as after a rollback)."""
    path = run_dir / "ranks" / "rank-00000" / "progress.jsonl"
    times: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "step_time_s" in rec and rec["step"] > warmup:
                    times[int(rec["step"])] = float(rec["step_time_s"])
    return times


def run_measured(
    label: str,
    cmd: list[str],
    run_dir: Path,
    *,
    round_: int,
    warmup: int,
    threads: int,
    timeout_s: float,
    progress: Progress,
) -> Run:
    """Run ``cmd`` (a launcher and its ranks) to completion and read rank 0's step times."""
    progress(f"running {label}: {shown(cmd)}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "launcher.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=bench_env(threads),
            cwd=REPO,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_session(proc)
            raise BenchError(f"{label}: no result after {timeout_s:.0f} s", hint=f"see {log_path}") from None
        except BaseException:  # Ctrl-C reaches only our own process group, not the run's session
            stop_session(proc)
            raise
    wall_s = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        raise BenchError(f"{label} exited with code {code}: {' '.join(tail)[:300]}", hint=f"see {log_path}")
    times = read_step_times(run_dir, warmup=warmup)
    if not times:
        raise BenchError(f"{label}: no step times after {warmup} warm-up steps", hint=f"see {log_path}")
    progress(
        f"  {label}: median step {median(times.values()):.4f} s over {len(times)} steps, {wall_s:.1f} s wall"
    )
    return Run(label, round_, cmd, times, wall_s)


def stop_session(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the session ``proc`` leads (a launcher this module started, and its ranks)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def shown(cmd: Sequence[str]) -> str:
    """A command for people and JSON: ``python`` for this interpreter's path."""
    return shlex.join(["python" if i == 0 and c == sys.executable else c for i, c in enumerate(cmd)])


def step_time_stats(runs: Sequence[Run], cadence: Cadence) -> dict[str, Any]:
    """Step times of several runs of one configuration: pooled median and classes, and per run."""
    pooled: dict[tuple[str, ...], list[float]] = {}
    for run in runs:
        for k, v in run.by_class(cadence).items():
            pooled.setdefault(k, []).extend(v)
    every = [t for v in pooled.values() for t in v]
    within = [w for w in (periodic_overhead(r.by_class(cadence)) for r in runs) if w is not None]
    return {
        "step_time_s": {**summary(every), "amortized": stratified_mean(pooled)},
        "steps_measured": len(every),
        "due": {
            "+".join(k): {"steps": len(v), "median_s": median(v)} for k, v in sorted(pooled.items()) if k
        },
        "overhead_within_run": median(within) if within else None,
        "runs": [
            {
                "round": r.round,
                "median_step_time_s": median(r.step_times.values()),
                "steps": len(r.step_times),
                "first_step": min(r.step_times),
                "wall_s": r.wall_s,
            }
            for r in runs
        ],
    }


def trainer_flags(preset: str, data: Path, steps: int, sets: Mapping[str, Any]) -> list[str]:
    """Trainer flags (trainer/cli.py) shared by the Stanchion and DDP sides; no --nproc, --run-dir."""
    flags = ["--preset", preset, "--data", str(data), "--steps", str(steps), "--checkpoint-every", "0"]
    for key, value in sets.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags += ["--set", f"{key}={text}"]
    return flags


def resolve_flags(flags: Sequence[str]) -> TrainConfig:
    """The config a trainer rank would resolve from ``flags`` (the trainer's own parser)."""
    from trainer.cli import parser, resolve_config

    return resolve_config(parser().parse_args(list(flags)), env={})


def stanchion_command(flags: Sequence[str], run_dir: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run_dir),
        "--resume",
        "none",
        *flags,
    ]


def ddp_command(flags: Sequence[str], run_dir: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "diagnostics.bench",
        "ddp-worker",
        "--run-dir",
        str(run_dir),
        *flags,
    ]


def data_vocab(data: Path) -> int:
    from trainer.data import TokenData

    return TokenData(data).vocab_size


def warmup_within(preset: str, steps: int) -> dict[str, int]:
    """The LR warm-up must fit in the run (a config rule); shorten it when the preset's does not."""
    from trainer.config import resolve

    return {"optim.warmup_steps": steps} if resolve(preset).optim.warmup_steps > steps else {}


def warmup_steps(steps: int) -> int:
    """Steps dropped from the front of each run: allocations, first-touch of optimizer state."""
    return min(5, max(1, steps // 4))


# ---------------------------------------------------------------------------------------------
# The plain-DDP baseline (one rank; run under torchrun)


def ddp_worker(argv: Sequence[str]) -> int:
    """Train like a plain torch DDP loop would, with Stanchion's model, optimizer, LR schedule and
    batches (trainer.data.get_batch), and write ``step_time_s`` records where the trainer does.

    Left out on purpose, because they are what Stanchion adds: activation-norm tracking, per-layer
    grad norms, the per-step control all-gather, fingerprints, the audit, snapshots and
    deterministic algorithms. The loss is read every step (a host sync), as a logging loop does.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stanchion.files import JsonlWriter
    from trainer.cli import parser
    from trainer.config import replace
    from trainer.data import TokenData, get_batch
    from trainer.model import GPT
    from trainer.optim import build_optimizer, lr_at, set_lr
    from trainer.parallel import env_topology, pick_device

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
    model.track_activations = False
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = build_optimizer(model, cfg.optim, device_type=device.type)
    accum = cfg.check_world(world)
    bf16 = cuda and cfg.precision == "bf16"
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
            sync = ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext()  # reduce once per step
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    _, loss = ddp(x, y)
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


def trainer_plan(preset: str, *, data: Path, steps: int | None, nproc: int, cuda: bool) -> TrainerPlan:
    """What `bench trainer` runs for ``preset``: the preset, made to fit this machine and ``nproc``.

    On a CPU anything bigger than ``tiny`` gets 1 sequence per rank per step at seq_len <= 256 and
    20 steps (the last checks fingerprints and takes a snapshot); on a GPU the preset's own batch
    shape runs in bf16. Every change is listed in ``notes``.
    """
    from trainer.config import resolve

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
    if base.parallel != "ddp":
        sets["parallel"] = "ddp"
        notes.append(f"parallel=ddp (the preset uses {base.parallel}): the baseline is DDP")
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
) -> dict[str, Any]:
    """Stanchion's trainer (its real CLI, all protections at their defaults) beside plain torch DDP,
    per preset: step time, tokens/s, and model FLOP/s as a fraction of the measured matmul peak.

    The peak is a roofline-style ceiling: the median FLOP/s of a square matmul (fp32 2048 on a CPU
    with ``threads`` torch threads, as each rank uses; bf16 8192 on a GPU) times the number of ranks,
    measured before and after the training runs, the higher of the two taken.
    """
    import torch

    load_at_start = os.getloadavg()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    plans = [trainer_plan(p, data=data, steps=steps, nproc=nproc, cuda=cuda) for p in presets]
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
    for plan in plans:
        for round_, system in interleaved(["stanchion", "ddp"], rounds):
            run_dir = work_dir / plan.preset / f"{system}-r{round_}"
            build = stanchion_command if system == "stanchion" else ddp_command
            cmd = build(plan.flags, run_dir, nproc)
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
        for system in ("stanchion", "ddp"):
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
        s, d = entry["stanchion"]["step_time_s"], entry["ddp"]["step_time_s"]
        per_round = paired_ratios(runs[(plan.preset, "stanchion")], runs[(plan.preset, "ddp")])
        entry["stanchion_vs_ddp"] = {
            "step_time_ratio_median": ratio(s["median"], d["median"]),
            "step_time_ratio_amortized": ratio(s["amortized"], d["amortized"]),
            "step_time_ratio_p10": ratio(s["p10"], d["p10"]),
            "step_time_ratio_per_round": per_round,
            "step_time_ratio_median_of_rounds": median(r for r in per_round if r is not None),
        }
        results["presets"][plan.preset] = entry
    settings = {
        "data": str(data),
        "presets": list(presets),
        "nproc": nproc,
        "rounds": rounds,
        "device": device,
        "threads_per_rank": threads,
        "order": "ABBA: stanchion, ddp; then ddp, stanchion",
    }
    notes = [
        "step_time_s: rank 0's time from the start of a step to its end, from its progress records "
        "(Stanchion: trainer/loop.py; DDP: diagnostics/bench.py ddp_worker); warm-up steps dropped",
        "amortized: mean step time with each class of step (which protections were due) at its median",
        "flop_utilization = flops_per_token x tokens_per_s / (matmul FLOP/s per rank x ranks); "
        "flops_per_token = 6N + 12 L d T (trainer/model.py), N including the lm_head",
        "step_time_ratio > 1: Stanchion is slower than plain DDP by that factor",
    ]
    return envelope("trainer", command, settings, results, notes=notes, load_at_start=load_at_start)


# ---------------------------------------------------------------------------------------------
# Benchmark: integrity (fingerprint throughput, and what the protections cost)


def checksum_throughput(nbytes: int, *, repeats: int, threads: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """GB/s (1e9 bytes / s, bytes of the tensor over the median time) of the replica fingerprint,
    of memcpy (``Tensor.copy_`` into a preallocated, already-touched tensor) at each thread count,
    and of zlib.crc32 and sha256 on the same bytes. Repetitions go round-robin over the cases."""
    import hashlib
    import zlib

    import torch

    from trainer.fingerprint import tensor_fingerprint

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
    """name -> integrity settings of each measured configuration (defaults from IntegrityConfig)."""
    from trainer.config import IntegrityConfig

    d = IntegrityConfig()
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
    from trainer.config import IntegrityConfig

    if total is None or total <= budget:
        return None
    known = {k: v for k, v in costs.items() if v is not None}
    if not known:
        return {"dominant": None, "advice": "no per-protection cost could be measured"}
    name = max(known, key=lambda k: known[k])
    key = {"fingerprint": "fingerprint_every", "audit": "audit_every", "snapshot": "snapshot_every"}[name]
    cadence = getattr(IntegrityConfig(), key)
    room = budget - (total - known[name])
    if room <= 0:
        return {
            "dominant": name,
            "cost": known[name],
            "advice": f"the other protections alone exceed {budget:.0%}: changing integrity.{key} is not enough",
        }
    new = math.ceil(cadence * known[name] / room)
    if name == "snapshot":  # effective only at fingerprint steps: keep it a multiple of K
        k = IntegrityConfig().fingerprint_every
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


# ---------------------------------------------------------------------------------------------
# Work directories


@contextlib.contextmanager
def work_directory(path: Path | None, benchmark: str) -> Iterator[Path]:
    """A fresh directory for one benchmark's runs: under ``path`` (kept), or a temporary one."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=f"{benchmark}-", dir=path))
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"stanchion-bench-{benchmark}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ddp-worker"]:
        return ddp_worker(argv[1:])
    print("usage: torchrun --nproc-per-node N -m diagnostics.bench ddp-worker TRAINER-FLAGS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
