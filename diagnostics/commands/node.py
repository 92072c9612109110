"""`stanchion node`: list, cordon, uncordon and drain nodes."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message
from diagnostics.remote import REMOTE_EPILOG, Remote, call, connects

app = typer.Typer(help="List, cordon, uncordon and drain nodes.", no_args_is_help=True, rich_markup_mode=None)
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (shown by `node list` and `job explain`).")]


def node_dict(n: Any) -> dict[str, Any]:
    from protos.stanchion.v1 import types_pb2

    return {
        "node_id": n.node_id,
        "state": types_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower(),
        "health": types_pb2.HealthVerdict.Name(n.health).removeprefix("HEALTH_VERDICT_").lower(),
        "health_reason": n.health_reason,
        "job_id": n.job_id,
        "reason": n.reason,
        "host": n.inventory.host,
        "spare": n.inventory.spare,
        "workers": n.inventory.workers,
        "gpus": len(n.inventory.gpus),
        "heartbeat_age_s": round(max(0.0, time.time() - n.last_heartbeat_time), 3)
        if n.last_heartbeat_time
        else None,
    }


@app.command("list", epilog=REMOTE_EPILOG)
@handle_errors
@connects
def list_(json_: JsonOpt = False, *, r: Remote) -> None:
    """List registered nodes with state, health and the job each serves."""
    from protos.stanchion.v1 import operator_pb2

    resp = call(r, lambda s, kw: s.ListNodes(operator_pb2.ListNodesRequest(), **kw))
    rows = [node_dict(n) for n in resp.nodes]
    if json_:
        emit_json(rows)
    else:
        emit_table(
            ["node", "state", "health", "spare", "job", "heartbeat age", "reason"],
            [
                (
                    r["node_id"],
                    r["state"],
                    r["health"],
                    "yes" if r["spare"] else "",
                    r["job_id"],
                    r["heartbeat_age_s"],
                    r["reason"] or r["health_reason"],
                )
                for r in rows
            ],
        )


def _op(kind: str, node_id: str, reason: str, json_: bool, r: Any) -> None:
    from protos.stanchion.v1 import operator_pb2

    if kind == "cordon":
        resp = call(
            r,
            lambda s, kw: s.CordonNode(operator_pb2.CordonNodeRequest(node_id=node_id, reason=reason), **kw),
        )
    elif kind == "uncordon":
        resp = call(r, lambda s, kw: s.UncordonNode(operator_pb2.UncordonNodeRequest(node_id=node_id), **kw))
    else:
        resp = call(
            r, lambda s, kw: s.DrainNode(operator_pb2.DrainNodeRequest(node_id=node_id, reason=reason), **kw)
        )
    d = node_dict(resp.node)
    if json_:
        emit_json(d)
    else:
        message(f"{d['node_id']}: {d['state']}")


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def cordon(
    node_id: Annotated[str, typer.Argument(metavar="NODE_ID", help="Node id.")],
    reason: ReasonOpt = "",
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """No new work on this node; its current work continues."""
    _op("cordon", node_id, reason, json_, r)


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def uncordon(
    node_id: Annotated[str, typer.Argument(metavar="NODE_ID", help="Node id.")],
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Make a cordoned or drained node eligible again."""
    _op("uncordon", node_id, "", json_, r)


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def drain(
    node_id: Annotated[str, typer.Argument(metavar="NODE_ID", help="Node id.")],
    reason: ReasonOpt = "",
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Cordon the node and move its job off it now (a new generation without it)."""
    _op("drain", node_id, reason, json_, r)
