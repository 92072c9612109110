"""The torchft side of `stanchion bench recovery` and `stanchion bench goodput`.

torchft (PyTorch's fault-tolerance library) keeps a data-parallel job going with the replicas that
are alive: a lighthouse (``torchft_lighthouse``, its Rust quorum server) forms a quorum every step,
each replica group's ``Manager`` all-reduces gradients over a reconfigurable gloo group and applies
a step only when every all-reduce of the quorum succeeded, and a replica that comes back heals from
a live one over HTTP. It restarts nothing itself: a supervisor restarts a dead replica group (in
production torchelastic or a cluster scheduler; here :class:`TorchftJob`, at once, as torchrun's
``--max-restarts`` restarts its workers).

Each replica group is one process of diagnostics/bench/torchft_worker.py, which trains the same
model, data and batches as the trainer on the other sides (its docstring says how). Settings a user
tuning for fast recovery would choose (the defaults, a 5 s heartbeat timeout and a 60 s join
timeout, make every recovery take 5 s or more): the lighthouse declares a replica gone after
1 s without heartbeats (10 missed, at the managers' 100 ms interval), waits at most 1 s for
joiners, and ticks every 50 ms; ``--min_replicas 1``, so that a survivor trains on alone.

What is measured (:func:`torchft_recovery`): recovery is the fault to the first committed step that
*started* after it, on any replica (the survivor going on alone, or the healed pair); a step that was
in flight at the fault and committed anyway is not a recovery. ``full_world_s`` is the fault to the
first committed step with every replica in the quorum again (the restarted replica healed and
back). While a replica is missing the survivors average only their own gradients (torchft's
default), so the global batch shrinks: the final state differs from the fault-free run's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.bench.common import REPO, BenchError, bench_env, shown
from diagnostics.bench.recovery import Recovery, Tail
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until

LIGHTHOUSE_FLAGS = {"heartbeat_timeout_ms": 1000, "join_timeout_ms": 1000, "quorum_tick_ms": 50}
# Manager timeouts (collectives, quorum, connections), seconds: above any step here, well below the
# defaults' 60 s, which only matter when a peer hangs rather than dies.
WORKER_TIMEOUTS = {"timeout-s": 10, "quorum-timeout-s": 30, "connect-timeout-s": 10}
# torchft's Rust side logs every quorum and commit at INFO; gloo on the loopback interface.
TORCHFT_ENV = {"RUST_LOG": "warn", "GLOO_SOCKET_IFNAME": "lo"}


def available() -> str | None:
    """None when torchft and its lighthouse are installed here, else what is missing."""
    try:
        import torchft  # noqa: F401
    except ImportError as e:
        return f"torchft is not installed ({e}): `pip install -e '.[bench]'` installs torchft-nightly"
    if not lighthouse_binary().exists():
        return f"torchft's lighthouse is missing at {lighthouse_binary()}"
    return None


def lighthouse_binary() -> Path:
    return Path(sys.executable).parent / "torchft_lighthouse"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lighthouse_command(port: int) -> list[str]:
    flags = [f"--{k}={v}" for k, v in LIGHTHOUSE_FLAGS.items()]
    return [str(lighthouse_binary()), "--min_replicas=1", f"--bind=127.0.0.1:{port}", *flags]


def worker_command(
    replica: int,
    run_dir: Path,
    *,
    data: Path,
    steps: int,
    lighthouse: str,
    sets: Mapping[str, Any],
    replicas: int = 2,
    faults: Path | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "diagnostics.bench.torchft_worker",
        "--replica-id",
        str(replica),
        "--replicas",
        str(replicas),
        "--run-dir",
        str(run_dir),
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--lighthouse",
        lighthouse,
        *(f"--{k}={v}" for k, v in WORKER_TIMEOUTS.items()),
    ]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    if faults is not None:
        cmd += ["--faults", str(faults)]
    return cmd


@dataclass
class TorchftJob:
    """A lighthouse and one process per replica group, supervised: a replica that exits non-zero
    (killed, or crashed by its fault schedule) is started again at once, up to ``max_restarts``."""

    run_dir: Path
    data: Path
    steps: int
    sets: Mapping[str, Any]
    replicas: int = 2
    faults: Path | None = None
    max_restarts: int = 3
    lighthouse: subprocess.Popen[bytes] | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    restarts: int = 0
    kills: list[dict[str, Any]] = field(default_factory=list)
    progress: Tail | None = None
    events: Tail | None = None
    address: str = ""

    def start(self) -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        (self.run_dir / "logs").mkdir(parents=True)
        port = _free_port()
        self.address = f"http://127.0.0.1:{port}"
        with (self.run_dir / "logs" / "lighthouse.log").open("w") as f:
            self.lighthouse = subprocess.Popen(
                lighthouse_command(port), stdout=f, stderr=subprocess.STDOUT, env=self._env()
            )
        self.progress = Tail(self.run_dir, "ranks/rank-*/progress.jsonl")
        self.events = Tail(self.run_dir, "ranks/rank-*/events.jsonl")
        for r in range(self.replicas):
            self._launch(r)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in bench_env(1).items() if not k.startswith("TORCHFT_")}
        return {**env, **TORCHFT_ENV}

    def command(self, replica: int, run_dir: Path | None = None) -> list[str]:
        return worker_command(
            replica,
            run_dir or self.run_dir,
            data=self.data,
            steps=self.steps,
            lighthouse=self.address or "http://127.0.0.1:PORT",
            sets=self.sets,
            replicas=self.replicas,
            faults=self.faults,
        )

    def _launch(self, replica: int) -> None:
        n = sum(1 for _ in (self.run_dir / "logs").glob(f"replica-{replica}.*.log"))
        with (self.run_dir / "logs" / f"replica-{replica}.{n}.log").open("w") as f:
            self.procs[replica] = subprocess.Popen(
                self.command(replica), stdout=f, stderr=subprocess.STDOUT, env=self._env(), cwd=REPO
            )

    def supervise(self) -> None:
        """Restart every replica that exited non-zero since the last call; note those that ended."""
        for r, p in self.procs.items():
            code = p.poll()
            if code is None or r in self.done:
                continue
            if code == 0:
                self.done.add(r)
            elif self.restarts < self.max_restarts:
                self.restarts += 1
                self._launch(r)
            else:
                raise BenchError(
                    f"torchft replica {r} exited with code {code}, restarts used up ({self.max_restarts})",
                    hint=f"see {self.run_dir / 'logs'}",
                )

    def poll(self) -> None:
        assert self.progress is not None and self.events is not None
        self.supervise()
        self.progress.poll()
        self.events.poll()

    def newest_step(self) -> int:
        self.poll()
        assert self.progress is not None
        return max((int(r["step"]) for r in self.progress.records if r.get("committed")), default=0)

    def kill_replica(self, replica: int) -> tuple[int, float]:
        """SIGKILL the replica's process; the supervisor starts it again at once."""
        p = self.procs[replica]
        t = time.time()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        self.kills.append({"pid": p.pid, "t": t, "rank": replica})
        self.restarts += 1
        self._launch(replica)
        return p.pid, t

    def wait(self, timeout_s: float) -> None:
        """Until every replica exited 0 (the job trained every step)."""
        try:
            wait_until(
                lambda: self.poll() or len(self.done) == self.replicas,
                timeout_s,
                "every torchft replica to finish",
                interval_s=0.01,
            )
        finally:
            self.stop()
        self.poll()

    def stop(self) -> None:
        """SIGKILL what this job started and still runs, by pid."""
        for p in [*self.procs.values(), self.lighthouse]:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()

    def records(self) -> list[dict[str, Any]]:
        assert self.progress is not None
        return [r for r in self.progress.records if r.get("committed")]


