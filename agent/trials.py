"""Diagnostic trials on this node, for the coordinator's bisections.

A RunTrial directive starts one `python -m trainer.trial` process (an argv list, never a shell)
that joins its group through the group leader's TCPStore; its trace goes back to the coordinator
with the next heartbeat. Trials run beside any training on the node and never touch its ranks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.stanchion.v1 import agent_pb2
from stanchion.files import write_json_atomic
from stanchion.sdk import contract

log = logging.getLogger(__name__)

TRIAL_TIMEOUT_S = 300.0


@dataclass
class Running:
    trial_id: str
    proc: asyncio.subprocess.Process
    out: Path
    started: float


class TrialRunner:
    def __init__(self, agent: Any):
        self.agent = agent
        self.cfg = agent.cfg
        self.dir = Path(self.cfg.run_root).resolve() / "trials" / self.cfg.node_id
        self.running: dict[str, Running] = {}
        self.pending: list[agent_pb2.Trace] = []
        self.faults_path: Path | None = None
        faults = self.cfg.defect_faults()
        if faults:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.faults_path = self.dir / "defect.json"
            write_json_atomic(self.faults_path, faults)

    async def start(self, d: agent_pb2.Directive) -> None:
        t = d.trial
        if t.trial_id in self.running:
            return
        if not t.trial_id.replace("-", "").replace("_", "").isalnum() or len(t.trial_id) > 96:
            raise ValueError(f"trial id {t.trial_id!r} is not a plain identifier")
        if not (1 <= t.group_size <= 64 and 0 <= t.group_rank < t.group_size and 1 <= t.steps <= 10_000):
            raise ValueError("trial group or steps out of range")
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"{t.trial_id}.json"
        out.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "trainer.trial",
            "--out",
            str(out),
            "--steps",
            str(t.steps),
            "--seed",
            str(t.seed),
            "--group-rank",
            str(t.group_rank),
            "--group-size",
            str(t.group_size),
            "--master-addr",
            t.master_addr,
            "--master-port",
            str(t.master_port),
            "--key",
            t.trial_id,
        ]
        if self.faults_path is not None:
            args += ["--faults", str(self.faults_path)]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            contract.ENV_NODE_ID: self.cfg.node_id,
            contract.ENV_PARENT_PID: str(os.getpid()),
        }
        with (self.dir / f"{t.trial_id}.log").open("ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                *args,
                env=env,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        self.running[t.trial_id] = Running(t.trial_id, proc, out, time.time())
        log.info(
            "[node %s] trial %s started (group rank %d of %d)",
            self.cfg.node_id,
            t.trial_id,
            t.group_rank,
            t.group_size,
        )

    def poll(self) -> None:
        now = time.time()
        for tid, r in list(self.running.items()):
            if r.proc.returncode is None and now - r.started > TRIAL_TIMEOUT_S:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.kill()
            if r.proc.returncode is None:
                continue
            del self.running[tid]
            try:
                data = json.loads(r.out.read_text())
            except (OSError, ValueError):
                data = {"ok": False, "error": f"the trial exited with {r.proc.returncode} and wrote no trace"}
            self.pending.append(
                agent_pb2.Trace(
                    trial_id=tid,
                    node_id=self.cfg.node_id,
                    loss_bits=data.get("loss_bits", []),
                    fingerprints=data.get("fingerprints", []),
                    ok=bool(data.get("ok")),
                    error=str(data.get("error", ""))[:4000],
                )
            )
            self.agent.wake.set()

    def pending_traces(self) -> list[agent_pb2.Trace]:
        return list(self.pending)

    def traces_sent(self, traces: list[agent_pb2.Trace]) -> None:
        del self.pending[: len(traces)]

    async def shutdown(self) -> None:
        for r in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                r.proc.kill()
            await r.proc.wait()
