"""`stanchion bench`: benchmarks that measure Stanchion's speed goals, side by side with its peers.

One command per benchmark; each returns the JSON of diagnostics/bench.py (``--json`` prints it,
``--out FILE`` writes it, otherwise a table). Progress goes to stderr. The figures and the exact
commands that produced them are recorded in docs/benchmarks.md and docs/bench/*.json.

Exit codes: 0 ok (whether or not a goal was met: the JSON says), 1 a benchmark run failed (the
message names its log), 2 usage error.
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

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
    from diagnostics.bench import write_json

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
    for preset, entry in r["presets"].items():
        for system in ("stanchion", "ddp"):
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
        vs = entry["stanchion_vs_ddp"]
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
    json_: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Stanchion's trainer beside plain torch DDP: step time, tokens/s and model FLOP/s.

    Each preset runs through the trainer's real CLI (`python -m trainer --nproc N`, every protection
    at its default, checkpoints off) and as a plain DistributedDataParallel loop under torchrun with
    the same model, batches and thread count, in interleaved rounds. Model FLOP/s are reported as a
    fraction of a square-matmul peak measured in the same run. On a CPU, presets larger than tiny
    train a reduced batch (listed in the JSON); on a GPU they run in bf16."""
    from diagnostics.bench import bench_trainer, work_directory

    presets = presets or ["tiny", "gpt2-124m"]
    rounds = rounds or 3
    command = command_line(
        "bench trainer",
        [
            ("--preset", presets),
            ("--steps", steps),
            ("--nproc", nproc),
            ("--rounds", rounds),
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
        )
    report(result, json_=json_, out=out, table=trainer_table)


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
    from diagnostics.bench import bench_integrity, work_directory

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


# Benchmarks that live in their own modules register themselves: each module has `register(app)`.
BENCH_MODULES: list[str] = ["bench_recovery", "bench_coordinator", "bench_goodput", "bench_report"]
for _module in BENCH_MODULES:
    importlib.import_module(f"diagnostics.{_module}").register(app)
