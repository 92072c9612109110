"""`stanchion certs`: a development PKI for mTLS between the CLI, the coordinator and the agents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diagnostics.errors import CliError, UsageError
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message

EXIT_EXISTS = 4  # files exist and --overwrite was not given

app = typer.Typer(
    help="Create certificates for mTLS (see docs/security.md).", no_args_is_help=True, rich_markup_mode=None
)


@app.callback()
def _group() -> None:
    # A callback keeps `certs` a group (`certs init`) even while it has a single command.
    pass


@app.command(
    epilog=f"Exit codes: 0 ok, 2 bad node id, host or flags, {EXIT_EXISTS} files exist (pass --overwrite to replace them)."
)
@handle_errors
def init(
    dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory to write the CA, keys and certificates to.")
    ],
    nodes: Annotated[
        int | None, typer.Option("--nodes", min=0, help="Issue agent certificates for node-0 .. node-<N-1>.")
    ] = None,
    node_id: Annotated[
        list[str] | None,
        typer.Option("--node-id", help="Issue an agent certificate for this node id (repeatable)."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A DNS name or IP address clients use to reach the coordinator "
            "(repeatable). Default: localhost and 127.0.0.1.",
        ),
    ] = None,
    validity_days: Annotated[int, typer.Option("--days", min=1, help="Validity of every certificate.")] = 365,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing files (a new CA).")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Create a development CA and certificates for the coordinator, the operator and reader roles,
    and each node's agent. Keep ca-key.pem off the cluster; give each machine only its own files."""
    from diagnostics.certs import DEFAULT_HOSTS, PkiExistsError, init_pki

    if nodes is not None and node_id:
        raise UsageError("give --nodes or --node-id, not both")
    node_ids = [f"node-{i}" for i in range(nodes)] if nodes is not None else list(node_id or [])
    try:
        result = init_pki(
            dir,
            node_ids=node_ids,
            hosts=host or DEFAULT_HOSTS,
            validity_days=validity_days,
            overwrite=overwrite,
        )
    except PkiExistsError as e:
        raise CliError(
            str(e), hint="pass --overwrite to replace them with a new CA", exit_code=EXIT_EXISTS
        ) from None
    except ValueError as e:
        raise UsageError(str(e)) from None

    if json_:
        emit_json(result)
        return
    identities = result["identities"]
    emit_table(["file", "identity"], [(Path(f).name, identities.get(f, "")) for f in result["files"]])
    message(
        f"wrote {len(result['files'])} files to {result['dir']}; certificates expire {result['not_after']}"
    )
    if result["stale"]:
        names = ", ".join(Path(f).name for f in result["stale"])
        message(f"warning: {names} in {result['dir']} were not signed by the new CA and no longer verify")
    if not node_ids:
        message("no agent certificates: pass --nodes N or --node-id ID to issue them")
    message("keep ca-key.pem off the cluster; each machine needs ca.pem and its own <role>.pem + key")
