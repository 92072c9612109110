"""`stanchion bench`: benchmarks that measure Stanchion's speed goals, side by side with its peers.

One command per benchmark; each runs a benchmark of the diagnostics/bench package and returns its
JSON (``--json`` prints it, ``--out FILE`` writes it, otherwise a table); `bench report` renders
docs/benchmarks.md from the recorded JSON. Progress goes to stderr. The figures and the exact
commands that produced them are recorded in docs/benchmarks.md and docs/bench/*.json.

Exit codes: 0 ok (whether or not a goal was met: the JSON says), 1 a benchmark run failed (the
message names its log), 2 usage error.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.bench.common import median
from diagnostics.bench.goodput import DEFAULT_STEPS, SCHEDULES
from diagnostics.bench.recovery import MODEL_HELP, MODELS
from diagnostics.errors import UsageError
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message

app = typer.Typer(
    help="Benchmarks: Stanchion side by side with its peers.", no_args_is_help=True, rich_markup_mode=None
)

EPILOG = (
    "Exit codes: 0 ok (goals met or not: see the JSON's goals), 1 a benchmark run failed "
    "(the message names its log), 2 usage error."
)


@app.callback()
def _group() -> None:
    """Benchmarks: Stanchion side by side with its peers."""


# ---------------------------------------------------------------------------------------------
# Shared options and output

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", metavar="FILE", help="Also write the JSON to FILE (e.g. docs/bench/NAME.json)."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        metavar="DIR",
        help="A directory from `stanchion data prepare` (default: the fixture corpus, prepared in the work dir).",
    ),
]
WorkDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--work-dir",
        metavar="DIR",
        help="Keep the runs (logs, progress files) under DIR (default: a temporary dir, removed).",
    ),
]
NprocOpt = Annotated[
    int, typer.Option("--nproc", min=1, help="Ranks per run (one torch thread each on a CPU).")
]
RoundsOpt = Annotated[
    int | None,
    typer.Option(
        "--rounds", min=1, help="Interleaved rounds of every run, ABBA order (default 3; 1 with --quick)."
    ),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout-s", min=1.0, help="Give up on one run after this many seconds.")
]


def command_line(words: str, options: Sequence[tuple[str, Any]]) -> str:
    """The command as typed: ``stanchion WORDS`` plus every option given a value (None and False
    are left out, True is a bare flag, a list repeats the flag)."""
    parts = ["stanchion", *words.split()]
    for flag, value in options:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or v is False:
                continue
            parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)


def prepared_data(data: Path | None, work_dir: Path) -> Path:
    if data is not None:
        if not (data / "meta.json").is_file():
            raise UsageError(
                f"--data {data}: not a prepared data directory (no meta.json)",
                hint="create one with `stanchion data prepare --out DIR`",
            )
        return data
    from trainer.data import prepare

    out = work_dir / "data-fixture-512"
    message(f"preparing the fixture corpus (vocab 512) in {out}")
    prepare("fixture", 512, out)
    return out


def report(
    result: dict[str, Any], *, json_: bool, out: Path | None, table: Callable[[dict[str, Any]], None]
) -> None:
    from diagnostics.bench.common import write_json

    if out is not None:
        write_json(out, result)
        message(f"wrote {out}")
    if json_:
        emit_json(result)
    else:
        table(result)


def pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:+.1f}%"


def num(x: float | None, fmt: str = ".4g") -> str | None:
    return None if x is None else format(x, fmt)


def print_goals(result: dict[str, Any]) -> None:
    if result["goals"]:
        emit_table(
            ["goal", "value", "target", "met"],
            [[g["goal"], num(g["value"]), g["target"], g["met"]] for g in result["goals"]],
            title="Goals",
        )


# ---------------------------------------------------------------------------------------------
# bench trainer


def trainer_table(result: dict[str, Any]) -> None:
    r = result["results"]
    rows = []
    base = result["settings"].get("parallel", "ddp")
    for preset, entry in r["presets"].items():
        for system in [x for x in ("stanchion", base, "stanchion-off") if x in entry]:
            s = entry[system]
            rows.append(
                [
                    preset,
                    system,
                    num(s["step_time_s"]["median"]),
                    num(s["step_time_s"]["p10"]),
                    num(s["step_time_s"]["amortized"]),
                    s["steps_measured"],
                    num(s["tokens_per_s"], ".0f"),
                    num(s["model_flops_per_s"] / 1e9, ".2f"),
                    pct(s["flop_utilization"]).lstrip("+") if s["flop_utilization"] is not None else None,
                ]
            )
        vs = entry[f"stanchion_vs_{base}"]
        rows.append(
            [
                preset,
                "ratio",
                num(vs["step_time_ratio_median"], ".3f"),
                num(vs["step_time_ratio_p10"], ".3f"),
                num(vs["step_time_ratio_amortized"], ".3f"),
                "",
                "",
                "",
                "",
            ]
        )
        a = entry.get("attribution")
        if a:
            for label, key in (("off ÷ plain", f"off_vs_{base}"), ("defaults ÷ off", "defaults_vs_off")):
                rows.append([preset, label, num(a[key], ".3f"), "", "", "", "", "", ""])
    mm = r["matmul"]
    emit_table(
        ["preset", "system", "step s", "p10 s", "amortized s", "steps", "tok/s", "GFLOP/s", "of peak"],
        rows,
        title=f"Trainer, {result['settings']['nproc']} ranks; matmul peak {mm['peak_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s ({mm['n']}x{mm['n']} {mm['dtype']}, {mm['threads']} thread(s) x {mm['ranks']} ranks)",
    )


@app.command("trainer", epilog=EPILOG)
@handle_errors
def trainer(
    presets: Annotated[
        list[str] | None,
        typer.Option(
            "--preset", metavar="NAME", help="A trainer preset; repeatable (default: tiny, gpt2-124m)."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=2,
            help="Steps per run (default: 100 for tiny, 20 for larger presets on a CPU, 50 on a GPU).",
        ),
    ] = None,
    nproc: NprocOpt = 2,
    rounds: RoundsOpt = None,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 1800.0,
    parallel: Annotated[
        str,
        typer.Option(
            "--parallel",
            metavar="LAYOUT",
            help="ddp, fsdp (FSDP2, one shard group) or hsdp (2 replica groups of nproc/2 shards): "
            "the layout both sides train with, and the plain loop compared.",
        ),
    ] = "ddp",
    attribute: Annotated[
        bool,
        typer.Option(
            "--attribute",
            help="Also run Stanchion with every integrity protection off in each round: splits the "
            "ratio into the SDK's own step machinery and the protections' work.",
        ),
    ] = False,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Stanchion's trainer beside a plain torch loop: step time, tokens/s and model FLOP/s.

    Each preset runs through the trainer's real CLI (`python -m trainer --nproc N`, every protection
    at its default, checkpoints off) and as a plain loop under torchrun (DistributedDataParallel, or
    FSDP2's fully_shard with --parallel fsdp|hsdp) with the same model, batches and thread count, in
    interleaved rounds. Model FLOP/s are reported as a fraction of a square-matmul peak measured in
    the same run. On a CPU, presets larger than tiny train a reduced batch (listed in the JSON); on
    a GPU they run in bf16."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.trainer import BASELINES, bench_trainer

    if parallel not in BASELINES:
        raise UsageError(f"--parallel {parallel!r}: expected one of {', '.join(BASELINES)}")
    if parallel == "hsdp" and nproc % 2:
        raise UsageError(f"--parallel hsdp: --nproc {nproc} is odd", hint="HSDP here is 2 replica groups")
    presets = presets or ["tiny", "gpt2-124m"]
    rounds = rounds or 3
    command = command_line(
        "bench trainer",
        [
            ("--preset", presets),
            ("--steps", steps),
            ("--nproc", nproc),
            ("--rounds", rounds),
            ("--parallel", None if parallel == "ddp" else parallel),
            ("--attribute", attribute),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "trainer") as wd:
        result = bench_trainer(
            data=prepared_data(data, wd),
            presets=presets,
            steps=steps,
            nproc=nproc,
            rounds=rounds,
            work_dir=wd,
            command=command,
            timeout_s=timeout_s,
            progress=message,
            parallel=parallel,
            attribute=attribute,
        )
    report(result, json_=json_, out=out, table=trainer_table)


def checkpoint_table(result: dict[str, Any]) -> None:
    rows = []
    for preset, r in result["results"]["presets"].items():
        for kind in ("plain", "stanchion"):
            k = r[kind]
            rows.append(
                [
                    preset,
                    "dcp.async_save" if kind == "plain" else "Stanchion",
                    num(k["blocked_s"], ".3g"),
                    num(k["window_excess_s"], ".3g"),
                    num(k["ordinary_step_s"], ".3g"),
                ]
            )
    emit_table(
        ["preset", "checkpoint", "blocked s", "window excess s", "a step s"],
        rows,
        title="An asynchronous checkpoint's stall (medians over rounds, rank 0)",
    )
    print_goals(result)


@app.command("checkpoint", epilog=EPILOG)
@handle_errors
def checkpoint(
    presets: Annotated[
        list[str] | None,
        typer.Option("--preset", metavar="NAME", help="A trainer preset; repeatable (default: gpt2-124m)."),
    ] = None,
    nproc: NprocOpt = 2,
    rounds: RoundsOpt = None,
    gap: Annotated[
        int,
        typer.Option("--gap", min=1, help="Ordinary steps before each checkpoint (the round's baseline)."),
    ] = 3,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Steps after each checkpoint counted in its excess.")
    ] = 2,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 1800.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Stanchion's asynchronous checkpoint beside plain dcp.async_save: the time training waits.

    One torchrun job trains the preset with plain DDP and checkpoints the same state both ways in
    interleaved rounds, through the same gloo group: plain `dcp.async_save(get_state_dict(...))`,
    and Stanchion's checkpoint step (the manifest's fingerprint, the save with its staging on a
    thread into buffers kept across checkpoints, and the wait for that copy before the next
    optimizer step). Reports the time blocked and the excess time of the checkpoint step and the
    steps after it. On a CPU, presets larger than tiny train a reduced batch (as bench trainer)."""
    from diagnostics.bench.checkpoint import bench_checkpoint
    from diagnostics.bench.common import work_directory
    from trainer.config import PRESETS

    presets = presets or ["gpt2-124m"]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UsageError(f"--preset {unknown[0]}: unknown preset", hint=f"one of: {', '.join(PRESETS)}")
    rounds = rounds or 3
    command = command_line(
        "bench checkpoint",
        [
            ("--preset", presets),
            ("--nproc", nproc),
            ("--rounds", rounds),
            ("--gap", None if gap == 3 else gap),
            ("--window", None if window == 2 else window),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "checkpoint") as wd:
        result = bench_checkpoint(
            presets=presets,
            data=prepared_data(data, wd),
            nproc=nproc,
            rounds=rounds,
            gap=gap,
            window=window,
            work_dir=wd,
            command=command,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=checkpoint_table)


# ---------------------------------------------------------------------------------------------
# bench sdk


def sdk_table(result: dict[str, Any]) -> None:
    r = result["results"]
    rows = []
    for name, c in r["configs"].items():
        vs = c.get("vs_plain") or {}
        per_round = vs.get("ratio_per_round") or []
        rows.append(
            [
                name,
                num(c["step_time_s"]["median"]),
                num(c["step_time_s"]["p10"]),
                num(c["step_time_s"]["amortized"]),
                c["steps_measured"],
                num(r["ratio"] if name == "guarded" else vs.get("ratio_median"), ".4f"),
                num(vs.get("ratio_p10"), ".3f"),
                num(vs.get("ratio_amortized"), ".3f"),
                " / ".join(num(x, ".3f") or "-" for x in per_round),
                num(vs.get("ratio_median_of_rounds"), ".3f"),
            ]
        )
    m, s = r["model"], result["settings"]
    emit_table(
        [
            "config",
            "step s",
            "p10 s",
            "amortized s",
            "steps",
            "÷ plain",
            "p10",
            "amortized",
            "per round",
            "of rounds",
        ],
        rows,
        title=f"SDK on a user's loop: {m['params'] / 1e6:.2f}M-parameter MLP, {m['sequences_per_step_per_rank']} "
        f"sequences per rank per step, {s['nproc']} ranks, {s['rounds']} rounds of {s['steps']} steps",
    )
    print_goals(result)


@app.command("sdk", epilog=EPILOG)
@handle_errors
def sdk(
    steps: Annotated[
        int, typer.Option("--steps", min=2, help="Optimizer steps per run (100: step 80 runs the audit).")
    ] = 100,
    nproc: Annotated[
        int, typer.Option("--nproc", min=2, help="Ranks per run (at least 2: the guard compares replicas).")
    ] = 2,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, help="Interleaved rounds of every configuration, ABBA order.")
    ] = 3,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Embedding width per context token.")] = 32,
    hidden: Annotated[int, typer.Option("--hidden", min=1, help="Width of the hidden layers.")] = 512,
    layers: Annotated[int, typer.Option("--layers", min=1, help="Linear layers before the head.")] = 4,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Sequences per rank per micro-batch.")
    ] = 512,
    accum: Annotated[int, typer.Option("--accum", min=1, help="Micro-batches per optimizer step.")] = 2,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Torch threads per rank.")] = 1,
    variants: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            metavar="KEY=N[,KEY=N]",
            help="Also run the guarded loop with these protections changed (repeatable; KEY one of "
            "fingerprint_every, audit_every, snapshot_every; 0 disables), e.g. fingerprint_every=10.",
        ),
    ] = None,
    checkpoint_every: Annotated[
        int,
        typer.Option("--checkpoint-every", min=0, help="Guarded runs: checkpoint every N steps (0: off)."),
    ] = 0,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 900.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """The SDK's per-step cost on a user's own loop: the same program plain and under the guard.

    A self-contained user program (diagnostics/bench/sdk_worker.py: an MLP language model on
    deterministic synthetic batches, AdamW, an LR schedule, gradient clipping) runs under torchrun as
    a plain DistributedDataParallel loop and adopting Stanchion as examples/own_loop.py does
    (stanchion.join + stanchion.guard, every protection at its default, checkpoints off), in
    interleaved rounds. Reports each configuration's median step time (rank 0, warm-up dropped), the
    top-level ratio = guarded median / plain median, the per-round paired ratios, and the goal
    ratio <= 1.03. --variant adds guarded configurations with single protections changed."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.sdk import ModelSize, bench_sdk, configurations

    configurations(variants or [])  # a bad --variant is a usage error before anything runs
    size = ModelSize(dim=dim, hidden=hidden, layers=layers, batch_size=batch_size, accum=accum)
    defaults = ModelSize()
    command = command_line(
        "bench sdk",
        [
            ("--steps", steps),
            ("--nproc", nproc),
            ("--rounds", rounds),
            *(
                (f"--{key.replace('_', '-')}", None if value == getattr(defaults, key) else value)
                for key, value in vars(size).items()
            ),
            ("--threads", None if threads == 1 else threads),
            ("--variant", variants or None),
            ("--checkpoint-every", checkpoint_every or None),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "sdk") as wd:
        result = bench_sdk(
            steps=steps,
            nproc=nproc,
            rounds=rounds,
            size=size,
            variants=variants or [],
            threads=threads,
            checkpoint_every=checkpoint_every,
            work_dir=wd,
            command=command,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=sdk_table)


# ---------------------------------------------------------------------------------------------
# bench standby


def standby_table(result: dict[str, Any]) -> None:
    rows = []
    for preset, r in result["results"]["presets"].items():
        for mode in ("cold", "warm"):
            m = r[mode]
            rows.append(
                [
                    preset,
                    mode,
                    num(m["ready_s"], ".3g"),
                    num(m["assignment_to_started_s"], ".3g"),
                    num(m["assignment_to_first_step_s"], ".3g"),
                    num(m["second_step_s"], ".3g"),
                ]
            )
    emit_table(
        ["preset", "standby", "ready s", "to started s", "to first step s", "a step s"],
        rows,
        title="A standby's assignment to its first step (one rank, one thread, medians)",
    )


@app.command("standby", epilog=EPILOG)
@handle_errors
def standby(
    presets: Annotated[
        list[str] | None,
        typer.Option(
            "--preset", help="Trainer presets to measure (repeatable; default gpt2-124m and llama-1b)."
        ),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials per preset and standby kind.")] = 1,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=8, help="Tokens of the single micro-batch each step computes.")
    ] = 64,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 900.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """How soon a warm standby of the built-in trainer trains after its assignment, at real sizes.

    Each trial starts `python -m trainer` as an agent starts a standby, waits until it is ready,
    assigns it (rank 0 of 1, a fresh start) and reads from its records the time from the
    assignment to the process group's start and to the first step. Cold: the standby learns its
    config from the assignment and builds the model then. Warm: it was told the running job's config
    when it started (as an agent does) and built the model while it waited."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.standby import bench_standby
    from trainer.config import PRESETS

    chosen = presets or ["gpt2-124m", "llama-1b"]
    unknown = [p for p in chosen if p not in PRESETS]
    if unknown:
        raise UsageError(f"--preset {unknown[0]}: unknown preset", hint=f"one of: {', '.join(PRESETS)}")
    command = command_line(
        "bench standby",
        [
            ("--preset", presets or None),
            ("--trials", None if trials == 1 else trials),
            ("--seq-len", None if seq_len == 64 else seq_len),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "standby") as wd:
        result = bench_standby(
            presets=chosen,
            trials=trials,
            data=prepared_data(data, wd),
            seq_len=seq_len,
            work_dir=wd,
            command=command,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=standby_table)


# ---------------------------------------------------------------------------------------------
# bench device


def device_table(result: dict[str, Any]) -> None:
    r = result["results"]
    emit_table(
        ["operation", "GB/s (median)", "seconds (median)"],
        [[k, num(v, ".4g"), num(r["seconds"][k], ".3g")] for k, v in r["gb_per_s"].items()],
        title=f"{r['device_name']} ({r['device']}): {r['tensor_bytes'] / 2**20:.0f} MiB of fp32, "
        f"{r['repeats']} repeats",
    )
    print_goals(result)


@app.command("device", epilog=EPILOG)
@handle_errors
def device(
    device_: Annotated[
        str, typer.Option("--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    ] = "auto",
    tensor_mb: Annotated[
        int, typer.Option("--tensor-mb", min=1, help="Size of the fp32 tensor, MiB.")
    ] = 1024,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Timed repetitions of each operation.")
    ] = 10,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """The integrity checks' device paths: the replica fingerprint beside a device memcpy of the
    same tensor, and an in-memory snapshot's copy to host memory. Prints the device's dense bf16
    peak where its datasheet figure is known."""
    import torch

    from diagnostics.bench.device import bench_device

    chosen = ("cuda" if torch.cuda.is_available() else "cpu") if device_ == "auto" else device_
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device_}: torch sees no CUDA device", hint="use --device cpu")
    if not chosen.startswith(("cpu", "cuda")):
        raise UsageError(f"--device {device_}: unknown device", hint="auto, cpu, cuda or cuda:N")
    command = command_line(
        "bench device",
        [
            ("--device", None if device_ == "auto" else device_),
            ("--tensor-mb", None if tensor_mb == 1024 else tensor_mb),
            ("--repeats", None if repeats == 10 else repeats),
            ("--json", json_),
            ("--out", out),
        ],
    )
    result = bench_device(command=command, device=chosen, tensor_mb=tensor_mb, repeats=repeats)
    report(result, json_=json_, out=out, table=device_table)


# ---------------------------------------------------------------------------------------------
# bench integrity


def integrity_table(result: dict[str, Any]) -> None:
    r = result["results"]
    t = r["throughput"]
    emit_table(
        ["case", "GB/s (median)", "min", "max"],
        [
            [k, num(v["gb_per_s"], ".3g"), num(v["gb_per_s_min"], ".3g"), num(v["gb_per_s_max"], ".3g")]
            for k, v in t["gb_per_s"].items()
        ],
        title=f"Checksum throughput over {t['tensor_bytes'] / 2**20:.0f} MiB of fp32, {t['repeats']} repeats",
    )
    emit_table(
        ["configuration", "step s", "steps", "median", "p10", "per round", "amortized", "within run"],
        [
            [
                name,
                num(c["step_time_s"]["median"]),
                c["steps_measured"],
                pct(c["overhead_median"]),
                pct(c["overhead_p10"]),
                pct(c["overhead_median_of_rounds"]),
                pct(c["overhead_amortized"]),
                pct(c["overhead_within_run"]),
            ]
            for name, c in r["protections"]["configs"].items()
        ],
        title=f"Protections: overhead vs the baseline, {result['settings']['nproc']} ranks, "
        f"{result['settings']['rounds']} rounds",
    )
    print_goals(result)
    advice = r["protections"]["advice"]
    if advice:
        typer.echo(f"advice: {advice['advice']}")


@app.command("integrity", epilog=EPILOG)
@handle_errors
def integrity(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A few seconds' check of the whole path: 8 MiB, tiny model, "
            "6 steps, baseline and all_defaults only. Not a measurement.",
        ),
    ] = False,
    tensor_mb: Annotated[
        int | None,
        typer.Option("--tensor-mb", min=1, help="Size of the checksummed fp32 tensor, MiB (default 256)."),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option("--repeats", min=1, help="Timed repetitions per checksum (default 7).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=2, help="Steps per trainer run (default 120).")
    ] = None,
    protections: Annotated[
        list[str] | None,
        typer.Option(
            "--protection",
            metavar="NAME",
            help="Run only these configurations (repeatable): baseline, fingerprint_k1, fingerprint_default, "
            "audit_default, snapshots_default, all_defaults. The baseline always runs.",
        ),
    ] = None,
    nproc: NprocOpt = 2,
    rounds: RoundsOpt = None,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 1800.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Fingerprint throughput beside memcpy, crc32 and sha256; and the step-time cost of each
    protection (fingerprints at K=1 and the default K, the audit, snapshots, all defaults) from real
    multi-rank trainer runs of the tiny preset, interleaved against a run with every protection off."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.integrity import bench_integrity

    if nproc < 2:
        raise UsageError("--nproc must be at least 2: fingerprints and the audit compare ranks")
    command = command_line(
        "bench integrity",
        [
            ("--quick", quick),
            ("--tensor-mb", tensor_mb),
            ("--repeats", repeats),
            ("--steps", steps),
            ("--protection", protections),
            ("--nproc", nproc),
            ("--rounds", rounds),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "integrity") as wd:
        result = bench_integrity(
            data=prepared_data(data, wd),
            work_dir=wd,
            command=command,
            quick=quick,
            tensor_mb=tensor_mb,
            repeats=repeats,
            steps=steps,
            rounds=rounds,
            nproc=nproc,
            protections=protections,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=integrity_table)


# ---------------------------------------------------------------------------------------------
# bench recovery


def recovery_table(result: dict[str, Any]) -> None:
    r = result["results"]
    emit_table(
        ["system", "recovery s (median)", "min", "max", "lost steps (median)", "max", "trials"],
        [
            [
                name,
                num(r[name]["recovery_s"], ".3f"),
                num(r[name]["recovery_s_min"], ".3f"),
                num(r[name]["recovery_s_max"], ".3f"),
                num(r[name]["lost_steps"], "g"),
                num(r[name]["lost_steps_max"], "g"),
                f"{r[name]['measured']}/{r[name]['trials']}",
            ]
            for name in ("stanchion", "torchrun", "torchft")
            if r.get(name)
        ],
        title=f"Recovery after SIGKILL of one rank; Stanchion / torchrun = {num(r['ratio'], '.3f')}"
        + (f", Stanchion / torchft = {num(r['ratio_vs_torchft'], '.3f')}" if r.get("torchft") else ""),
    )
    print_goals(result)


@app.command("recovery", epilog=EPILOG)
@handle_errors
def recovery(
    trials: Annotated[int, typer.Option("--trials", min=1, help="Kills per system (ABBA order).")] = 5,
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = "tiny",
    steps: Annotated[int, typer.Option("--steps", min=3, help="Steps per job.")] = 60,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Checkpoint cadence of both sides.")
    ] = 20,
    kill_step: Annotated[
        int, typer.Option("--kill-step", min=1, help="Kill rank 1 once this step is completed.")
    ] = 25,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=1, help="torchrun --max-restarts.")] = 3,
    torchft: Annotated[
        bool,
        typer.Option("--torchft/--no-torchft", help="Also run torchft (2 replica groups, a lighthouse)."),
    ] = True,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 600.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Kill-to-first-step recovery time and lost steps after SIGKILL of one rank: Stanchion (a
    local cluster, 2 nodes x 1 worker + a spare) beside torchrun --max-restarts on the same
    trainer, and torchft (the same model, data and batches under its Manager and DDP, a dead
    replica restarted at once), in alternating trials."""
    from diagnostics.bench.common import BenchError, work_directory
    from diagnostics.bench.recovery import bench_recovery

    if model not in MODELS:
        raise UsageError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    command = command_line(
        "bench recovery",
        [
            ("--trials", trials),
            ("--model", model),
            ("--steps", steps),
            ("--checkpoint-every", checkpoint_every),
            ("--kill-step", kill_step),
            ("--max-restarts", max_restarts),
            ("--no-torchft", not torchft),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "recovery") as wd:
        try:
            result = bench_recovery(
                data=prepared_data(data, wd),
                work_dir=wd,
                command=command,
                trials=trials,
                model=model,
                steps=steps,
                checkpoint_every=checkpoint_every,
                kill_step=kill_step,
                max_restarts=max_restarts,
                torchft=torchft,
                timeout_s=timeout_s,
                progress=message,
            )
        except TimeoutError as e:  # a cluster that never got where the trial needed it
            raise BenchError(str(e)) from None
    report(result, json_=json_, out=out, table=recovery_table)


# ---------------------------------------------------------------------------------------------
# bench agent-restart


def agent_restart_table(result: dict[str, Any]) -> None:
    r = result["results"]
    emit_table(
        ["ranks", "training time lost s (median)", "max", "lost steps (max)", "new generations", "trials"],
        [
            [
                label,
                num(r[key]["time_lost_s"], ".3f"),
                num(r[key]["time_lost_s_max"], ".3f"),
                num(r[key]["lost_steps_max"], "g"),
                num(r[key]["new_generations"], "g"),
                num(r[key]["trials"], "g"),
            ]
            for label, key in (("adopted", "adopted"), ("die with the agent", "ranks_die"))
        ],
        title=f"An agent killed and restarted; adopted / ranks die = {num(r['ratio'], '.3f')}",
    )
    print_goals(result)


@app.command("agent-restart", epilog=EPILOG)
@handle_errors
def agent_restart(
    trials: Annotated[int, typer.Option("--trials", min=1, help="Agent kills per side (ABBA order).")] = 3,
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = "tiny",
    steps: Annotated[int, typer.Option("--steps", min=3, help="Steps per job.")] = 150,
    kill_step: Annotated[
        int, typer.Option("--kill-step", min=1, help="Kill the agent once this step is completed.")
    ] = 25,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 600.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Training time lost when a node's agent is SIGKILLed and restarted at once: its ranks adopted
    by the new agent (the default) beside ranks that die with their agent (--orphan-grace-s 0, as
    under any launcher whose workers are its children), each on a local cluster of 2 nodes x 1
    worker + a spare, in alternating trials."""
    from diagnostics.bench.agent_restart import bench_agent_restart
    from diagnostics.bench.common import BenchError, work_directory

    if model not in MODELS:
        raise UsageError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    command = command_line(
        "bench agent-restart",
        [
            ("--trials", trials),
            ("--model", model),
            ("--steps", steps),
            ("--kill-step", kill_step),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "agent-restart") as wd:
        try:
            result = bench_agent_restart(
                data=prepared_data(data, wd),
                work_dir=wd,
                command=command,
                trials=trials,
                model=model,
                steps=steps,
                kill_step=kill_step,
                timeout_s=timeout_s,
                progress=message,
            )
        except TimeoutError as e:
            raise BenchError(str(e)) from None
    report(result, json_=json_, out=out, table=agent_restart_table)


# ---------------------------------------------------------------------------------------------
# bench coordinator


def coordinator_table(result: dict[str, Any]) -> None:
    r = result["results"]
    emit_table(
        [
            "agents",
            "transport",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failures",
            "heartbeats/s (offered)",
            "coordinator cores",
            "RSS MB",
            "oldest age s",
            "client lateness p99 ms",
            "other cores",
        ],
        [
            [
                p["agents"],
                "mTLS" if p["tls"] else "plaintext",
                num(p["p50_ms"], ".3g"),
                num(p["p99_ms"], ".3g"),
                num(p["max_ms"], ".3g"),
                f"{p['failures']} {p['failures_by_code'] or ''}".strip(),
                f"{num(p['achieved_per_s'], '.0f')} ({num(p['offered_per_s'], '.0f')})",
                num(p["coordinator_cores"], ".2f"),
                num(p["coordinator_rss_mb_peak"], ".0f"),
                num(p["heartbeat_age_s_max"], ".3g"),
                num(p["client_lateness_p99_ms"], ".3g"),
                num(p["other_cores"], ".2f"),
            ]
            for p in r["points"]
        ],
        title=f"Coordinator: simulated agents heartbeating every {result['settings']['interval_s']:g} s"
        + (" in one job" if result["settings"]["job"] else ""),
    )
    print_goals(result)


@app.command("coordinator", epilog=EPILOG)
@handle_errors
def coordinator(
    agents: Annotated[
        list[int] | None,
        typer.Option(
            "--agents",
            metavar="N",
            min=1,
            help="Simulated agents (nodes); repeatable: one point per count, the first is the headline "
            "(default 1000).",
        ),
    ] = None,
    seconds: Annotated[float, typer.Option("--seconds", min=1.0, help="Measured seconds per point.")] = 30.0,
    warmup_s: Annotated[
        float, typer.Option("--warmup-s", min=0.0, help="Heartbeating before the measured window.")
    ] = 5.0,
    client_procs: Annotated[
        int, typer.Option("--client-procs", min=1, help="Processes that run the simulated agents.")
    ] = 2,
    tls: Annotated[
        bool,
        typer.Option("--tls/--insecure", help="mTLS with a fresh development PKI (default), or plaintext."),
    ] = True,
    compare_insecure: Annotated[
        bool,
        typer.Option("--compare-insecure", help="With --tls: also run every point in plaintext, after it."),
    ] = False,
    job: Annotated[
        bool,
        typer.Option(
            "--job/--no-job",
            help="Submit one job spanning every agent once they registered, so that every heartbeat "
            "carries that job's progress through the state machine (default), or leave them idle.",
        ),
    ] = True,
    interval_s: Annotated[
        float, typer.Option("--interval-s", min=0.01, help="Heartbeat interval of every agent.")
    ] = 1.0,
    workers_per_node: Annotated[
        int, typer.Option("--workers-per-node", min=1, max=64, help="Worker statuses per heartbeat.")
    ] = 8,
    event_rate: Annotated[
        float,
        typer.Option("--event-rate", min=0.0, max=1.0, help="Chance that a heartbeat carries one event."),
    ] = 0.02,
    client_nice: Annotated[
        int,
        typer.Option(
            "--client-nice",
            min=0,
            max=19,
            help="Niceness of the client processes: >0 lets the coordinator take a core first, as if the "
            "agents ran elsewhere.",
        ),
    ] = 0,
    scrape_every_s: Annotated[
        float, typer.Option("--scrape-every-s", min=0.5, help="Scrape the coordinator's /metrics this often.")
    ] = 10.0,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir", metavar="DIR", help="Keep the logs and state under DIR (default: a temporary dir)."
        ),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=1.0, help="Give up on registration after this many seconds.")
    ] = 300.0,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="FILE", help="Also write the JSON to FILE (e.g. docs/bench/coordinator.json)."
        ),
    ] = None,
) -> None:
    """How many agents one coordinator process carries: a real coordinator process (grpc.aio,
    mTLS by default) and simulated agents, each with its own connection, in --client-procs
    processes. They register, then (by default) join one job spanning all of them and heartbeat at
    a fixed rate with realistic payloads. Reports client-side heartbeat latency, heartbeats achieved
    vs offered, failures by status code, the coordinator's CPU and RSS, and the heartbeat ages the
    coordinator itself reports on /metrics."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.coordinator import bench_coordinator

    counts = agents or [1000]
    command = command_line(
        "bench coordinator",
        [
            ("--agents", counts),
            ("--seconds", _g(seconds)),
            ("--warmup-s", _g(warmup_s)),
            ("--client-procs", client_procs),
            ("--tls" if tls else "--insecure", True),
            ("--compare-insecure", compare_insecure),
            ("--job" if job else "--no-job", True),
            ("--interval-s", _g(interval_s)),
            ("--workers-per-node", workers_per_node),
            ("--event-rate", _g(event_rate)),
            ("--client-nice", client_nice or None),
            ("--scrape-every-s", _g(scrape_every_s)),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, "coordinator") as wd:
        result = bench_coordinator(
            agents=counts,
            seconds=seconds,
            warmup_s=warmup_s,
            client_procs=client_procs,
            tls=tls,
            compare_insecure=compare_insecure,
            job=job,
            interval_s=interval_s,
            workers_per_node=workers_per_node,
            event_rate=event_rate,
            client_nice=client_nice,
            scrape_every_s=scrape_every_s,
            work_dir=wd,
            command=command,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=coordinator_table)


def _g(x: float) -> str:
    return format(x, "g")


# ---------------------------------------------------------------------------------------------
# bench goodput


def goodput_table(result: dict[str, Any]) -> None:
    r = result["results"]
    rows = [
        [
            "Stanchion",
            num(r["ettr"], ".3f"),
            num(r["ettr_fault_free"], ".3f"),
            r["lost_steps"],
            num(r["recovery_s_median"], ".3f"),
            r["final_matches_golden"],
        ]
    ]
    for peer in ("torchrun", "torchft"):
        t = r.get(peer)
        if not t:
            continue
        rec = [x for x in t["recovery_s"] if x is not None]
        rows.append(
            [
                f"{peer} (crashes only)",
                num(t["ettr"], ".3f"),
                "",
                t["lost_steps"],
                num(median(rec), ".3f") if rec else None,
                t["final_matches_golden"],
            ]
        )
    emit_table(
        ["system", "ETTR", "fault-free ceiling", "lost steps", "recovery s (median)", "final == golden"],
        rows,
        title=f"Goodput {r['schedule']}: {r['steps']} steps, {r['faults_scheduled']} faults {r['faults_by_kind']}",
    )
    print_goals(result)


@app.command("goodput", epilog=EPILOG)
@handle_errors
def goodput(
    schedule: Annotated[
        str, typer.Option("--schedule", help="S1: one fault per 2,000 steps on average; S2: one per 200.")
    ] = "S2",
    steps: Annotated[
        int | None, typer.Option("--steps", min=20, help="Steps of the job (default: S1 6000, S2 2000).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fault schedule.")] = 1,
    mean_interval: Annotated[
        float | None,
        typer.Option("--mean-interval", min=1.0, help="Override the schedule's mean steps between faults."),
    ] = None,
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = "medium",
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Checkpoint cadence.")
    ] = 100,
    hang_floor_s: Annotated[
        float,
        typer.Option(
            "--hang-floor-s", min=0.1, help="The agents' hang floor (small, so hangs resolve fast)."
        ),
    ] = 2.0,
    spares: Annotated[int, typer.Option("--spares", min=0, help="Spare nodes.")] = 1,
    torchrun: Annotated[
        bool, typer.Option("--torchrun/--no-torchrun", help="Also run torchrun on the schedule's crashes.")
    ] = True,
    torchft: Annotated[
        bool, typer.Option("--torchft/--no-torchft", help="Also run torchft on the schedule's crashes.")
    ] = True,
    data: DataOpt = None,
    work_dir: WorkDirOpt = None,
    timeout_s: TimeoutOpt = 3600.0,
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """ETTR, lost steps and recovery times of a job through a seeded fault schedule (70% crash,
    12% hang, 8% slow rank, 10% silent corruption), against a fault-free run of the same job in
    the same invocation, and torchrun and torchft on the same schedule's crashes."""
    from diagnostics.bench.common import work_directory
    from diagnostics.bench.goodput import bench_goodput

    if schedule not in SCHEDULES and mean_interval is None:
        raise UsageError(f"--schedule {schedule!r}: expected S1 or S2 (or pass --mean-interval)")
    if model not in MODELS:
        raise UsageError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    n_steps = steps or DEFAULT_STEPS.get(schedule, 2000)
    command = command_line(
        "bench goodput",
        [
            ("--schedule", schedule),
            ("--steps", n_steps),
            ("--seed", seed),
            ("--mean-interval", mean_interval),
            ("--model", None if model == "medium" else model),
            ("--checkpoint-every", None if checkpoint_every == 100 else checkpoint_every),
            ("--hang-floor-s", hang_floor_s),
            ("--spares", None if spares == 1 else spares),
            ("--no-torchrun", not torchrun),
            ("--no-torchft", not torchft),
            ("--data", data),
            ("--json", json_),
            ("--out", out),
        ],
    )
    with work_directory(work_dir, f"goodput-{schedule}") as wd:
        result = bench_goodput(
            schedule=schedule,
            steps=n_steps,
            seed=seed,
            data=prepared_data(data, wd),
            work_dir=wd,
            command=command,
            model=model,
            checkpoint_every=checkpoint_every,
            hang_floor_s=hang_floor_s,
            spares=spares,
            mean_interval=mean_interval,
            torchrun=torchrun,
            torchft=torchft,
            timeout_s=timeout_s,
            progress=message,
        )
    report(result, json_=json_, out=out, table=goodput_table)


# ---------------------------------------------------------------------------------------------
# bench report


@app.command("report", epilog=EPILOG)
@handle_errors
def regenerate_report(
    bench_dir: Annotated[
        Path, typer.Option("--bench-dir", metavar="DIR", help="Where the benchmark JSON files are.")
    ] = Path("docs/bench"),
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The markdown to write.")] = Path(
        "docs/benchmarks.md"
    ),
) -> None:
    """Regenerate docs/benchmarks.md (and its PNG figures, next to the JSON) from the benchmark
    JSON files: each section shows the command above its tables."""
    from diagnostics.bench.report import render

    if not bench_dir.is_dir():
        raise UsageError(f"--bench-dir {bench_dir}: not a directory")
    text, figures = render(bench_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    for f in figures:
        message(f"wrote {f}")
    message(f"wrote {out}")
