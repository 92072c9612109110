"""The trainer contract: how an agent (or torchrun, or a person) drives trainer ranks.

Agent -> trainer: the torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus the ``STANCHION_*`` variables below,
and JSON files the agent drops atomically into the worker's ``control/`` directory:

- ``assign-<generation>.json``: join generation g as a given rank (see :class:`Assignment`). A worker
  started with ``STANCHION_STANDBY=1`` imports torch, builds its model, and waits for one; a worker
  whose collective failed waits for the next one and re-forms its process group in place.
- ``request-<id>.json``: an in-job request such as ``{"kind": "rollback", "to_step": S,
  "skip": [[start, length]]}``. Ranks agree on the highest request id through the per-step control
  all-reduce, so every rank acts at the same step.

Trainer -> agent: append-only JSON lines in the worker directory: ``progress.jsonl`` (one record per
step), ``events.jsonl`` (detector and lifecycle events), ``error.json`` (on a crash, with the
traceback) and ``flight-<step>.jsonl`` (the last progress records, kept on any detector event).

Pure standard library: the agent imports this without torch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stanchion.files import read_json
from stanchion.vocab import Resume

# Environment variables (besides torchrun's).
ENV_RUN_DIR = "STANCHION_RUN_DIR"  # the job's run directory (checkpoints live under it)
ENV_WORKER_DIR = "STANCHION_WORKER_DIR"  # this worker's files: progress, events, error, control
ENV_CONFIG = "STANCHION_CONFIG"  # resolved trainer config (TOML or JSON)
ENV_GENERATION = "STANCHION_GENERATION"  # set by the agent; absent under plain torchrun
ENV_STANDBY = "STANCHION_STANDBY"  # "1": wait for an assignment file before joining
# A standby's hint: the resolved config of the job it will most likely join (the one its agent runs),
# so that it builds that model while it waits; the assignment's own config decides in the end.
ENV_STANDBY_CONFIG = "STANCHION_STANDBY_CONFIG"
ENV_FAULTS = "STANCHION_FAULTS"  # a fault-injection schedule file (tests, chaos, bisection defects)
ENV_NODE_ID = "STANCHION_NODE_ID"
ENV_PARENT_PID = "STANCHION_PARENT_PID"  # the agent that started this rank
# Seconds a rank outlives its agent waiting for a restarted agent to adopt it (0: it dies with the agent).
ENV_ORPHAN_GRACE = "STANCHION_ORPHAN_GRACE_S"

PROGRESS_FILE = "progress.jsonl"
EVENTS_FILE = "events.jsonl"
ERROR_FILE = "error.json"
CONTROL_DIR = "control"
CHECKPOINT_DIR = "checkpoints"
# In a node's directory of workers (the parent of each worker's): "PID START" of the agent that owns
# them (stanchion.procs.ProcId), rewritten by a restarted agent when it adopts them.
AGENT_FILE = "agent"
# In a worker's directory, written by its agent: the process (pid, start) and the program it runs.
WORKER_FILE = "worker.json"

# Event kinds (the ``event`` field of events.jsonl) are stanchion.vocab.EventKind.

# Exit codes of a trainer rank.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # bad configuration, detected before any process group starts
EXIT_SUPERSEDED = 3  # told to stop waiting (a newer generation does not include this worker)
EXIT_ORPHANED = 4  # its agent was gone for the orphan grace and no new agent adopted it


@dataclass(frozen=True)
class Assignment:
    """Join ``generation`` as ``rank`` of ``world_size``; written by the agent to ``assign-<g>.json``."""

    generation: int
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    # How this rank obtains its state: fresh (step 0), checkpoint (load ``checkpoint``, or the newest
    # good one when empty), or peer (survivors keep theirs; the others receive it from a live
    # data-parallel peer).
    resume: Resume = Resume.CHECKPOINT
    checkpoint: str = ""
    skip_windows: tuple[tuple[int, int], ...] = ()  # (data start step, length) windows to skip
    rollback_to: int = -1  # survivors first restore their newest snapshot at or before this step
    node_id: str = ""
    job_id: str = ""
    run_dir: str = ""  # the job's run directory (checkpoints); a generic standby learns it here
    config: str = ""  # the resolved trainer config (JSON file) a generic standby builds itself from
    faults: str = ""  # a fault schedule file, or empty
    stop: bool = False  # "do not join": exit with EXIT_SUPERSEDED

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_windows"] = [list(w) for w in self.skip_windows]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Assignment:
        d = dict(d)
        d["resume"] = Resume(d.get("resume", Resume.CHECKPOINT))
        d["skip_windows"] = tuple(tuple(int(x) for x in w) for w in d.get("skip_windows", ()))
        return cls(**d)


@dataclass(frozen=True)
class Request:
    """An in-job request, agreed on by all ranks before anyone acts on it."""

    id: int
    kind: str  # "rollback"
    to_step: int = -1  # roll back to the newest snapshot at or before this step (-1: the newest)
    skip: tuple[tuple[int, int], ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip"] = [list(w) for w in self.skip]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Request:
        d = dict(d)
        d["skip"] = tuple(tuple(int(x) for x in w) for w in d.get("skip", ()))
        return cls(**d)


@dataclass
class WorkerPaths:
    root: Path
    progress: Path = field(init=False)
    events: Path = field(init=False)
    error: Path = field(init=False)
    control: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.progress = self.root / PROGRESS_FILE
        self.events = self.root / EVENTS_FILE
        self.error = self.root / ERROR_FILE
        self.control = self.root / CONTROL_DIR

    def assignment_path(self, generation: int) -> Path:
        return self.control / f"assign-{generation:08d}.json"

    def request_path(self, request_id: int) -> Path:
        return self.control / f"request-{request_id:08d}.json"

    def wait_for_assignment(
        self, after_generation: int = -1, *, poll_s: float = 0.01, give_up: Any = None
    ) -> Assignment | None:
        """Poll until an assignment newer than ``after_generation`` appears (None if ``give_up()``)."""
        while True:
            a = self.latest_assignment(after_generation)
            if a is not None:
                return a
            if give_up is not None and give_up():
                return None
            time.sleep(poll_s)

    def latest_assignment(self, after_generation: int = -1) -> Assignment | None:
        best = None
        if not self.control.is_dir():
            return None
        for p in self.control.glob("assign-*.json"):
            try:
                g = int(p.stem.split("-", 1)[1])
            except ValueError:
                continue
            if g > after_generation and (best is None or g > best[0]):
                best = (g, p)
        if best is None:
            return None
        return Assignment.from_json(read_json(best[1]))

    def requests(self, after_id: int = 0) -> list[Request]:
        out = []
        if not self.control.is_dir():
            return out
        for p in self.control.glob("request-*.json"):
            try:
                rid = int(p.stem.split("-", 1)[1])
            except ValueError:
                continue
            if rid > after_id:
                out.append(Request.from_json(read_json(p)))
        return sorted(out, key=lambda r: r.id)
