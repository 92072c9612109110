"""`stanchion coordinator serve`: the coordinator daemon."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.output import handle_errors, setup_logging

app = typer.Typer(help="Run the coordinator daemon.", no_args_is_help=True, rich_markup_mode=None)


@app.callback()
def _group() -> None:
    pass


def given(**flags: Any) -> dict[str, Any]:
    """Only the flags a user passed (None means not passed), so they override file and environment."""
    return {k: v for k, v in flags.items() if v is not None}


@app.command(
    epilog="Config: defaults < --config TOML < STANCHION_* environment < flags. Exit codes: 0 stopped cleanly, 2 bad config."
)
@handle_errors
def serve(
    listen: Annotated[str | None, typer.Option(help="gRPC address HOST:PORT.")] = None,
    state_db: Annotated[str | None, typer.Option(help="SQLite state file (created if missing).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port (-1: off, 0: any free port).")
    ] = None,
    metrics_addr: Annotated[str | None, typer.Option(help="Address the metrics endpoint binds.")] = None,
    health_port: Annotated[
        int | None, typer.Option(help="Plaintext grpc.health.v1 port for probes (0: off).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file of coordinator settings.")] = None,
    tls_dir: Annotated[str | None, typer.Option(help="mTLS directory (stanchion certs init).")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="Plaintext gRPC: for local experiments only.")
    ] = None,
    token_file: Annotated[str | None, typer.Option(help="Hashed bearer tokens (docs/security.md).")] = None,
    heartbeat_timeout_s: Annotated[
        float | None, typer.Option(help="A node whose last heartbeat is older is lost.")
    ] = None,
    port_file: Annotated[
        str, typer.Option(help="Write the bound ports here as JSON (for scripts and tests).")
    ] = "",
) -> None:
    """Serve the coordinator until SIGTERM or SIGINT."""
    from coordinator.config import CoordinatorConfig
    from coordinator.server import serve as run
    from stanchion import settings

    cfg = settings.load(
        CoordinatorConfig,
        toml_path=config,
        env=os.environ,
        overrides=given(
            listen=listen,
            state_db=state_db,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
            health_port=health_port,
            tls_dir=tls_dir,
            insecure=insecure,
            token_file=token_file,
            heartbeat_timeout_s=heartbeat_timeout_s,
        ),
    )
    setup_logging()
    import logging

    logging.getLogger(__name__).info("resolved config: %s", settings.as_dict(cfg))
    asyncio.run(run(cfg, port_file=port_file))
