"""The `stanchion` command line: one Typer app, one module per command group.

Exit codes for every command: 0 ok, 1 runtime failure, 2 usage error; 3 and up are documented by
each command. Data goes to stdout (a table, or JSON with ``--json``); messages go to stderr.
Tracebacks appear only with ``--debug`` or ``STANCHION_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Annotated, Any

import typer

from stanchion import __version__

EPILOG = (
    "Exit codes: 0 ok, 1 failure, 2 usage error, 3+ per command (see each command's --help). "
    "Set STANCHION_DEBUG=1 or pass --debug for tracebacks."
)

app = typer.Typer(
    name="stanchion",
    help="Fault-tolerant pretraining: coordinator, agents, trainer and ops tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    epilog=EPILOG,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)

# (module under diagnostics.commands, group name). A group is listed only once it has a working
# command. Command modules import heavy dependencies (torch, grpc) inside their functions so that
# `stanchion --help` stays fast.
GROUPS: list[tuple[str, str]] = [
    ("data", "data"),
    ("ckpt", "ckpt"),
    ("coordinator", "coordinator"),
    ("agent", "agent"),
    ("job", "job"),
    ("node", "node"),
    ("diag", "diag"),
    ("certs", "certs"),
    ("bench", "bench"),
]
# Single commands registered at the top level: (module, attribute, name).
COMMANDS: list[tuple[str, str, str]] = [("up", "up", "up"), ("train", "train", "train")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stanchion {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["STANCHION_DEBUG"] = "1"


class Command(typer.core.TyperCommand):
    """Every `stanchion` command: a required argument shows in the usage line as Click writes it,
    ``SPEC`` (an optional one as ``[JOB_ID]``), where Typer 0.29 writes ``{SPEC}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            for piece in param.get_usage_pieces(ctx):
                if param.param_type_name == "argument" and param.required:
                    piece = re.sub(r"^\{(.*)\}", r"\1", piece)
                pieces.append(piece)
        return pieces


def use_command_class(group: typer.Typer) -> None:
    """Make :class:`Command` the class of every command under ``group`` that has Typer's default."""
    for info in group.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = Command
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            use_command_class(sub.typer_instance)


for _module, _name in GROUPS:
    app.add_typer(importlib.import_module(f"diagnostics.commands.{_module}").app, name=_name)
for _module, _attr, _name in COMMANDS:
    _cmd = getattr(importlib.import_module(f"diagnostics.commands.{_module}"), _attr)
    app.command(_name, **getattr(_cmd, "command_settings", {}))(_cmd)
use_command_class(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Usage errors become one line on stderr with exit code 2."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="stanchion", standalone_mode=False)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        # Typer's usage errors (from its vendored Click) carry exit_code and format_message.
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: show its help
            print(e.format_message(), file=sys.stderr)
            sys.exit(e.exit_code)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message()} (hint: see 'stanchion --help')", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
