"""What every benchmark shares: statistics, the JSON envelope, and trainer runs as real processes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diagnostics.errors import EXIT_FAILURE, CliError
from stanchion.files import iter_jsonl

if TYPE_CHECKING:
    from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
GB = 1e9
Progress = Callable[[str], None]  # where a benchmark reports what it is doing (stderr in the CLI)
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
    record of a step wins, as after a rollback). The kernel's rule for JSON lines applies: a torn
    last line (a rank killed mid-write) is not a record yet."""
    times: dict[int, float] = {}
    for rec in iter_jsonl(run_dir / "ranks" / "rank-00000" / "progress.jsonl"):
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


def torchrun(nproc: int, *program: str, max_restarts: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --standalone`` on ``nproc`` ranks running ``program``
    (``-m MODULE ...`` or a script and its arguments): every bench's peer and worker launch."""
    restarts = ["--max-restarts", str(max_restarts)] if max_restarts is not None else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *restarts,
        *program,
    ]


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


def warmup_within(preset: str, steps: int) -> dict[str, int]:
    """The LR warm-up must fit in the run (a config rule); shorten it when the preset's does not."""
    from trainer.config import resolve

    return {"optim.warmup_steps": steps} if resolve(preset).optim.warmup_steps > steps else {}


def warmup_steps(steps: int) -> int:
    """Steps dropped from the front of each run: allocations, first-touch of optimizer state."""
    return min(5, max(1, steps // 4))


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
