"""This process's place in a job: ``stanchion.join()``.

A rank is started by torchrun (or ``stanchion train``, or by hand) or by a Stanchion agent:

- **torchrun**: the group forms once from the ``env://`` contract. Records and events go to
  ``RUN_DIR/ranks/rank-NNNNN/`` so a person (or ``stanchion job explain``) can read them.
- **an agent**: the process starts as a *standby* (``STANCHION_STANDBY=1``): it has run the user's
  program up to ``join()``, and waits there for an assignment file naming its generation and rank.
  When a collective fails later, the guard leaves the broken group and joins the next generation
  through this same object, keeping the process and its state.

The runtime owns what is per process: the worker directory's files (progress, events, error, the
flight recorder), the liveness file, SIGTERM, the fault injector of chaos runs and the topology of
the current generation.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from stanchion.files import JsonlWriter, write_json_atomic
from stanchion.procs import ProcId
from stanchion.sdk import contract, numerics, parallel
from stanchion.sdk.checkpoint import blocked_by_abandoned_checkpoint
from stanchion.sdk.contract import Assignment, WorkerPaths
from stanchion.sdk.faults import FaultHooks, FaultInjector, load
from stanchion.sdk.liveness import LivenessThread
from stanchion.sdk.parallel import Topology, env_topology, form_group, leave_group
from stanchion.vocab import DETECTORS, EventKind

log = logging.getLogger(__name__)


class Superseded(Exception):
    """The agent told this waiting rank not to rejoin."""


def die_with_parent() -> None:
    """A process that must not outlive its agent (a diagnostic trial, or a rank whose agent allows no
    orphans): the kernel SIGKILLs it when the agent dies, and one whose agent already died exits now."""
    parent = os.environ.get(contract.ENV_PARENT_PID)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the agent died before prctl took effect
        os._exit(1)


def watch_agent() -> None:
    """An agent's rank outlives its agent (a crash, an upgrade, a restart) so that the next agent can
    adopt it without interrupting training, as a container outlives its runtime's daemon; bounded by
    the agent's orphan grace (``$STANCHION_ORPHAN_GRACE_S``), after which an orphan nobody adopted
    exits (:data:`contract.EXIT_ORPHANED`) and its peers recover without it. A grace of 0 keeps the
    old rule: the rank dies with its agent."""
    global _watching
    env = os.environ
    if _watching or not env.get(contract.ENV_PARENT_PID) or not env.get(contract.ENV_WORKER_DIR):
        return  # watched already, or not an agent's
    _watching = True
    grace = float(env.get(contract.ENV_ORPHAN_GRACE) or 0)
    if grace <= 0 or not sys.platform.startswith("linux"):
        die_with_parent()
        return
    AgentWatch(Path(env[contract.ENV_WORKER_DIR]).parent / contract.AGENT_FILE, grace).start()


_watching = False


class AgentWatch(threading.Thread):
    """Watches the agent named in the node's agent file; exits the process once no live agent has
    been named there for ``grace_s``."""

    POLL_S = 0.25

    def __init__(self, agent_file: Path, grace_s: float):
        super().__init__(name="agent-watch", daemon=True)
        self.agent_file, self.grace_s = agent_file, grace_s
        self.orphaned_since: float | None = None
        self.agent: ProcId | None = None

    def check(self, now: float) -> bool:
        """One look: False once the grace has run out with no live agent."""
        agent = ProcId.read(self.agent_file)
        if agent is not None and agent.running():
            if self.orphaned_since is not None or (self.agent is not None and agent != self.agent):
                log.warning("adopted by the agent with pid %d", agent.pid)
            self.agent, self.orphaned_since = agent, None
            return True
        if self.orphaned_since is None:
            self.orphaned_since = now
            log.warning(
                "my agent is gone: training goes on; exiting in %.0fs unless a new agent adopts me",
                self.grace_s,
            )
        return now - self.orphaned_since <= self.grace_s

    def run(self) -> None:
        while self.check(time.monotonic()):
            time.sleep(self.POLL_S)
        log.error("no agent adopted this orphan within %.0fs: exiting", self.grace_s)
        _flush_and_exit(contract.EXIT_ORPHANED)


def wait_as_standby(paths: WorkerPaths, stop: Callable[[], bool]) -> Assignment | None:
    """Announce a warm standby and wait for its first assignment (None: stopped or superseded)."""
    paths.control.mkdir(parents=True, exist_ok=True)
    JsonlWriter(paths.events).write(
        {"event": EventKind.STANDBY, "pid": os.getpid(), "rank": -1, "generation": -1, "step": 0}
    )
    assignment = paths.wait_for_assignment(-1, give_up=stop)
    if assignment is None or assignment.stop or stop():
        return None
    return assignment


def write_error_file(path: Path, exc: BaseException, *, step: int = 0, rank: int = -1) -> None:
    """The error file the agent reads to classify a crash (the torchelastic convention)."""
    write_json_atomic(
        path,
        {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)),
            "step": step,
            "rank": rank,
            "time": time.time(),
        },
    )


def worker_paths(run_dir: str | os.PathLike[str] | None, rank: int | None = None) -> WorkerPaths:
    """This worker's directory: the agent's (``$STANCHION_WORKER_DIR``), else ``RUN_DIR/ranks/rank-N``."""
    env = os.environ
    if env.get(contract.ENV_WORKER_DIR):
        return WorkerPaths(Path(env[contract.ENV_WORKER_DIR]))
    root = Path(run_dir or env.get(contract.ENV_RUN_DIR) or "runs/default")
    return WorkerPaths(root / "ranks" / f"rank-{env_topology()[0] if rank is None else rank:05d}")


def shutdown_is_unsafe() -> bool:
    """Whether the interpreter's own shutdown could abort or stall this process: it left a broken
    generation, whose collectives may still end in the backend's threads while the interpreter
    shuts down (:func:`parallel.left_broken_group`), or a checkpoint abandoned with that generation
    still blocks in a collective (the interpreter would wait for its thread up to the group's
    timeout). Nothing of either is needed any more."""
    return parallel.left_broken_group() or blocked_by_abandoned_checkpoint()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: without the interpreter's shutdown where that is unsafe
    (output and logs are flushed first), else with ``sys.exit`` once :func:`free_groups` ran."""
    if shutdown_is_unsafe():
        _flush_and_exit(code)
    free_groups()
    sys.exit(code)


