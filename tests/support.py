"""Helpers shared by integration tests: a small prepared dataset, trainer runs as real processes,
and readers for the files ranks write."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stanchion import procs
from stanchion.files import read_jsonl
from stanchion.sdk import liveness
from stanchion.vocab import EventKind

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a step takes tens of milliseconds on one core, big enough to learn.
SMALL = [
    "--set",
    "model.n_layer=2",
    "--set",
    "model.d_model=64",
    "--set",
    "model.n_head=4",
    "--set",
    "model.n_kv_head=2",
    "--set",
    "model.max_seq_len=32",
    "--set",
    "data.seq_len=32",
    "--set",
    "data.micro_batch_size=2",
    "--set",
    "data.global_batch_size=12",
    "--set",
    "optim.warmup_steps=5",
]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("STANCHION_STANDBY", None)
    e.update(extra)
    return e


def prepare_data(out: Path, corpus: str = "fixture", vocab: int = 512) -> Path:
    if not (out / "meta.json").exists():
        from trainer.data import prepare

        prepare(corpus, vocab, out)
    return out


def trainer_cmd(
    data: Path, run_dir: Path, *, nproc: int = 1, steps: int = 20, extra: Iterable[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "--nproc",
        str(nproc),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--steps",
        str(steps),
        *SMALL,
        *extra,
    ]


def run_trainer(
    cmd: list[str], *, timeout: float = 240, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env(**env_extra), cwd=REPO
    )


def start_trainer(cmd: list[str], **env_extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(**env_extra),
        cwd=REPO,
        start_new_session=True,
    )


def kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGKILL the launcher and every rank it started (they share its session)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def rank_dir(run_dir: Path, rank: int) -> Path:
    return run_dir / "ranks" / f"rank-{rank:05d}"


def events(run_dir: Path, rank: int = 0, name: str | None = None) -> list[dict[str, Any]]:
    evs = read_jsonl(rank_dir(run_dir, rank) / "events.jsonl")
    return [e for e in evs if name is None or e["event"] == name]


def losses_by_step(run_dir: Path, rank: int = 0) -> dict[int, float]:
    """The last recorded loss of each step (a resumed run appends; the newest record wins)."""
    return {r["step"]: r["loss"] for r in read_jsonl(rank_dir(run_dir, rank) / "progress.jsonl")}


def final_fingerprint(run_dir: Path, rank: int = 0) -> str:
    done = events(run_dir, rank, EventKind.FINISHED)
    assert done, f"no finished event in {rank_dir(run_dir, rank)}"
    return done[-1]["fingerprint"]


def committed_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "manifest.json").exists())


# Trainer settings of the small model as a job spec's [trainer] table (the same model as SMALL).
SMALL_TRAINER: dict[str, Any] = {
    "preset": "tiny",
    "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 12},
    "optim": {"warmup_steps": 5},
    # Spikes are real in this toy model; chaos tests about other faults keep the detector quiet.
    "integrity": {"spike_loss_z": 1e9, "spike_grad_z": 1e9},
}


def job_spec(
    name: str,
    data: str,
    *,
    nodes: int = 2,
    steps: int = 40,
    checkpoint_every: int = 10,
    trainer: dict[str, Any] | None = None,
    faults: list[dict[str, Any]] | None = None,
    **job: Any,
) -> str:
    """A TOML job spec for the small model (data is a directory name under the cluster's data root)."""
    from coordinator.jobspec import JobSpec, to_toml
    from stanchion.settings import merge

    t = merge(
        SMALL_TRAINER,
        {"steps": steps, "checkpoint_every": checkpoint_every, "data": {"path": data}},
        trainer or {},
    )
    spec = JobSpec(
        name=name,
        nodes=nodes,
        min_nodes=job.pop("min_nodes", 1),
        faults=tuple(faults or ()),
        trainer=t,
        **job,
    )
    return to_toml(spec)


def small_flags(trainer: dict[str, Any] | None = None) -> list[str]:
    """The SMALL_TRAINER settings (plus overrides) as trainer --set flags, for golden runs."""
    from stanchion.settings import merge

    flat: list[str] = []

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                flat.extend(
                    [
                        "--set",
                        f"{key}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}",
                    ]
                )

    walk("", merge(SMALL_TRAINER, trainer or {}))
    return flat


def golden(tmp: Path, data: Path, world: int, steps: int = 40, trainer: dict | None = None) -> dict:
    """The fault-free run of the same config and world size, under plain `python -m trainer`."""
    run = tmp / f"golden-{world}-{steps}-{abs(hash(json.dumps(trainer, sort_keys=True))) % 10**6}"
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "--nproc",
        str(world),
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--steps",
        str(steps),
        "--checkpoint-every",
        "0",
        *small_flags(trainer),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(run / "ranks/rank-00000/events.jsonl")
    done = [e for e in recs if e["event"] == EventKind.FINISHED][-1]
    return {"fingerprint": done["fingerprint"], "val_loss": done["val_loss"]}


def reset_cluster(c: Any, n_nodes: int) -> None:
    """Every agent up and every node eligible again, before a LocalCluster's next scenario."""
    from protos.stanchion.v1 import operator_pb2, types_pb2

    ready, cordoned = types_pb2.NODE_STATE_READY, types_pb2.NODE_STATE_CORDONED
    restarted: dict[str, float] = {}
    for n in list(c.agents):
        if not c.agents[n].alive():
            restarted[n] = time.time()
            c.restart_agent(n)

    def settled() -> bool:
        # A node whose agent was just restarted still shows READY until its heartbeat times out:
        # wait until the new agent has been heard from, or the next job lands on a node whose ranks
        # the coordinator then counts as crashed when that agent registers.
        nodes = c.nodes()
        return (
            len(nodes) >= n_nodes
            and all(x.state in (ready, cordoned) for x in nodes)
            and all(x.last_heartbeat_time >= restarted.get(x.node_id, 0.0) for x in nodes)
        )

    c.wait(settled, 60, "nodes ready, each restarted agent heard from")
    for n in c.nodes():
        if n.state != ready:
            c.rpc("UncordonNode", operator_pb2.UncordonNodeRequest(node_id=n.node_id))


def frozen_pids(run_root: Path, node_id: str) -> list[int]:
    """Pids of the node's rank processes that are stopped (SIGSTOP: state T in /proc/PID/stat)."""
    out = []
    for heartbeat in sorted((run_root / "workers" / node_id).glob(f"w*/{liveness.HEARTBEAT_FILE}")):
        beat = liveness.read(heartbeat.parent)
        if beat is not None and procs.process_state(beat.pid) == "T":
            out.append(beat.pid)
    return out


@contextlib.contextmanager
def three_node_cluster(root: Path, data: Path, name: str) -> Iterator[Any]:
    """A coordinator, agents on node-0..2 and a spare on 127.0.0.1 (no TLS), with ``data`` copied
    in as ``name``; every process is stopped on exit."""
    import shutil

    from diagnostics.localcluster import LocalCluster

    c = LocalCluster(root, tls=False, hang_floor_s=3.0, stop_grace_s=10.0, heartbeat_timeout_s=8.0)
    shutil.copytree(data, c.data_root / name)
    try:
        c.start_coordinator()
        for n in ("node-0", "node-1", "node-2"):
            c.start_agent(n)
        c.start_agent("spare-0", spare=True)
        yield c
    finally:
        c.stop()
