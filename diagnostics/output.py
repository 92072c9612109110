"""Output conventions of the `stanchion` CLI: data to stdout (a table or ``--json``), messages to
stderr, and one place that maps exceptions to a one-line error, a hint and an exit code."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import typer

from diagnostics.errors import EXIT_ADDRESS_IN_USE, EXIT_FAILURE, EXIT_USAGE, CliError
from stanchion.net import AddressInUse
from stanchion.settings import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

JSON_HELP = "Print machine-readable JSON to stdout instead of a table."


def debug_enabled() -> bool:
    return os.environ.get("STANCHION_DEBUG", "") not in ("", "0", "false")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root handler; only entry points call this."""
    logging.basicConfig(
        level=logging.DEBUG if debug_enabled() else level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def message(text: str) -> None:
    """A message for people: stderr, so stdout stays parseable."""
    print(text, file=sys.stderr, flush=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def emit_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(soft_wrap=True).print(table)


def fail(err: CliError) -> typer.Exit:
    line = f"error: {err.message}"
    if err.hint:
        line += f" (hint: {err.hint})"
    message(line)
    return typer.Exit(code=err.exit_code)


def handle_errors(fn: F) -> F:
    """Decorator for every command: known errors become one line on stderr and an exit code;
    unexpected ones too, with the traceback only under --debug or STANCHION_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except CliError as e:
            raise fail(e) from None
        except ConfigError as e:
            raise fail(CliError(str(e), hint="fix the key named above", exit_code=EXIT_USAGE)) from None
        except AddressInUse as e:
            raise fail(CliError(str(e), exit_code=EXIT_ADDRESS_IN_USE)) from None
        except Exception as e:  # noqa: BLE001 - the one place that maps everything else
            if hasattr(e, "code") and hasattr(e, "details") and not debug_enabled():  # a grpc.RpcError
                raise fail(CliError(f"{e.code().name}: {e.details()}", exit_code=EXIT_FAILURE)) from None
            if debug_enabled():
                traceback.print_exc()
            hint = "" if debug_enabled() else "rerun with --debug for the traceback"
            raise fail(CliError(f"{type(e).__name__}: {e}", hint=hint, exit_code=EXIT_FAILURE)) from None

    return wrapper  # type: ignore[return-value]
