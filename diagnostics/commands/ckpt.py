"""`stanchion ckpt`: list, verify and inspect checkpoints (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.errors import EXIT_NOT_FOUND, CliError
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message

app = typer.Typer(help="List, verify and inspect checkpoints.", no_args_is_help=True, rich_markup_mode=None)


def _root(run_dir: Path) -> Path:
    for candidate in (run_dir / "checkpoints", run_dir):
        if candidate.is_dir() and any(p.name.startswith("step-") for p in candidate.iterdir()):
            return candidate
    if not run_dir.exists():
        raise CliError(f"{run_dir} does not exist", hint="pass a run directory", exit_code=EXIT_NOT_FOUND)
    return run_dir / "checkpoints"


@app.command("list", epilog="Exit codes: 0 ok, 3 the run directory does not exist.")
@handle_errors
def list_(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A run directory (or its checkpoints/ folder).")
    ],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List a run's checkpoints, newest last, with whether each verifies."""
    from stanchion.sdk import manifest as mf

    rows: list[dict[str, Any]] = []
    for entry in mf.scan(_root(run_dir)):
        v = mf.verify(entry.path)
        m = v.manifest or {}
        rows.append(
            {
                "step": entry.step,
                "path": str(entry.path),
                "good": v.ok,
                "reason": v.reason,
                "fingerprint": m.get("fingerprint", ""),
                "world_size": m.get("world_size"),
                "time": m.get("time"),
            }
        )
    if json_:
        emit_json(rows)
    elif not rows:
        message(f"no checkpoints under {run_dir}")
    else:
        emit_table(
            ["step", "good", "fingerprint", "world", "reason"],
            [
                (r["step"], "yes" if r["good"] else "NO", r["fingerprint"], r["world_size"], r["reason"])
                for r in rows
            ],
        )


@app.command(epilog="Exit codes: 0 good, 1 corrupt, partial or marked bad (the reason is printed).")
@handle_errors
def verify(
    path: Annotated[
        Path,
        typer.Argument(metavar="PATH", help="A checkpoint directory (step-NNNNNNNN, e.g. step-00000100)."),
    ],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Check the commit marker and every file's size and CRC-32."""
    from stanchion.sdk import manifest as mf

    v = mf.verify(path)
    if json_:
        emit_json({"path": str(path), "good": v.ok, "reason": v.reason})
    else:
        message(f"{path}: {'good' if v.ok else 'BAD'}: {v.reason}")
    if not v.ok:
        raise typer.Exit(code=1)


@app.command(epilog="Exit codes: 0 ok, 3 no manifest (not committed).")
@handle_errors
def inspect(
    path: Annotated[
        Path,
        typer.Argument(metavar="PATH", help="A checkpoint directory (step-NNNNNNNN, e.g. step-00000100)."),
    ],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Print a checkpoint's manifest: step, fingerprint, config, data cursor, files."""
    from stanchion.sdk import manifest as mf

    try:
        m = mf.read_manifest(path)
    except FileNotFoundError:
        raise CliError(
            f"{path} has no {mf.MANIFEST}", hint="it was never committed", exit_code=EXIT_NOT_FOUND
        ) from None
    m.pop("rng", None)
    if json_:
        emit_json(m)
    else:
        emit_table(
            ["key", "value"],
            [
                ("step", m.get("step")),
                ("fingerprint", m.get("fingerprint")),
                ("world_size", m.get("world_size")),
                ("parallel", m.get("parallel")),
                ("replicas_agree", m.get("replicas_agree")),
                ("skip_windows", (m.get("cursor") or {}).get("skip_windows")),
                ("files", len(m.get("files", {}))),
            ],
        )
