"""`stanchion agent serve`: the per-node agent daemon. Its options are the fields of
agent/config.py (diagnostics/daemon_cli.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from agent.config import AgentConfig
from diagnostics.daemon_cli import EPILOG, serve_command
from diagnostics.output import handle_errors, setup_logging

app = typer.Typer(help="Run the per-node agent daemon.", no_args_is_help=True, rich_markup_mode=None)


@app.callback()
def _group() -> None:
    pass


def _run(cfg: Any, port_file: str) -> None:
    from agent.daemon import serve

    setup_logging()
    asyncio.run(serve(cfg, port_file=port_file))


app.command("serve", epilog=EPILOG)(
    handle_errors(
        serve_command(
            AgentConfig,
            _run,
            "Serve the agent until SIGTERM or SIGINT (its ranks get SIGTERM and time to checkpoint).",
        )
    )
)
