"""`stanchion coordinator serve`: the coordinator daemon. Its options are the fields of
coordinator/config.py (diagnostics/daemon_cli.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import typer

from coordinator.config import CoordinatorConfig
from diagnostics.daemon_cli import EPILOG, serve_command
from diagnostics.output import handle_errors, setup_logging

app = typer.Typer(help="Run the coordinator daemon.", no_args_is_help=True, rich_markup_mode=None)


@app.callback()
def _group() -> None:
    pass


def _run(cfg: Any, port_file: str) -> None:
    from coordinator.server import serve
    from stanchion import settings

    setup_logging()
    logging.getLogger(__name__).info("resolved config: %s", settings.as_dict(cfg))
    asyncio.run(serve(cfg, port_file=port_file))


app.command("serve", epilog=EPILOG)(
    handle_errors(serve_command(CoordinatorConfig, _run, "Serve the coordinator until SIGTERM or SIGINT."))
)
