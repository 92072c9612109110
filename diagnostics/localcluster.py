"""A whole Stanchion cluster on 127.0.0.1: one coordinator and N agents as real processes.

Used by `stanchion up`, by the benchmarks and by the integration and chaos tests, so all of them run
the same daemons the same way. Every process it starts is tracked by pid and stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stanchion.files import read_jsonl
from stanchion.procs import ProcId
from stanchion.sdk import contract, liveness
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until

T = TypeVar("T")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalCluster:
    root: Path
    tls: bool = True
    hang_floor_s: float = 5.0
    frozen_after_s: float | None = None  # the agents' --frozen-after-s (None: their default)
    stop_grace_s: float = 20.0
    heartbeat_timeout_s: float = 3.0
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    coordinator: Proc | None = None
    port: int = 0
    metrics_port: int = 0
    agents: dict[str, Proc] = field(default_factory=dict)
    agent_args: dict[str, list[str]] = field(default_factory=dict)
    agent_launch: dict[str, tuple[dict[str, str] | None, list[str] | None]] = field(default_factory=dict)
    host: str = "127.0.0.1"  # the coordinator's listen address
    node_ids: list[str] = field(default_factory=list)
    # Programs the agents allow jobs to run besides the built-in trainer: NAME -> a .py script or a
    # dotted module (each becomes `agent serve --entrypoint NAME=TARGET`).
    entrypoints: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        for d in ("logs", "runs", "data"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def run_root(self) -> Path:
        return self.root / "runs"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def init_tls(self, node_ids: list[str]) -> None:
        """A fresh development PKI for this cluster (TLS is the default, even on one machine)."""
        from diagnostics.certs import init_pki

        init_pki(self.tls_dir, node_ids=node_ids, overwrite=True)

    # -- processes ------------------------------------------------------------------------------
    def _spawn(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None, wrap: list[str] | None = None
    ) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **self.env, **(env or {})}
        with log.open("ab") as f:
            p = subprocess.Popen(
                [*(wrap or []), self.python, "-m", "diagnostics.cli", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return Proc(name, p, log, args)

    def _security(self, role_args: list[str] | None = None) -> list[str]:
        return ["--tls-dir", str(self.tls_dir)] if self.tls else ["--insecure"]

    def _entrypoint_args(self) -> list[str]:
        out = []
        for name, target in (self.entrypoints or {}).items():
            if target.endswith(".py"):  # the agent resolves it against its own working directory: pin it
                target = str(Path(target).absolute())
            out += ["--entrypoint", f"{name}={target}"]
        return out

    def start_coordinator(self, *, wait_s: float = 60.0) -> None:
        port_file = self.root / "coordinator.json"
        port_file.unlink(missing_ok=True)
        listen = f"{self.host}:{self.port}"  # a restart reuses the port the agents know
        args = [
            "coordinator",
            "serve",
            "--listen",
            listen,
            "--state-db",
            str(self.root / "coordinator.db"),
            "--metrics-port",
            str(self.metrics_port),
            "--port-file",
            str(port_file),
            "--heartbeat-timeout-s",
            str(self.heartbeat_timeout_s),
            *self._security(),
        ]
        self.coordinator = self._spawn("coordinator", args)
        info = self._wait_file(port_file, self.coordinator, wait_s)
        self.port, self.metrics_port = info["port"], info["metrics_port"]

    def start_agent(
        self,
        node_id: str,
        *,
        spare: bool = False,
        workers: int = 1,
        extra: list[str] | None = None,
        wait_s: float = 60.0,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> Proc:
        """Start (or restart, with the same arguments) an agent. ``wrap`` prefixes the command (for
        example ``ip netns exec NS`` to run it in a network namespace); ``env`` adds variables."""
        port_file = self.root / f"agent-{node_id}.json"
        port_file.unlink(missing_ok=True)
        args = self.agent_args.get(node_id) or [
            "agent",
            "serve",
            "--coordinator",
            self.address,
            "--node-id",
            node_id,
            "--workers",
            str(workers),
            "--run-root",
            str(self.run_root),
            "--data-root",
            str(self.data_root),
            "--metrics-port",
            "0",
            "--hang-floor-s",
            str(self.hang_floor_s),
            *(["--frozen-after-s", str(self.frozen_after_s)] if self.frozen_after_s is not None else []),
            "--stop-grace-s",
            str(self.stop_grace_s),
            "--port-file",
            str(port_file),
            *self._security(),
            *self._entrypoint_args(),
            *(["--spare"] if spare else []),
            *(extra or []),
        ]
        self.agent_args[node_id] = args
        self.agent_launch.setdefault(node_id, (env, wrap))
        env, wrap = self.agent_launch[node_id]
        proc = self._spawn(f"agent-{node_id}", args, env=env, wrap=wrap)
        self.agents[node_id] = proc
        if node_id not in self.node_ids:
            self.node_ids.append(node_id)
        self._wait_file(port_file, proc, wait_s)
        return proc

    def restart_agent(self, node_id: str) -> Proc:
        return self.start_agent(node_id)

    def _wait_file(self, path: Path, proc: Proc, wait_s: float) -> dict[str, Any]:
        """The port file ``proc`` writes once it serves; RuntimeError at once if it exits first."""

        def started() -> dict[str, Any] | None:
            if path.exists():
                with contextlib.suppress(ValueError, OSError):
                    return json.loads(path.read_text())
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {self.tail(proc)}")
            return None

        try:
            return wait_until(started, wait_s, f"{proc.name} to start (its port file {path.name})")
        except TimeoutError as e:
            raise TimeoutError(f"{e}: {self.tail(proc)}") from None

    def tail(self, proc: Proc, lines: int = 20) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def send_signal(self, proc: Proc, sig: int) -> None:
        self.signal_pid(proc.pid, sig)

    @staticmethod
    def signal_pid(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.send_signal(self.coordinator, signal.SIGKILL)
        self.coordinator.popen.wait()

    def kill_agent(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents[node_id]
        self.send_signal(proc, sig)
        if sig == signal.SIGKILL:
            proc.popen.wait()

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the agents (their ranks checkpoint) and the coordinator; SIGKILL what is left."""
        timeout_s = self.stop_grace_s + 10 if timeout_s is None else timeout_s
        procs = [p for p in self.agents.values() if p.alive()]
        for p in procs:
            self.send_signal(p, signal.SIGCONT)
            self.send_signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            if p.alive():
                self.send_signal(p, signal.SIGKILL)
                p.popen.wait()
        if self.coordinator is not None and self.coordinator.alive():
            self.send_signal(self.coordinator, signal.SIGCONT)
            self.send_signal(self.coordinator, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.coordinator.popen.wait(10)
            if self.coordinator.alive():
                self.send_signal(self.coordinator, signal.SIGKILL)
                self.coordinator.popen.wait()
        self._kill_stray_ranks()

    def _kill_stray_ranks(self, node_id: str = "*") -> None:
        """Ranks outlive a killed agent for its orphan grace: SIGKILL any still running (of
        ``node_id``, or of every node), each known by the pid and start time its agent recorded."""
        for info in self.run_root.glob(f"workers/{node_id}/w*/{contract.WORKER_FILE}"):
            ident = ProcId.read(info)
            if ident is not None and ident.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ident.pid, signal.SIGKILL)

    def kill_node(self, node_id: str) -> None:
        """The node dies: SIGKILL its agent and every rank and standby of it."""
        self.kill_agent(node_id)
        self._kill_stray_ranks(node_id)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the operator API -----------------------------------------------------------------------
    def channel(self) -> Any:
        from protos import client

        return client.channel(self.address, tls_dir=str(self.tls_dir), role="operator", insecure=not self.tls)

    def rpc(self, method: str, request: Any, timeout: float = 10.0) -> Any:
        from protos.stanchion.v1 import operator_pb2_grpc

        with self.channel() as ch:
            return getattr(operator_pb2_grpc.OperatorServiceStub(ch), method)(request, timeout=timeout)

    def job_events(self, job_id: str) -> list[Any]:
        """The events the coordinator stored for ``job_id`` (its own and the agents')."""
        from protos.stanchion.v1 import operator_pb2, operator_pb2_grpc

        with self.channel() as ch:
            stream = operator_pb2_grpc.OperatorServiceStub(ch).StreamEvents(
                operator_pb2.StreamEventsRequest(job_id=job_id, follow=False), timeout=10.0
            )
            return [r.event for r in stream]

    def submit(self, spec_toml: str) -> str:
        from protos.stanchion.v1 import operator_pb2

        return self.rpc(
            "SubmitJob", operator_pb2.SubmitJobRequest(spec_toml=spec_toml, request_id=f"r{time.time_ns()}")
        ).job.job_id

    def job(self, job_id: str = "") -> Any:
        from protos.stanchion.v1 import operator_pb2

        return self.rpc("GetJob", operator_pb2.GetJobRequest(job_id=job_id)).job

    def explain(self, job_id: str = "") -> Any:
        from protos.stanchion.v1 import operator_pb2

        return self.rpc("ExplainJob", operator_pb2.ExplainJobRequest(job_id=job_id))

    def nodes(self) -> Any:
        from protos.stanchion.v1 import operator_pb2

        return self.rpc("ListNodes", operator_pb2.ListNodesRequest()).nodes

    def wait(self, predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
        """Poll ``predicate``; RPC errors (the coordinator restarting) count as not yet."""
        import grpc

        return wait_until(predicate, timeout_s, what, interval_s=interval_s, transient=(grpc.RpcError,))

    def wait_job(self, states: set[str], timeout_s: float, job_id: str = "") -> Any:
        from protos.stanchion.v1 import types_pb2

        def done() -> Any:
            j = self.job(job_id)
            name = types_pb2.JobState.Name(j.state).removeprefix("JOB_STATE_").lower()
            return j if name in states else None

        return self.wait(done, timeout_s, f"job state in {sorted(states)}")

    # -- looking inside -------------------------------------------------------------------------
    def ranks(self, node_id: str) -> list[dict[str, Any]]:
        """The live assigned ranks of a node: pid, rank, generation, job (from the files they write)."""
        out = []
        for w in sorted((self.run_root / "workers" / node_id).glob("w*")):
            beat = liveness.read(w)
            if beat is None:
                continue
            pid = beat.pid
            if not Path(f"/proc/{pid}").exists():
                continue
            started = [e for e in read_jsonl(w / "events.jsonl") if e.get("event") == EventKind.STARTED]
            if started:
                out.append(
                    {
                        "pid": pid,
                        "rank": started[-1]["rank"],
                        "generation": started[-1]["generation"],
                        "job_id": started[-1].get("job_id", ""),
                        "dir": w,
                    }
                )
        return out

    def wait_warm(self, timeout_s: float = 120.0) -> None:
        """Until every agent has a standby rank that finished importing (a quiet first generation)."""

        def warm() -> bool:
            return all(
                any(
                    e.get("event") == EventKind.STANDBY
                    for p in (self.run_root / "workers" / n).glob("w*/events.jsonl")
                    for e in read_jsonl(p)
                )
                for n in self.agents
            )

        self.wait(warm, timeout_s, "standby ranks to warm up")

    def progress(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every progress record written on a node (or all nodes), oldest first."""
        pattern = f"workers/{node_id or '*'}/w*/progress.jsonl"
        recs = [r for p in self.run_root.glob(pattern) for r in read_jsonl(p)]
        return sorted(recs, key=lambda r: r.get("t", 0))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        recs = [r for p in self.run_root.glob("workers/*/w*/events.jsonl") for r in read_jsonl(p)]
        recs = [r for r in recs if kind is None or r.get("event") == kind]
        return sorted(recs, key=lambda r: r.get("t", 0))