def free_groups() -> None:
    """Free process groups nothing references any more. FSDP's and DDP's state sits in reference
    cycles, so only the garbage collector frees it, and with it a group's last reference; left to
    the interpreter's shutdown, a gloo thread still releasing the last collective's tensors (which
    takes the GIL) aborts the process. Called when the program is done with its groups."""
    gc.collect()


def _flush_and_exit(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Runtime:
    """One process's link to its job. Made by :func:`join`; a guard drives its re-forming."""

    def __init__(
        self,
        *,
        paths: WorkerPaths,
        run_dir: Path,
        assignment: Assignment | None,
        faults_path: Path | None,
        device: str,
        seed: int,
        collective_timeout_s: float,
        validate: Callable[[int], Any] | None,
        flight_records: int = 200,
        poll_s: float = 0.01,
    ):
        self.paths = paths
        self.run_dir = run_dir
        self.assignment = assignment  # the generation this process is in (or joining); None: torchrun
        self.device_kind = device
        self.collective_timeout_s = collective_timeout_s
        self.validate = validate
        self.poll_s = poll_s
        self.topo: Topology | None = None
        self.job_id = assignment.job_id if assignment else ""
        self.stop_requested = False
        self.uncaught = False  # an exception reached the top of the program (its exit code is 1)
        self._exit_hooked = False
        self.progress_out = JsonlWriter(paths.progress)
        self.events_out = JsonlWriter(paths.events)
        self.flight: deque[dict[str, Any]] = deque(maxlen=flight_records)
        # Where the guard stands (its step and handled requests) for every event's fields.
        self.where: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.fault_hooks: FaultHooks = FaultHooks()
        if faults_path is not None:
            rank = assignment.rank if assignment else env_topology()[0]
            self.fault_hooks = FaultInjector(
                load(faults_path),
                rank=rank,
                seed=seed,
                state_dir=run_dir / "faults",
                node=os.environ.get(contract.ENV_NODE_ID, ""),
                announce=lambda fired: self.event(EventKind.FAULT_INJECTED, **fired),
            )

    # -- the topology of the current generation ---------------------------------------------------
    @property
    def managed(self) -> bool:
        """Started by an agent: a broken group re-forms in place instead of ending the process."""
        return self.assignment is not None

    @property
    def rank(self) -> int:
        return self._topo().rank

    @property
    def world_size(self) -> int:
        return self._topo().world_size

    @property
    def local_rank(self) -> int:
        return self._topo().local_rank

    @property
    def device(self) -> Any:
        return self._topo().device

    @property
    def generation(self) -> int:
        return self._topo().generation

    @property
    def is_main(self) -> bool:
        return self._topo().is_main

    def _topo(self) -> Topology:
        if self.topo is None:
            raise RuntimeError("no process group yet: call stanchion.join() first")
        return self.topo

    def form(self) -> Topology:
        """Form the process group of ``self.assignment`` (or torchrun's)."""
        a = self.assignment
        world = a.world_size if a is not None else env_topology()[1]
        if self.validate is not None:  # a layout error is a config error, before any group starts
            self.validate(world)
        rank = a.rank if a is not None else env_topology()[0]
        self.fault_hooks.set_rank(rank)
        if a is not None:
            self.job_id = a.job_id
            self.fault_hooks.freeze_point(a.generation, "join")
            self.event(EventKind.JOINING, rank=a.rank, generation=a.generation)
        superseded = lambda: a is not None and self.paths.latest_assignment(a.generation) is not None  # noqa: E731
        self.topo = form_group(
            a,
            device_kind=self.device_kind,
            timeout_s=self.collective_timeout_s,
            abandon=lambda: self.stop_requested or superseded(),
        )
        # A collective of this generation is given up once the agent assigns a newer one: the
        # coordinator decided it because a peer is gone, so the collective can never complete.
        parallel.wait_policy.timeout_s = self.collective_timeout_s
        parallel.wait_policy.abandon = lambda: (
            f"generation {a.generation} was superseded (a newer assignment arrived)" if superseded() else None
        )
        return self.topo

    def form_until_formed(self) -> Topology:
        """Form the group; under an agent, a formation that fails (a peer died on the way) or is
        abandoned for a newer generation waits for the next assignment and tries that one."""
        from stanchion.sdk.parallel import Abandoned, CollectiveFailed

        while True:
            try:
                return self.form()
            except (CollectiveFailed, Abandoned) as e:
                if not self.managed:
                    raise
                kind = EventKind.ABANDONED if isinstance(e, Abandoned) else EventKind.COLLECTIVE_FAILED
                self.event(kind, reason=str(e)[:500], has_state=False)
                self.leave(broken=True)
                if self.stop_requested:
                    raise SystemExit(contract.EXIT_OK) from None
                try:
                    self.wait_for_next(self.assignment.generation)
                except Superseded:
                    raise SystemExit(contract.EXIT_SUPERSEDED) from None

    def leave(self, *, broken: bool = False) -> None:
        """Leave the group (``broken``: without waiting for collectives still in flight). ``topo``
        keeps naming the generation left."""
        leave_group(broken=broken)

    def newest_assignment_generation(self) -> int:
        a = self.paths.latest_assignment(self.topo.generation if self.topo else -1)
        return a.generation if a is not None else -1

    def wait_for_next(self, after_generation: int) -> Assignment:
        """Block until the agent assigns a newer generation; Superseded if told not to rejoin."""
        a = self.paths.wait_for_assignment(
            after_generation, poll_s=self.poll_s, give_up=lambda: self.stop_requested
        )
        if a is None or a.stop:
            raise Superseded()
        self.assignment = a
        return a

    # -- the worker directory ----------------------------------------------------------------------
    def event(self, name: EventKind, **fields: Any) -> None:
        step, epoch = self.where()
        topo = self.topo
        # request_epoch counts the in-job requests (rollbacks) handled so far: a detection repeated
        # after a replay is a new occurrence, not a duplicate of the first.
        rec = {
            "event": str(name),
            "rank": topo.rank if topo else -1,
            "generation": topo.generation if topo else -1,
            "step": fields.pop("step", step),
            "request_epoch": epoch,
            "job_id": self.job_id,
            **fields,
        }
        if name in DETECTORS:
            rec.setdefault("suspect_ranks", [])
            self.dump_flight(rec["step"])
        self.events_out.write(rec)
        log.info("event %s", rec)

    def record(self, rec: dict[str, Any]) -> None:
        self.progress_out.write(rec)
        self.flight.append(rec)

    def dump_flight(self, step: int) -> None:
        path = self.paths.root / f"flight-{step:08d}.jsonl"
        with contextlib.suppress(OSError), path.open("w") as f:
            for r in self.flight:
                f.write(json.dumps(r, allow_nan=True) + "\n")

    def write_error(self, exc: BaseException) -> None:
        step, _ = self.where()
        write_error_file(self.paths.error, exc, step=step, rank=self.topo.rank if self.topo else -1)
        self.dump_flight(step)

    def close(self) -> None:
        self.progress_out.close()
        self.events_out.close()

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def end_safely_at_exit(self) -> None:
        """Make the program's own end (returning from its main) skip the interpreter's shutdown
        where that is unsafe (:func:`shutdown_is_unsafe`), with exit code 0, or 1 if an exception
        reached the top. Called by ``Guard.finish()``. Other exit handlers of the program do not
        run in that case, and a ``sys.exit(code)`` after the guard finished ends with 0. Otherwise
        the groups the program no longer references are freed first (:func:`free_groups`)."""
        if not self._exit_hooked:
            self._exit_hooked = True
            # threading's private hook, the one concurrent.futures uses: it runs before the
            # interpreter joins threads (an abandoned checkpoint's may block) and before atexit.
            threading._register_atexit(self._at_exit)  # type: ignore[attr-defined]

    def _at_exit(self) -> None:
        if shutdown_is_unsafe():
            _flush_and_exit(contract.EXIT_ERROR if self.uncaught else contract.EXIT_OK)
        free_groups()

    def _excepthook(self, kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        self.uncaught = True
        if not isinstance(exc, KeyboardInterrupt):
            with contextlib.suppress(Exception):
                self.write_error(exc)
        sys.__excepthook__(kind, exc, tb)


def join(
    *,
    run_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    seed: int = 0,
    collective_timeout_s: float = 300.0,
    validate: Callable[[int], Any] | None = None,
    assignment: Assignment | None = None,
    faults: str | os.PathLike[str] | None = None,
    flight_records: int = 200,
) -> Runtime:
    """Join the job: wait for an assignment if an agent started this process as a standby, then
    form the process group. Returns the :class:`Runtime` (rank, world size, device, generation).

    ``run_dir``: where checkpoints go under torchrun (default ``$STANCHION_RUN_DIR`` or
    ``runs/default``); an agent names the job's. ``validate(world_size)`` runs before every group
    formation: raise ``ValueError`` there to refuse a layout (exit 2 before any peer waits).
    ``seed`` seeds injected faults of chaos runs (``faults``: a schedule file; an agent names its
    own). ``assignment``: a first assignment the program already waited for. Exits the process with code 3 if the agent
    supersedes a waiting standby, 0 if it is stopped while waiting.
    """
    env = os.environ
    watch_agent()  # before anything waits: a rank outlives its agent only for the orphan grace
    numerics.prepare_environment(env)  # before any device library starts (stanchion/sdk/numerics.py)
    parallel.prepare_environment(env)  # NCCL: a survivor lives to re-form
    stop: list[bool] = []
    if assignment is None and env.get(contract.ENV_STANDBY) == "1" and env.get(contract.ENV_WORKER_DIR):
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        assignment = wait_as_standby(worker_paths(run_dir), lambda: bool(stop))
        signal.signal(signal.SIGTERM, previous)
        if assignment is None:
            raise SystemExit(contract.EXIT_OK if stop else contract.EXIT_SUPERSEDED)
    if assignment is not None:
        root = Path(assignment.run_dir or run_dir or env.get(contract.ENV_RUN_DIR) or "runs/default")
        faults = assignment.faults or faults or env.get(contract.ENV_FAULTS, "")
    else:
        root = Path(run_dir or env.get(contract.ENV_RUN_DIR) or "runs/default")
        faults = faults or env.get(contract.ENV_FAULTS, "")
    paths = worker_paths(root, assignment.rank if assignment is not None else None)
    paths.control.mkdir(parents=True, exist_ok=True)
    rt = Runtime(
        paths=paths,
        run_dir=root,
        assignment=assignment,
        faults_path=Path(faults) if faults else None,
        device=device,
        seed=seed,
        collective_timeout_s=collective_timeout_s,
        validate=validate,
        flight_records=flight_records,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, rt._on_sigterm)
    sys.excepthook = rt._excepthook
    LivenessThread(paths.root, step=lambda: rt.where()[0]).start()
    rt.form_until_formed()
    return rt
