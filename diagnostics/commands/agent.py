"""`stanchion agent serve`: the per-node agent daemon."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from diagnostics.commands.coordinator import given
from diagnostics.output import handle_errors, setup_logging

app = typer.Typer(help="Run the per-node agent daemon.", no_args_is_help=True, rich_markup_mode=None)


@app.callback()
def _group() -> None:
    pass


@app.command(
    epilog="Config: defaults < --config TOML < STANCHION_* environment < flags. Exit codes: 0 stopped cleanly, 2 bad config."
)
@handle_errors
def serve(
    coordinator: Annotated[str | None, typer.Option(help="Coordinator address HOST:PORT.")] = None,
    node_id: Annotated[str | None, typer.Option(help="This node's id (must match its certificate).")] = None,
    workers: Annotated[int | None, typer.Option(help="Trainer ranks on this node (one per GPU).")] = None,
    run_root: Annotated[
        str | None, typer.Option(help="Run directories (and checkpoints) go under this directory.")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="Job specs name data relative to this directory.")
    ] = None,
    spare: Annotated[
        bool | None, typer.Option("--spare", help="Join jobs only to replace a lost node.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port (-1: off, 0: any free port).")
    ] = None,
    metrics_addr: Annotated[str | None, typer.Option(help="Address metrics and health bind.")] = None,
    health_port: Annotated[
        int | None, typer.Option(help="Plaintext grpc.health.v1 port for probes (0: off).")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address other nodes use to reach this node's rendezvous store.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file of agent settings.")] = None,
    tls_dir: Annotated[str | None, typer.Option(help="mTLS directory (stanchion certs init).")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="Plaintext gRPC: for local experiments only.")
    ] = None,
    token_file: Annotated[str | None, typer.Option(help="A file holding this agent's bearer token.")] = None,
    standby: Annotated[int | None, typer.Option(help="Pre-warmed standby ranks to keep ready.")] = None,
    hang_floor_s: Annotated[
        float | None, typer.Option(help="A rank with no step for at least this long may be hung.")
    ] = None,
    stop_grace_s: Annotated[
        float | None, typer.Option(help="SIGTERM, then SIGKILL after this many seconds.")
    ] = None,
    simulate_defect: Annotated[
        str | None,
        typer.Option(help="persistent or intermittent:P: corrupt this node's matmuls (bisection tests)."),
    ] = None,
    port_file: Annotated[
        str, typer.Option(help="Write the bound ports here as JSON (for scripts and tests).")
    ] = "",
) -> None:
    """Serve the agent until SIGTERM or SIGINT (its ranks get SIGTERM and time to checkpoint)."""
    from agent.config import AgentConfig
    from agent.daemon import serve as run
    from stanchion import settings

    cfg = settings.load(
        AgentConfig,
        toml_path=config,
        env=os.environ,
        overrides=given(
            coordinator=coordinator,
            node_id=node_id,
            workers=workers,
            run_root=run_root,
            data_root=data_root,
            spare=spare,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
            health_port=health_port,
            host=host,
            tls_dir=tls_dir,
            insecure=insecure,
            token_file=token_file,
            standby=standby,
            hang_floor_s=hang_floor_s,
            stop_grace_s=stop_grace_s,
            simulate_defect=simulate_defect,
        ),
    )
    setup_logging()
    asyncio.run(run(cfg, port_file=port_file))
