"""`stanchion job`: submit, watch, cancel and explain jobs on a coordinator."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.errors import EXIT_NOT_FOUND, CliError
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message
from diagnostics.remote import REMOTE_EPILOG, Remote, call, connects

app = typer.Typer(help="Submit, watch, cancel and explain jobs.", no_args_is_help=True, rich_markup_mode=None)
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


def job_dict(job: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    from protos.stanchion.v1 import types_pb2

    d = MessageToDict(job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["state"] = types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    d.pop("spec_toml", None)
    return d


def _row(d: dict[str, Any]) -> list[Any]:
    return [
        d["job_id"],
        d["state"],
        d["generation"],
        f"{d['step']}/{d['steps_total']}",
        d["restarts"],
        ",".join(d["nodes"]),
        d["reason"][:80],
    ]


HEADERS = ["job", "state", "gen", "step", "restarts", "nodes", "last decision"]


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def submit(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="A TOML job spec (see docs/jobs.md).")],
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Submit a job; prints its id. Retrying the same submission never creates a second job."""
    from protos.stanchion.v1 import operator_pb2

    try:
        text = spec.read_text()
    except OSError as e:
        raise CliError(f"cannot read {spec}: {e}", exit_code=EXIT_NOT_FOUND) from None
    req = operator_pb2.SubmitJobRequest(spec_toml=text, request_id=uuid.uuid4().hex)
    resp = call(r, lambda s, kw: s.SubmitJob(req, **kw))
    d = job_dict(resp.job)
    if json_:
        emit_json(d)
    else:
        print(d["job_id"])
        message(f"submitted {d['job_id']}: {d['state']} ({d['reason']})")


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="Job id (default: the newest job).")] = "",
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Show one job: state, generation, step, restarts, members and the latest decision."""
    from protos.stanchion.v1 import operator_pb2

    resp = call(r, lambda s, kw: s.GetJob(operator_pb2.GetJobRequest(job_id=job_id), **kw))
    d = job_dict(resp.job)
    if json_:
        emit_json(d)
    else:
        emit_table(HEADERS, [_row(d)])


@app.command("list", epilog=REMOTE_EPILOG)
@handle_errors
@connects
def list_(json_: JsonOpt = False, *, r: Remote) -> None:
    """List every job the coordinator knows."""
    from protos.stanchion.v1 import operator_pb2

    resp = call(r, lambda s, kw: s.ListJobs(operator_pb2.ListJobsRequest(), **kw))
    rows = [job_dict(j) for j in resp.jobs]
    if json_:
        emit_json(rows)
    else:
        emit_table(HEADERS, [_row(d) for d in rows])


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="Job id.")],
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Cancel a job: its ranks checkpoint and stop."""
    from protos.stanchion.v1 import operator_pb2

    resp = call(r, lambda s, kw: s.CancelJob(operator_pb2.CancelJobRequest(job_id=job_id), **kw))
    d = job_dict(resp.job)
    if json_:
        emit_json(d)
    else:
        message(f"{d['job_id']}: {d['state']}")


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def explain(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="Job id (default: the newest job).")] = "",
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """Print every decision the coordinator made for a job, with its reason, and each bisection round."""
    from google.protobuf.json_format import MessageToDict

    from protos.stanchion.v1 import operator_pb2, types_pb2

    resp = call(r, lambda s, kw: s.ExplainJob(operator_pb2.ExplainJobRequest(job_id=job_id), **kw))
    decisions = []
    for d in resp.decisions:
        decisions.append(
            {
                "seq": d.seq,
                "time": d.time,
                "event": d.event,
                "generation": d.generation,
                "from": types_pb2.JobState.Name(d.from_state).removeprefix("JOB_STATE_").lower(),
                "to": types_pb2.JobState.Name(d.to_state).removeprefix("JOB_STATE_").lower(),
                "reason": d.reason,
                "actions": list(d.actions),
            }
        )
    bisections = [MessageToDict(b, preserving_proto_field_name=True) for b in resp.bisections]
    for b in bisections:
        b["rounds_detail"] = json.loads(b.pop("rounds_json", "[]") or "[]")
    if json_:
        emit_json({"job": job_dict(resp.job), "decisions": decisions, "bisections": bisections})
        return
    t0 = decisions[0]["time"] if decisions else 0.0
    print(f"job {resp.job.job_id}: {job_dict(resp.job)['state']}")
    for d in decisions:
        arrow = d["from"] if d["from"] == d["to"] else f"{d['from']} -> {d['to']}"
        print(f"  +{d['time'] - t0:8.2f}s  gen {d['generation']:<3} [{arrow}] ({d['event']}) {d['reason']}")
    for b in bisections:
        print(
            f"  bisection {b['bisection_id']}: {b.get('state')} faulty={b.get('faulty', [])} "
            f"rounds={b.get('rounds', 0)} confidence={b.get('confidence', 0):.4f} reference={b.get('reference', '')}"
        )
        for rnd in b["rounds_detail"]:
            print(f"    round {rnd.get('round')}: {rnd.get('summary', '')}")


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def checkpoints(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="Job id (default: the newest job).")] = "",
    json_: JsonOpt = False,
    *,
    r: Remote,
) -> None:
    """List a job's checkpoints as the coordinator judges them (good, or bad and why)."""
    from protos.stanchion.v1 import operator_pb2

    resp = call(r, lambda s, kw: s.ListCheckpoints(operator_pb2.ListCheckpointsRequest(job_id=job_id), **kw))
    rows = [
        {"step": c.step, "path": c.path, "good": c.good, "reason": c.reason, "fingerprint": c.fingerprint}
        for c in resp.checkpoints
    ]
    if json_:
        emit_json(rows)
    else:
        emit_table(
            ["step", "good", "fingerprint", "reason"],
            [(r["step"], "yes" if r["good"] else "NO", r["fingerprint"], r["reason"]) for r in rows],
        )


@app.command(epilog=REMOTE_EPILOG)
@handle_errors
@connects
def events(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="Job id (default: every job).")] = "",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new events.")] = False,
    *,
    r: Remote,
) -> None:
    """Print stored events as JSON lines (with --follow, keep streaming)."""

    from protos.stanchion.v1 import operator_pb2

    async def stream(service: Any, kw: dict[str, Any]) -> None:
        req = operator_pb2.StreamEventsRequest(job_id=job_id, follow=follow)
        async for r in service.StreamEvents(
            req, metadata=kw["metadata"], timeout=None if follow else kw["timeout"]
        ):
            e = r.event
            print(
                json.dumps(
                    {
                        "seq": r.seq,
                        "kind": e.kind,
                        "job_id": e.job_id,
                        "node_id": e.node_id,
                        "generation": e.generation,
                        "step": e.step,
                        "rank": e.rank,
                        "time": e.time,
                        "detail": json.loads(e.detail_json or "{}"),
                    }
                ),
                flush=True,
            )

    call(r, stream)
