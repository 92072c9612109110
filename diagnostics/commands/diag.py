"""`stanchion diag`: node-local diagnostics that run without a coordinator.

Commands: `gpu` (readings, health verdict and a compute self-test of every GPU on this node).
Each command's exit codes are in its help. Heavy imports (torch, NVML) happen inside functions so
that `stanchion --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diagnostics.errors import EXIT_FAILURE, EXIT_OK
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message
from diagnostics.remote import CoordinatorOpt, InsecureOpt, TlsDirOpt, TokenFileOpt

if TYPE_CHECKING:
    from agent.health import GpuSample, NodeHealth

app = typer.Typer(help="Node-local diagnostics.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Node-local diagnostics."""  # a callback keeps `diag` a group while it has one command


# ---------------------------------------------------------------------------------------------
# diag gpu

EXIT_NO_GPU = 3  # NVML unavailable (no driver) or no GPU found
EXIT_SELF_TEST_NOT_RUN = 5  # GPUs found, but the compute self-test could not run on some of them

SELF_TEST_SIZE = 1024  # (N, N) @ (N, N) in fp32
SELF_TEST_SEED = 0
# Max |GPU - reference| relative to max |reference|, against a float64 CPU reference. Measured on
# the CPU for N = 128..1024: fp32 GEMM 3e-7 to 4e-7; TF32 inputs (10 mantissa bits) 2.4e-4 to 3.5e-4.
# 1e-4 leaves a margin of 250 for a different fp32 summation order on the GPU, fails a GEMM that
# silently ran in TF32, and catches a flip in the exponent or the top ~9 mantissa bits of one output.
SELF_TEST_RTOL = 1e-4

GPU_EPILOG = (
    "Exit codes: 0 healthy or degraded (the verdict and reason are printed) and every self-test passed; "
    "1 unhealthy, a self-test failed, or a command error; "
    f"{EXIT_NO_GPU} no GPU found (no NVIDIA driver, or NVML sees no device; host readings are still printed); "
    f"{EXIT_SELF_TEST_NOT_RUN} GPUs found but the self-test could not run on some "
    "(torch without CUDA, or a GPU not visible to CUDA); pass --no-self-test to skip it on purpose."
)


@dataclass(frozen=True)
class SelfTest:
    status: str  # "pass", "fail", "error" (the GPU raised), "skipped" (could not run), "not_run" (on request)
    detail: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    cuda_index: int | None = None


def open_nvml() -> Any:
    """The NVML backend for `diag gpu`; raises NvmlUnavailable without a driver. Tests replace this."""
    from agent.health import NvmlBackend

    return NvmlBackend()


def matmul_self_test(
    device: str, a: Any, b: Any, reference: Any, *, rtol: float = SELF_TEST_RTOL
) -> SelfTest:
    """``a @ b`` in fp32 on ``device`` against ``reference`` (float64, on the CPU), TF32 off."""
    import torch

    matmul = torch.backends.cuda.matmul
    allow_tf32 = matmul.allow_tf32
    matmul.allow_tf32 = False  # TF32 keeps 10 mantissa bits: a healthy GPU would fail the tolerance
    try:
        out = (a.to(device) @ b.to(device)).cpu().double()  # .cpu() waits for the GPU
    finally:
        matmul.allow_tf32 = allow_tf32
    if not bool(torch.isfinite(out).all()):
        return SelfTest("fail", "result has NaN or Inf")
    max_abs = float((out - reference).abs().max())
    max_rel = max_abs / float(reference.abs().max())
    ok = max_rel <= rtol
    detail = f"max relative error {max_rel:.1e} {'<=' if ok else '>'} {rtol:.0e}"
    return SelfTest("pass" if ok else "fail", detail, max_abs, max_rel)


