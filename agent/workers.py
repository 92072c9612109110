"""The node's trainer processes: spawn, assign, watch, stop.

Every rank starts life as a generic *standby*: a Python process that has already imported torch and
the trainer and waits for an assignment file. Starting Python and torch is about 90% of a restart's
cost, so the agent keeps ``standby`` such processes warm; a replacement rank is an assignment, not a
process start. Ranks that survive a peer's failure are never re-created: they get the next
generation's assignment and re-form their process group in place.

The agent watches each rank through the files it writes (progress, events, its heartbeat) and
through its exit status, classifies exits (error file, exit code, signal), and detects hangs
(agent/hangs.py): a training rank stopped by a signal within a quarter of a second of its last
heartbeat, and a rank with no step within max(hang_factor x median step time, hang_floor_s) whose
heartbeat went silent or which runs outside any collective. A rank blocked in a collective, or in a pause it
announced, with a live heartbeat is waiting on a peer or busy, not hung.

What a rank runs (its *program*) is the built-in trainer unless a job names an entrypoint that this
agent's configuration maps to a script or module of the user's (``--entrypoint NAME=TARGET``). A
program built on the SDK (``stanchion.join()``) is a standby exactly like the trainer, so the pool
works the same; it holds standbys of one program at a time, the current job's, and retires idle
ones of another. A job names only the entrypoint: the argv comes from this node's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import hangs
from agent.config import BUILTIN_ENTRYPOINT, ENTRYPOINT_HINT, AgentConfig
from agent.metrics import TrainingMetrics
from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion import procs
from stanchion.files import JsonlTail, write_json_atomic
from stanchion.sdk import contract, liveness
from stanchion.sdk.contract import Assignment, Request, WorkerPaths
from stanchion.vocab import (
    CLEAN_EXITS,
    FORWARDED,
    LEFT_GENERATION,
    AgentEventKind,
    EventKind,
    ExitReason,
    Resume,
)

log = logging.getLogger(__name__)

BUILTIN_PROGRAM: tuple[str, ...] = ("-m", "trainer")  # argv after the interpreter: the built-in trainer
STATE_FILE = "agent-state.json"  # in the node's directory: the job and generation this agent serves
# The returncode of an adopted rank that is gone: its exit status went to the process that reaped it
# (init), not to this agent. No real status is 256 (exit codes are 0-255, signals negative).
EXIT_UNKNOWN = 256
PROGRESS_REPLAY_BYTES = 256 * 1024  # how much of an adopted rank's progress file is read back


class AdoptedProcess:
    """A rank this agent did not start: it outlived the agent that did, and this one took it over.
    The same face as the asyncio process handle the rest of the agent uses, through its identity
    (pid and start time, so a reused pid is never signalled) and /proc."""

    def __init__(self, ident: procs.ProcId):
        self.ident, self.pid = ident, ident.pid
        self._gone = False

    @property
    def returncode(self) -> int | None:
        if not self._gone and not self.ident.running():
            self._gone = True
        return EXIT_UNKNOWN if self._gone else None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        while (code := self.returncode) is None:
            await asyncio.sleep(0.05)
        return code


@dataclass
class Worker:
    wid: int
    proc: asyncio.subprocess.Process | AdoptedProcess
    paths: WorkerPaths
    spawned_at: float
    job_id: str = ""
    slot: int | None = None  # local rank once assigned
    rank: int = -1
    generation: int = -1
    state: int = types_pb2.WORKER_STATE_STANDBY
    ready: bool = False  # the standby finished importing
    assigned_at: float = 0.0
    last_progress_at: float = 0.0
    step: int = 0
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    hung: str = ""  # why the agent killed it as hung
    hung_at: float = 0.0
    last_seen: float = 0.0  # a hung rank's last sign of work (heartbeat, step or assignment)
    stopping: bool = False
    reassigned_at: float = 0.0  # when a survivor was given a newer generation
    left_t: float = 0.0  # the rank's own time of its newest `left generation` event
    exit_code: int | None = None
    progress_tail: JsonlTail | None = None
    events_tail: JsonlTail | None = None
    program: tuple[str, ...] = BUILTIN_PROGRAM  # its argv after the Python executable

    def __post_init__(self) -> None:
        self.progress_tail = JsonlTail(self.paths.progress)
        self.events_tail = JsonlTail(self.paths.events)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def median_step_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class WorkerGroup:
    def __init__(self, cfg: AgentConfig, *, python: str = sys.executable):
        self.cfg = cfg
        self.limits = hangs.Limits(frozen_after_s=cfg.frozen_after_s)
        self.python = python
        self.run_root = Path(cfg.run_root).resolve()
        self.data_root = Path(cfg.data_root).resolve() if cfg.data_root else self.run_root
        self.base = self.run_root / "workers" / cfg.node_id
        self.workers: list[Worker] = []
        self._next_wid = self._first_wid()
        self.job_id = ""
        self.generation = -1
        self.config_path: Path | None = None
        self.faults_path: Path | None = None
        self.metrics = TrainingMetrics()  # the Prometheus relay of the ranks' progress
        self._reslot: list[Worker] = []
        # What new ranks and standbys run: the current job's program (the built-in trainer until a
        # job names another entrypoint).
        self.program: tuple[str, ...] = BUILTIN_PROGRAM
        self._claimed = False

    def claim(self) -> None:
        """Name this agent as the owner of the node's ranks (the file their orphan watch reads)."""
        me = procs.identify(os.getpid())
        assert me is not None
        self.base.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.base / contract.AGENT_FILE, me.to_json())
        self._claimed = True

    def _save_state(self) -> None:
        """What a restarted agent needs to go on serving the job its ranks run."""
        write_json_atomic(
            self.base / STATE_FILE,
            {
                "job_id": self.job_id,
                "generation": self.generation,
                "config": str(self.config_path or ""),
                "faults": str(self.faults_path or ""),
                "program": list(self.program),
            },
        )

    def adopt(self) -> list[Worker]:
        """Take over the ranks and standbys a previous agent of this node left running (they outlive
        it for the orphan grace): the job, generation and program from its state file, each live
        process (by pid and start time) from its worker file, and where each stands (slot, rank,
        generation, state, step) by reading back its assignment, events and recent progress. Nothing
        read back is relayed again: what the previous agent did not send before it died is lost."""
        self.claim()
        try:
            state = json.loads((self.base / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {}
        self.job_id = str(state.get("job_id", ""))
        self.generation = int(state.get("generation", -1))
        self.config_path = Path(state["config"]) if state.get("config") else None
        self.faults_path = Path(state["faults"]) if state.get("faults") else None
        self.program = tuple(state.get("program") or BUILTIN_PROGRAM)
        adopted: list[Worker] = []
        for root in sorted(self.base.glob("w*")):
            ident = procs.ProcId.read(root / contract.WORKER_FILE)
            if ident is None or not ident.running():
                continue
            info = json.loads((root / contract.WORKER_FILE).read_text())
            w = Worker(
                int(info["wid"]),
                AdoptedProcess(ident),
                WorkerPaths(root),
                float(info.get("spawned_at", 0.0)),
                program=tuple(info.get("program") or BUILTIN_PROGRAM),
            )
            self._read_back(w)
            adopted.append(w)
            log.info(
                "adopted w%05d (pid %d): rank %d, generation %d, step %d",
                w.wid,
                w.proc.pid,
                w.rank,
                w.generation,
                w.step,
            )
        self.workers.extend(adopted)
        return adopted

    def _read_back(self, w: Worker) -> None:
        """Where an adopted worker stands, from its files (nothing is relayed)."""
        now = time.time()
        for rec in w.events_tail.read():
            self._track(w, rec.get("event", ""), rec)
        a = w.paths.latest_assignment()
        if a is not None and a.stop:
            w.stopping = True  # it was told to leave; its exit is a stop, not a crash
        elif a is not None:
            w.slot, w.rank, w.job_id = a.local_rank, a.rank, a.job_id
            w.assigned_at = now
            if a.generation > w.generation:  # assigned, not yet formed: as start_generation leaves it
                if w.state in (types_pb2.WORKER_STATE_TRAINING, types_pb2.WORKER_STATE_WAITING):
                    w.reassigned_at = now
                else:
                    w.generation = a.generation
                    w.state = types_pb2.WORKER_STATE_STARTING
        w.progress_tail = JsonlTail(
            w.paths.progress, start=max(0, _size(w.paths.progress) - PROGRESS_REPLAY_BYTES)
        )
        for rec in w.progress_tail.read():
            self._observe_progress(w, rec, now)
        w.last_progress_at = now

    def _first_wid(self) -> int:
        existing = (
            [int(p.name[1:]) for p in self.base.glob("w*") if p.name[1:].isdigit()]
            if self.base.exists()
            else []
        )
        return max(existing, default=-1) + 1

    # -- spawning -------------------------------------------------------------------------------
    async def spawn(self) -> Worker:
        if not self._claimed:
            self.claim()
        wid = self._next_wid
        self._next_wid += 1
        paths = WorkerPaths(self.base / f"w{wid:05d}")
        paths.control.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for key in (
            contract.ENV_CONFIG,
            contract.ENV_STANDBY_CONFIG,
            contract.ENV_FAULTS,
            "RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            env.pop(key, None)
        env.update(
            {
                contract.ENV_STANDBY: "1",
                contract.ENV_WORKER_DIR: str(paths.root),
                contract.ENV_NODE_ID: self.cfg.node_id,
                contract.ENV_PARENT_PID: str(os.getpid()),
                contract.ENV_ORPHAN_GRACE: str(self.cfg.orphan_grace_s),
                "OMP_NUM_THREADS": str(self.cfg.threads),
                "MKL_NUM_THREADS": str(self.cfg.threads),
                "PYTHONUNBUFFERED": "1",
            }
        )
        program = self.program
        if program == BUILTIN_PROGRAM and self.config_path is not None:
            env[contract.ENV_STANDBY_CONFIG] = str(self.config_path)  # build the running job's model now
        log_file = open(paths.root / "output.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            # An argv list, never a shell. The program is the built-in trainer or one this agent's own
            # configuration names; a job spec contributes only its entrypoint name and arguments.
            proc = await asyncio.create_subprocess_exec(
                self.python,
                *program,
                env=env,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log_file.close()
        w = Worker(wid, proc, paths, time.time(), program=program)
        ident = procs.identify(proc.pid)
        if ident is not None:  # else it is gone already: its exit is seen at the next poll
            write_json_atomic(
                paths.root / contract.WORKER_FILE,
                {"wid": wid, **ident.to_json(), "program": list(program), "spawned_at": w.spawned_at},
            )
        self.workers.append(w)
        log.info("spawned standby w%05d (pid %d): %s", wid, proc.pid, " ".join(program))
        return w

    async def ensure_standbys(self) -> None:
        for _ in range(self.cfg.standby - len(self._idle(self.program))):
            await self.spawn()

    def _idle(self, program: tuple[str, ...] | None = None) -> list[Worker]:
        """Standbys: alive, without a slot and not asked to stop (of ``program`` when given)."""
        return [
            w
            for w in self.workers
            if w.alive and w.slot is None and not w.stopping and (program is None or w.program == program)
        ]

    def resolve_program(self, entrypoint: str, args: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
        """The argv after the interpreter for a job's entrypoint and args. An entrypoint this node's
        configuration does not name is refused (ValueError): a job spec never chooses a command."""
        name = entrypoint or BUILTIN_ENTRYPOINT  # a coordinator that predates entrypoints sends ""
        if name == BUILTIN_ENTRYPOINT:
            if args:
                raise ValueError(
                    "the built-in trainer takes no args: its settings travel in the job's [trainer]"
                )
            return BUILTIN_PROGRAM
        targets = self.cfg.entrypoint_targets()
        target = targets.get(name)
        if target is None:
            allowed = ", ".join([BUILTIN_ENTRYPOINT, *targets])
            raise ValueError(
                f"entrypoint {name!r} is not allowed on node {self.cfg.node_id}; allowed: {allowed} "
                f"({ENTRYPOINT_HINT})"
            )
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ValueError(
                    f"entrypoint {name!r}: its script {target} no longer exists on node {self.cfg.node_id}"
                )
            return (target, *args)
        return ("-m", target, *args)

    def _use_program(self, program: tuple[str, ...]) -> None:
        """Make ``program`` the one new ranks and standbys run; idle standbys of another one are
        stopped (SIGTERM: a standby waiting for its assignment exits 0; SIGKILL after the grace)."""
        if program != self.program:
            log.info("program: %s (was %s)", " ".join(program), " ".join(self.program))
        self.program = program
        for w in self._idle():
            if w.program != program:
                log.info("stopping standby w%05d: it runs %s", w.wid, " ".join(w.program))
                w.stopping = True  # its exit is a stop we asked for, not a lost standby
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
                asyncio.get_running_loop().call_later(self.cfg.stop_grace_s, self._kill_if_alive, w)

    # -- directives -----------------------------------------------------------------------------
    def _prepare_job(self, job_id: str, start: agent_pb2.StartWorkers) -> Path:
        """Write the job's resolved config (data path made absolute under the data root) for the ranks."""
        cfg = json.loads(start.config_json)
        data_rel = cfg.get("data", {}).get("path", "")
        data_dir = (self.data_root / data_rel).resolve()
        if not data_dir.is_relative_to(self.data_root):
            raise ValueError(f"data path {data_rel!r} escapes the data root {self.data_root}")
        cfg.setdefault("data", {})["path"] = str(data_dir)
        run_dir = self.run_dir(job_id)
        node_dir = run_dir / "nodes" / self.cfg.node_id
        node_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = node_dir / "trainer-config.json"
        write_json_atomic(self.config_path, cfg)
        faults = json.loads(start.faults_json) if start.faults_json else []
        faults += self.cfg.defect_faults()
        self.faults_path = None
        if faults:
            self.faults_path = node_dir / "faults.json"
            write_json_atomic(self.faults_path, faults)
        return run_dir

    def run_dir(self, job_id: str) -> Path:
        path = (self.run_root / job_id).resolve()
        if not path.is_relative_to(self.run_root) or path == self.run_root:
            raise ValueError(f"job id {job_id!r} does not name a directory under the run root")
        return path

    def checkpoint_path(self, job_id: str, path: str) -> str:
        """A checkpoint named by the coordinator must lie inside this job's run directory."""
        if not path:
            return ""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.run_dir(job_id)):
            raise ValueError(f"checkpoint {path!r} is outside the job's run directory")
        return str(resolved)

    async def start_generation(self, d: agent_pb2.Directive) -> None:
        s = d.start
        resume = Resume(s.resume)  # an unknown mode is refused before anything changes
        program = self.resolve_program(s.entrypoint, tuple(s.args))  # so is an entrypoint not allowed here
        if d.job_id != self.job_id:
            await self.stop_job_workers("a new job")
            self.job_id = d.job_id
        run_dir = self._prepare_job(d.job_id, s)
        self._use_program(program)
        self.generation = d.generation
        checkpoint = self.checkpoint_path(d.job_id, s.checkpoint)
        world = s.num_nodes * s.workers_per_node
        for slot in range(s.workers_per_node):
            w = self._worker_for_slot(slot)
            if w is not None and (s.fresh_processes or w.program != program):
                # An in-place recovery failed: this process may be wedged anywhere. Kill it now (it
                # holds no state the new generation uses) and give its slot to a new process.
                why = "recovery escalated" if s.fresh_processes else "it runs another program"
                log.warning("w%05d (rank %d) replaced by a new process: %s", w.wid, w.rank, why)
                w.stopping = True
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                w = None
            if w is None:
                w = self._take_standby() or await self.spawn()
                w.slot = slot
            if w.state in (types_pb2.WORKER_STATE_TRAINING, types_pb2.WORKER_STATE_WAITING):
                w.reassigned_at = time.time()  # a survivor: it keeps its generation until it re-forms
            else:
                w.generation = d.generation
            w.job_id, w.rank = d.job_id, s.node_rank * s.workers_per_node + slot
            w.state, w.assigned_at, w.hung = types_pb2.WORKER_STATE_STARTING, time.time(), ""
            w.last_progress_at = w.assigned_at
            a = Assignment(
                generation=d.generation,
                rank=w.rank,
                world_size=world,
                local_rank=slot,
                local_world_size=s.workers_per_node,
                master_addr=s.master_addr,
                master_port=s.master_port,
                resume=resume,
                checkpoint=checkpoint,
                skip_windows=tuple((x.start, x.length) for x in s.skip_windows),
                rollback_to=s.rollback_to,
                node_id=self.cfg.node_id,
                job_id=d.job_id,
                run_dir=str(run_dir),
                config=str(self.config_path),
                faults=str(self.faults_path or ""),
            )
            write_json_atomic(w.paths.assignment_path(d.generation), a.to_json())
        for w in self.workers:  # a slot this node no longer has (fewer workers per node)
            if w.alive and w.slot is not None and w.slot >= s.workers_per_node:
                await self._supersede(w, d.generation)
        self._save_state()  # after the assignments: the ranks do not wait for it
        await self.ensure_standbys()

    def _worker_for_slot(self, slot: int) -> Worker | None:
        for w in self.workers:
            if w.alive and w.slot == slot and not w.stopping and not w.hung:
                return w
        return None

    def _take_standby(self) -> Worker | None:
        idle = self._idle(self.program)  # only standbys of the current program
        idle.sort(key=lambda w: (not w.ready, w.wid))  # warm ones first
        return idle[0] if idle else None

    async def _supersede(self, w: Worker, generation: int) -> None:
        """Tell a rank it is not part of ``generation``: it leaves with its peers at a step boundary."""
        stop = Assignment(
            generation=generation,
            rank=-1,
            world_size=0,
            local_rank=-1,
            local_world_size=0,
            master_addr="",
            master_port=0,
            stop=True,
            node_id=self.cfg.node_id,
        )
        write_json_atomic(w.paths.assignment_path(generation), stop.to_json())
        w.stopping = True
        asyncio.get_running_loop().call_later(self.cfg.stop_grace_s, self._kill_if_alive, w)

    async def stop_job_workers(
        self, reason: str, *, generation: int | None = None, checkpoint: bool = False
    ) -> None:
        """Stop every assigned rank: a stop assignment (so peers leave together), SIGTERM (a rank in
        training checkpoints and exits 0), then SIGKILL after the grace period."""
        for w in self.workers:
            if w.alive and w.slot is not None and not w.stopping:
                log.info("stopping w%05d (rank %d): %s", w.wid, w.rank, reason)
                # A stop is an assignment newer than any the rank has: it leaves with its peers.
                await self._supersede(w, max(generation or 0, w.generation, self.generation) + 1)
                if checkpoint:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.send_signal(signal.SIGTERM)

    def rollback(self, d: agent_pb2.Directive) -> int:
        r = d.rollback
        req = Request(
            id=r.request_id,
            kind="rollback",
            to_step=r.to_step,
            skip=tuple((x.start, x.length) for x in r.skip),
            reason=r.reason,
        )
        n = 0
        for w in self.workers:
            if w.alive and w.slot is not None and w.generation == d.generation and not w.stopping:
                write_json_atomic(w.paths.request_path(r.request_id), req.to_json())
                n += 1
        return n

    def _kill_if_alive(self, w: Worker) -> None:
        if w.alive:
            log.warning("w%05d did not stop within %.0fs: SIGKILL", w.wid, self.cfg.stop_grace_s)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()

    async def shutdown(self, grace_s: float) -> None:
        """Agent exit: SIGTERM every process (ranks checkpoint), SIGKILL what is left after the grace."""
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.proc.wait(), remaining)
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()

    # -- watching -------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> list[tuple[str, Worker, dict[str, Any]]]:
        """Read new records, detect exits and hangs. Returns (kind, worker, record) events to relay."""
        now = time.time() if now is None else now
        out: list[tuple[str, Worker, dict[str, Any]]] = []
        for w in list(self.workers):
            for rec in w.events_tail.read():
                kind = rec.get("event", "")
                self._track(w, kind, rec)
                self.metrics.observe_event(w.job_id, kind, rec)
                if kind in FORWARDED:
                    out.append((kind, w, rec))
            for rec in w.progress_tail.read():
                self._observe_progress(w, rec, now)
                self.metrics.observe_progress(w.job_id, w.rank, rec)
            if not w.alive:
                out.append((AgentEventKind.WORKER_EXITED, w, self._classify_exit(w)))
                self.workers.remove(w)
                continue
            hung, last_seen = self._hang_reason(w, now)
            if hung:
                log.error("w%05d (rank %d) is hung: %s; SIGKILL", w.wid, w.rank, hung)
                w.hung, w.hung_at, w.last_seen = hung, now, last_seen
                w.state = types_pb2.WORKER_STATE_HUNG
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                if w.reassigned_at:  # its slot already belongs to a newer generation: give it to a standby
                    self._reslot.append(w)
        return out

    async def reslot(self) -> None:
        """Hand the current assignment of killed stragglers' slots to standby ranks."""
        while self._reslot:
            dead = self._reslot.pop()
            a = dead.paths.latest_assignment()
            if a is None or a.stop or a.generation != self.generation:
                continue
            w = self._take_standby() or await self.spawn()
            w.slot, w.job_id, w.rank, w.generation = dead.slot, dead.job_id, a.rank, a.generation
            w.state, w.assigned_at = types_pb2.WORKER_STATE_STARTING, time.time()
            w.last_progress_at = w.assigned_at
            write_json_atomic(w.paths.assignment_path(a.generation), a.to_json())
            log.info("slot %s of generation %d handed to w%05d", dead.slot, a.generation, w.wid)
        await self.ensure_standbys()

    @staticmethod
    def _observe_progress(w: Worker, rec: dict[str, Any], now: float) -> None:
        w.step = int(rec.get("step", w.step))
        w.last_progress_at = now
        if rec.get("step_time_s"):
            w.step_times.append(float(rec["step_time_s"]))
        # TRAINING means a step of the worker's current generation; a survivor's last records of the
        # generation it is leaving do not count for the one it joins, nor does a step written before
        # the rank left (one poll reads the events first, then the progress).
        if (
            w.state in (types_pb2.WORKER_STATE_STARTING, types_pb2.WORKER_STATE_WAITING)
            and rec.get("generation", w.generation) == w.generation
            and float(rec.get("t", math.inf)) > w.left_t
        ):
            w.state = types_pb2.WORKER_STATE_TRAINING

    def _track(self, w: Worker, kind: str, rec: dict[str, Any]) -> None:
        if kind == EventKind.STANDBY:
            w.ready = True
        elif kind == EventKind.STARTED:  # the group formed; TRAINING begins with the first progress record
            w.generation, w.rank = int(rec.get("generation", w.generation)), int(rec.get("rank", w.rank))
            w.state = types_pb2.WORKER_STATE_STARTING
            w.last_progress_at, w.reassigned_at = time.time(), 0.0
        elif kind in LEFT_GENERATION:
            w.state = types_pb2.WORKER_STATE_WAITING
            w.left_t = float(rec.get("t", 0.0))
            w.last_progress_at = time.time()
        elif kind == EventKind.FINISHED:
            w.state = types_pb2.WORKER_STATE_EXITED

    def _hang_reason(self, w: Worker, now: float) -> tuple[str, float]:
        """Why ``w`` is hung ("" if it is not; the decisions are agent/hangs.py's), and when it was
        last seen working: where its fault is measured from."""
        if w.stopping or w.hung or w.slot is None:
            return "", now
        beat = liveness.read(w.paths.root)
        if w.state == types_pb2.WORKER_STATE_TRAINING:  # not while it leaves or joins a generation
            frozen = hangs.frozen(w.proc.pid, beat, now, procs.process_state, self.limits)
            if frozen and beat is not None:
                return frozen, beat.t
        if (
            w.reassigned_at
            and w.generation < self.generation
            and now - w.reassigned_at > self.cfg.rejoin_grace_s
            and beat is not None
            and beat.doing == liveness.COLLECTIVE
            and beat.since < w.reassigned_at
        ):
            # A survivor stuck in a collective it entered before its new assignment (a partitioned
            # peer sends no reset) cannot see that assignment until gloo's timeout: free the slot.
            return (
                f"still blocked in {beat.what!r} of generation {w.generation} "
                f"{now - w.reassigned_at:.0f}s after being assigned generation {self.generation}"
            ), w.reassigned_at
        if w.state == types_pb2.WORKER_STATE_STARTING:
            if now - w.assigned_at > self.cfg.startup_timeout_s:
                return (
                    f"no process group within {self.cfg.startup_timeout_s:.0f}s of its assignment",
                    w.assigned_at,
                )
            return "", now
        if w.state != types_pb2.WORKER_STATE_TRAINING:
            return "", now
        limit = max(self.cfg.hang_factor * w.median_step_s(), self.cfg.hang_floor_s)
        idle = now - w.last_progress_at
        return hangs.not_stepping(w.proc.pid, beat, now, idle, limit, self.limits), w.last_progress_at

    def _classify_exit(self, w: Worker) -> dict[str, Any]:
        code = w.proc.returncode
        detail: dict[str, Any] = {"exit_code": code, "pid": w.proc.pid, "worker": w.wid, "slot": w.slot}
        if w.hung:
            reason, summary = ExitReason.HANG, f"killed by the agent: {w.hung}"
            detail["hung_at"] = w.hung_at
        elif code == EXIT_UNKNOWN:  # adopted: its status went to init; what its files say decides
            reason = ExitReason.FINISHED if w.state == types_pb2.WORKER_STATE_EXITED else ExitReason.CRASH
            summary = "exit status unknown (a rank adopted from a previous agent)"
        elif code == contract.EXIT_OK:
            reason, summary = (
                (ExitReason.FINISHED if w.state == types_pb2.WORKER_STATE_EXITED else ExitReason.STOPPED),
                "exit 0",
            )
        elif code == contract.EXIT_SUPERSEDED:
            reason, summary = ExitReason.SUPERSEDED, "left: not part of the new generation"
        elif code == contract.EXIT_CONFIG:
            reason, summary = ExitReason.CONFIG, self._last_error_line(w) or "configuration rejected"
        elif code is not None and code < 0:
            reason, summary = ExitReason.CRASH, f"signal {signal.Signals(-code).name}"
        else:
            reason, summary = ExitReason.CRASH, f"exit {code}"
        try:
            err = json.loads(w.paths.error.read_text())
            summary += f": {err.get('error', '')}"[:500]
        except (OSError, ValueError):
            pass
        if w.stopping and reason == ExitReason.CRASH:
            reason = ExitReason.STOPPED  # we asked it to go
        if w.slot is None and reason == ExitReason.CRASH:
            reason = ExitReason.STANDBY_LOST
        detail.update(reason=reason, summary=summary, fault_age_s=self._fault_age(w))
        if w.reassigned_at and not w.hung:
            # A survivor assigned to a newer generation that dies before re-forming fails that
            # generation: reported under its own old one, the coordinator would take it for stale and
            # wait out the first-step deadline. (A hung one's slot is handed to a standby instead.)
            detail["generation"] = self.generation
        w.state = types_pb2.WORKER_STATE_EXITED if reason in CLEAN_EXITS else types_pb2.WORKER_STATE_FAILED
        return detail

    def _fault_age(self, w: Worker) -> float:
        """Seconds since the rank's fault, as best this node knows: from its last sign of work when
        it was killed as hung, else from its last heartbeat (which comes every 50 ms until it dies).
        An age, not a time, so that the coordinator's clock measures recoveries from it."""
        if w.hung:
            last_seen = w.last_seen
        else:
            beat = liveness.read(w.paths.root)
            last_seen = beat.t if beat is not None and beat.pid == w.proc.pid else time.time()
        return round(max(0.0, time.time() - last_seen), 4)

    def _last_error_line(self, w: Worker) -> str:
        try:
            lines = (w.paths.root / "output.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if line.startswith("error:")]
        return errors[-1][len("error:") :].strip() if errors else ""

    def statuses(self) -> list[types_pb2.WorkerStatus]:
        return [
            types_pb2.WorkerStatus(
                local_rank=w.slot if w.slot is not None else -1,
                rank=w.rank,
                state=w.state,
                pid=w.proc.pid or 0,
                step=w.step,
                step_time_s=w.median_step_s(),
                generation=max(w.generation, 0),
            )
            for w in self.workers
            if w.alive
        ][:64]