def torchft_recovery(
    progress: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    injected_t: float,
    *,
    replicas: int = 2,
) -> tuple[Recovery, float | None]:
    """Recovery from a fault at ``injected_t`` (see the module docstring), and ``full_world_s``.

    ``progress`` are the committed records. The step the job resumed from is the step before the
    first one that started after the fault; ``steps_before`` is the newest committed step at the
    fault. The restarted process's ``started`` event times its return (``restarted_t``)."""
    before = max((int(r["step"]) for r in progress if r["t"] <= injected_t), default=0)
    after = sorted((r for r in progress if r["t_start"] > injected_t), key=lambda r: r["t"])
    full = [r for r in after if int(r.get("replicas", 0)) >= replicas]
    back = [e["t"] for e in events if e.get("event") == EventKind.STARTED and e["t"] > injected_t]
    if not after:
        return Recovery(injected_t, before, None, "none", None, None), None
    first = after[0]
    rec = Recovery(
        injected_t,
        before,
        int(first["step"]) - 1,
        "peer",  # the survivors go on; the restarted replica heals from one
        min(back) if back else None,
        first["t"],
    )
    return rec, (full[0]["t"] - injected_t) if full else None


def torchft_trial(
    run_dir: Path,
    *,
    data: Path,
    steps: int,
    sets: Mapping[str, Any],
    kill_step: int,
    timeout_s: float,
    progress: Any,
) -> dict[str, Any]:
    """One `bench recovery` trial: replica 1 SIGKILLed once a step >= ``kill_step`` committed."""
    job = TorchftJob(run_dir, data, steps, sets)
    job.start()
    try:
        wait_until(
            lambda: job.newest_step() >= kill_step, timeout_s, f"torchft step {kill_step}", interval_s=0.01
        )
        pid, killed_t = job.kill_replica(1)
        progress(f"  torchft: SIGKILL replica 1 (pid {pid}) after step {job.newest_step()}; restarted")
        job.wait(timeout_s)
    except BaseException:
        job.stop()
        raise
    assert job.events is not None
    evs = job.events.records
    rec, full_world_s = torchft_recovery(job.records(), evs, killed_t)
    done = [e for e in evs if e.get("event") == EventKind.FINISHED]
    return rec.as_dict(
        killed_pid=pid,
        full_world_s=full_world_s,
        # the restarted replica came back after the survivor had trained every step
        rejoined=not any(e.get("event") == "too_late" for e in evs),
        command=shown(job.command(0, Path("RUN_DIR"))),
        final_fingerprint=done[0].get("fingerprint") if done else None,
    )