def self_test_inputs(n: int = SELF_TEST_SIZE, seed: int = SELF_TEST_SEED) -> tuple[Any, Any, Any]:
    """Seeded fp32 (n, n) operands from a CPU generator, and their float64 product on the CPU."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32)
    return a, b, a.double() @ b.double()


def run_self_tests(gpus: Sequence[GpuSample]) -> dict[int, SelfTest]:
    """One matmul self-test per NVML GPU, matched to its CUDA device by UUID (CUDA's numbering can
    differ from NVML's, e.g. under CUDA_VISIBLE_DEVICES). Keyed by NVML index."""
    import torch

    if not torch.cuda.is_available():
        why = (
            f"no CUDA device: torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device: torch.cuda.is_available() is False"
        )
        return {g.index: SelfTest("skipped", why) for g in gpus}
    cuda_by_uuid = {}
    for i in range(torch.cuda.device_count()):
        uuid = str(torch.cuda.get_device_properties(i).uuid)
        cuda_by_uuid[uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"] = i
    a, b, reference = self_test_inputs()
    results: dict[int, SelfTest] = {}
    for g in gpus:
        cuda_index = cuda_by_uuid.get(g.uuid)
        if g.lost:
            results[g.index] = SelfTest("skipped", "GPU is lost")
        elif cuda_index is None:
            results[g.index] = SelfTest("skipped", "not visible to CUDA (check CUDA_VISIBLE_DEVICES)")
        else:
            try:
                result = matmul_self_test(f"cuda:{cuda_index}", a, b, reference)
            except Exception as e:  # noqa: BLE001 - a CUDA error on one GPU is that GPU's result
                result = SelfTest("error", f"{type(e).__name__}: {e}")
            results[g.index] = SelfTest(**{**asdict(result), "cuda_index": cuda_index})
    return results


def gpu_exit_code(health: NodeHealth, nvml_present: bool, tests: dict[int, SelfTest]) -> int:
    if not nvml_present or (health.nvml_up and not health.gpus):
        return EXIT_NO_GPU
    if health.verdict == "unhealthy" or any(t.status in ("fail", "error") for t in tests.values()):
        return EXIT_FAILURE
    if any(t.status == "skipped" for t in tests.values()):
        return EXIT_SELF_TEST_NOT_RUN
    return EXIT_OK


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str | None:
    return None if value is None else f"{value / scale:.{digits}f}"


def _used_of_total(used: int | None, total: int | None) -> str | None:
    return None if used is None or total is None else f"{used / 2**30:.1f}/{total / 2**30:.1f}"


def _print_gpu_report(health: NodeHealth, tests: dict[int, SelfTest]) -> None:
    # Two narrow tables rather than one wide one: piped output is 80 columns wide.
    gpus = health.gpus
    if gpus:
        models = ", ".join(sorted({g.name for g in gpus if g.name})) or "unknown model"
        emit_table(
            ["gpu", "UUID", "self-test"],
            [[g.index, g.uuid, tests[g.index].status if g.index in tests else None] for g in gpus],
            title=f"{len(gpus)} GPUs: {models}, driver {gpus[0].driver_version or 'unknown'}",
        )
        emit_table(
            ["gpu", "temp °C", "power W", "util %", "mem GiB", "DBE vol", "remap", "throttle"],
            [
                [
                    g.index,
                    "LOST" if g.lost else _fmt(g.temperature_celsius),
                    _fmt(g.power_watts),
                    _fmt(g.utilization_ratio, 0.01),
                    _used_of_total(g.memory_used_bytes, g.memory_total_bytes),
                    g.ecc_double_volatile,
                    None
                    if g.remap_pending is None
                    else ("failed" if g.remap_failure else "pending" if g.remap_pending else "ok"),
                    None if g.throttle_reasons is None else (", ".join(sorted(g.throttle_reasons)) or "-"),
                ]
                for g in gpus
            ],
            title="GPU readings",
        )
        for g in gpus:
            if (t := tests.get(g.index)) is not None:
                typer.echo(f"self-test GPU {g.index}: {t.status}: {t.detail}")
    h = health.host
    host_rows = [
        ["cpu %", _fmt(h.cpu_utilization_ratio, 0.01)],
        ["load1", _fmt(h.load1, 1, 2)],
        ["memory GiB", _used_of_total(h.memory_used_bytes, h.memory_total_bytes)],
    ]
    host_rows += [
        [f"free GiB {path}", _fmt(free, 2**30, 1)] for path, free in sorted(h.disk_free_bytes.items())
    ]
    emit_table(["host", "value"], host_rows, title="Host")
    typer.echo(f"verdict: {health.verdict}: {health.reason}")


@app.command("gpu", epilog=GPU_EPILOG)
@handle_errors
def gpu(
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    paths: Annotated[
        list[Path] | None,
        typer.Option(
            "--path",
            metavar="DIR",
            help="A directory whose free space to check (run or checkpoint dir); repeatable.",
        ),
    ] = None,
    self_test: Annotated[
        bool, typer.Option("--self-test/--no-self-test", help="Run the fp32 matmul self-test on each GPU.")
    ] = True,
) -> None:
    """Read every GPU and the host, judge the node's health, and check each GPU computes correctly.

    The self-test multiplies two seeded 1024x1024 fp32 matrices on each GPU (TF32 off) and compares
    the product with a float64 CPU reference. Xid history is not shown: a one-shot command sees no
    past Xid events (the agent counts them; see also `dmesg | grep Xid`)."""
    from agent.health import HealthThresholds, NvmlUnavailable, assess

    why = "NVML unavailable"
    try:
        backend = open_nvml()
    except NvmlUnavailable as e:
        backend, why = None, f"NVML unavailable ({e})"
    try:
        # cpu_interval_s: a one-shot command has no previous reading to measure CPU use against
        health = assess(
            backend,
            [os.fspath(p) for p in paths or ()],
            None,
            HealthThresholds(),
            cpu_interval_s=0.1,
            unavailable_reason=why,
        )
    finally:
        if backend is not None and hasattr(backend, "close"):
            backend.close()

    tests: dict[int, SelfTest] = {}
    if health.gpus:
        if self_test:
            tests = run_self_tests(health.gpus)
        else:
            tests = {g.index: SelfTest("not_run", "--no-self-test") for g in health.gpus}
    code = gpu_exit_code(health, backend is not None, tests)
    if code == EXIT_NO_GPU:  # "healthy" would read as a working GPU node
        health = dataclasses.replace(
            health, verdict="no_gpu", reason=f"no GPU found: {health.nvml_error or 'NVML sees no device'}"
        )

    if json_:
        data = health.to_dict()
        data.pop("xid_errors")  # always empty here: see the docstring
        for g in data["gpus"]:
            t = tests.get(g["index"])
            g["self_test"] = None if t is None else asdict(t)
        data["exit_code"] = code
        emit_json(data)
    else:
        _print_gpu_report(health, tests)

    if code == EXIT_NO_GPU:
        message(f"{health.reason}; host readings only")
    elif code == EXIT_SELF_TEST_NOT_RUN:
        skipped = sorted({t.detail for t in tests.values() if t.status == "skipped"})
        message(f"self-test did not run: {'; '.join(skipped)} (hint: --no-self-test skips it on purpose)")
    elif code == EXIT_FAILURE:
        problems = [health.reason] if health.verdict == "unhealthy" else []
        problems += [
            f"GPU {i} self-test {t.status}: {t.detail}"
            for i, t in tests.items()
            if t.status in ("fail", "error")
        ]
        message(f"node is not fit to train: {'; '.join(problems)}")
    if code != EXIT_OK:
        raise typer.Exit(code=code)


BISECT_EPILOG = (
    "Exit codes: 0 done (faulty nodes, if any, are listed and cordoned), 1 failed, 2 invalid request, "
    "3 not found, 4 coordinator unreachable, 5 not authorized."
)


@app.command("bisect", epilog=BISECT_EPILOG)
@handle_errors
def bisect(
    nodes: Annotated[
        str, typer.Option("--nodes", help="Comma-separated node ids (default: every eligible node).")
    ] = "",
    trial_steps: Annotated[int, typer.Option(help="Steps of the deterministic trial.")] = 8,
    group_size: Annotated[
        int, typer.Option(help="Nodes per trial group (multi-node groups test links and NICs).")
    ] = 1,
    p_show: Annotated[
        float, typer.Option(help="Lower bound on how often an intermittent fault shows per trial.")
    ] = 1.0,
    delta: Annotated[float, typer.Option(help="Acceptable probability of a wrong verdict.")] = 1e-3,
    job_id: Annotated[
        str, typer.Option("--job", help="Attach the bisection to a job (shown by `job explain`).")
    ] = "",
    local_nodes: Annotated[int, typer.Option(help="Run everything on 127.0.0.1 with this many agents.")] = 0,
    defect: Annotated[
        str,
        typer.Option(
            help="With --local-nodes: INDEX or INDEX:P, the agent whose matmuls are wrong (P: intermittent)."
        ),
    ] = "",
    json_out: Annotated[
        str,
        typer.Option(
            "--json", help="Print JSON; with --local-nodes, the file to write it to ('-' for stdout)."
        ),
    ] = "",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
    coordinator: CoordinatorOpt = "",
    tls_dir: TlsDirOpt = "",
    insecure: InsecureOpt = False,
    token_file: TokenFileOpt = "",
) -> None:
    """Find the node that computes wrong numbers: deterministic trials on node groups, compared.

    With --local-nodes N it starts a coordinator and N agents on 127.0.0.1 (one defective with --defect)
    and runs the whole path; otherwise it asks the coordinator at --coordinator.
    """
    import time

    from diagnostics.remote import call, remote
    from protos.stanchion.v1 import operator_pb2

    node_list = [n for n in nodes.split(",") if n]
    req = operator_pb2.StartBisectionRequest(
        job_id=job_id,
        nodes=node_list,
        trial_steps=trial_steps,
        group_size=group_size,
        p_show=p_show,
        delta=delta,
    )
    t0 = time.time()
    if local_nodes:
        result = _local_bisect(local_nodes, defect, req, timeout)
    else:
        r = remote(coordinator, tls_dir, insecure, token_file)
        b = call(r, lambda s, kw: s.StartBisection(req, **kw)).bisection
        message(f"bisection {b.bisection_id} started on {', '.join(b.suspects)}")
        get = operator_pb2.GetBisectionRequest(bisection_id=b.bisection_id)
        while b.state == "running" and time.time() - t0 < timeout:
            time.sleep(0.5)
            b = call(r, lambda s, kw: s.GetBisection(get, **kw)).bisection
        result = _bisection_dict(b)
    result["wall_s"] = round(time.time() - t0, 2)
    if json_out and json_out != "-" and local_nodes:
        from diagnostics.bench.common import source_state
        from stanchion.files import write_json_atomic

        # A benchmark's record (docs/bench/bisect.json): the code it ran, so a report can tell
        # when that code changed since.
        result.update(source=source_state(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json_atomic(json_out, result)
    if json_out:
        emit_json(result)
    else:
        message(f"{result['state']}: {result['reason']}")
        emit_table(
            ["faulty", "rounds", "confidence", "reference"],
            [
                (
                    ",".join(result["faulty"]) or "none",
                    result["rounds"],
                    f"{result['confidence']:.6f}",
                    result["reference"],
                )
            ],
        )
    if result["state"] != "done":
        raise typer.Exit(code=EXIT_FAILURE)


def _bisection_dict(b: Any) -> dict[str, Any]:
    import json

    return {
        "bisection_id": b.bisection_id,
        "state": b.state,
        "suspects": list(b.suspects),
        "faulty": list(b.faulty),
        "rounds": b.rounds,
        "confidence": b.confidence,
        "reference": b.reference,
        "reason": b.reason,
        "history": json.loads(b.rounds_json or "[]"),
    }


def _local_bisect(n: int, defect: str, req: Any, timeout: float) -> dict[str, Any]:
    import tempfile
    import time

    from diagnostics.errors import UsageError
    from diagnostics.localcluster import LocalCluster
    from protos.stanchion.v1 import operator_pb2, types_pb2

    index_text, _, p = defect.partition(":")
    if defect and (not index_text.isdigit() or not 0 <= int(index_text) < n):
        raise UsageError(f"--defect {defect!r}: expected INDEX or INDEX:P with 0 <= INDEX < {n}")
    bad = int(index_text) if defect else -1
    simulate = ("intermittent:" + p) if p else "persistent"
    with tempfile.TemporaryDirectory(prefix="stanchion-bisect-") as tmp:
        cluster = LocalCluster(tmp, tls=True)
        ids = [f"node-{i}" for i in range(n)]
        try:
            cluster.init_tls(ids)
            cluster.start_coordinator()
            message(f"coordinator on {cluster.address}; starting {n} agents")
            for i, node_id in enumerate(ids):
                extra = ["--standby", "0"] + (["--simulate-defect", simulate] if i == bad else [])
                cluster.start_agent(node_id, extra=extra)
            b = cluster.rpc("StartBisection", req).bisection
            deadline = time.time() + timeout
            while b.state == "running" and time.time() < deadline:
                time.sleep(0.5)
                b = cluster.rpc(
                    "GetBisection", operator_pb2.GetBisectionRequest(bisection_id=b.bisection_id)
                ).bisection
            result = _bisection_dict(b)
            result["defective"] = [ids[bad]] if bad >= 0 else []
            result["cordoned"] = sorted(
                x.node_id for x in cluster.nodes() if x.state == types_pb2.NODE_STATE_CORDONED
            )
            return result
        finally:
            cluster.stop()
