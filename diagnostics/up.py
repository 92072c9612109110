"""`stanchion up`: the whole product on one machine, with real faults if asked.

It starts a coordinator and agents on 127.0.0.1 (fresh mTLS certificates unless --insecure),
prepares the default corpus if needed, submits a job, shows progress live, and (with --chaos SEED)
injects a seeded schedule of real faults: a SIGKILLed rank, a SIGSTOPped (hung) rank, a killed agent
(restarted at once: it adopts the ranks its predecessor left, and training goes on),
a killed and restarted coordinator, a bit flip and a NaN. It ends with a summary: steps, restarts by
reason, recovery times, lost steps, ETTR, final validation loss and sampled text. Every process it
started is stopped on exit and on Ctrl-C.

Schedules (pure functions below, unit-tested without processes):

- ``--chaos SEED`` alone: one fault of each kind (or of each ``--chaos-kinds`` kind), spread over the
  middle of the run (what ``make demo`` shows).
- ``--chaos SEED --fault-every N``: a long run. Faults come every N steps on average (gaps drawn
  uniformly from [N - N//2, N + N//2]) from about step N/2 until N steps (or a fingerprint interval)
  before the end. Kinds are drawn in rounds: each round is a shuffled copy of the chosen kinds
  (repeated up to six faults when fewer kinds are chosen), so every kind appears in every round. Once
  per round, unless ``--no-recovery-faults``, the first crash, hang or agent fault of the round gets
  a **second fault during its recovery**: a crash, agent or coordinator kill that fires as soon as
  the coordinator has started the generation that answers the first one (the generation is forming:
  a rank killed while it heals, a standby's agent killed before it joins, the coordinator killed
  while the generation forms). It counts as landed in the
  recovery when no rank had completed a step of a newer generation yet; when the job recovered before
  it could land, it still fires, as an ordinary fault, and the summary says so (``landed: running``).
  A fault and its second fault form one recovery, measured from the first injection.
- ``--faults FILE``: a JSON list of ``{"kind", "step", "target", "during_recovery"}`` entries (only
  kind and step are required); the summary's ``schedule`` key has this format, so any run can be
  replayed with one command.

Rules that keep every fault meeting a healthy job (so the job must succeed): an ordinary external
fault waits until the job is RUNNING, has made progress since the previous fault and (after a crash,
hang or agent kill) a rank has completed a step of a newer generation; in seeded schedules no fault follows a bit flip before
the next replica-fingerprint check has seen it (``integrity.fingerprint_every``); every injected NaN
is a one-off, so the job's ``hardware_horizon_steps`` is set below the smallest gap between two
scheduled NaNs (two NaNs at different data would otherwise rightly suggest bad hardware and bisect);
``max_restarts`` grows with the schedule. With three or more nodes a bit flip gets its node cordoned;
the injected faults are transient, so ``up`` uncordons such nodes once the job runs again (a repaired
node returning to the pool) and lists them in the summary.

Invariants, checked at the end of every run with faults and reported in the summary and JSON:
the job succeeded; every recovery (injection to the first step of a newer generation, or for a
coordinator kill, to the coordinator answering again) is within ``--recovery-bound-s``; and, unless
``--no-golden``, the final state fingerprint equals that of the same job run without faults on the
same cluster right after (nodes uncordoned, ``min_nodes = nodes`` so it runs at full size).
"""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnostics.localcluster import LocalCluster
from stanchion.files import JsonlTails
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until

EXTERNAL = ("crash", "hang", "agent", "coordinator")  # faults `up` causes from outside the ranks
INTERNAL = ("bitflip", "nan")  # faults the ranks' injector fires (the job spec's schedule)
KINDS = EXTERNAL + INTERNAL
# Faults that may put the job into RECOVERING (a new generation): an agent kill does only when its
# restarted agent cannot adopt the ranks (a generation forming at the store it hosted, or ranks lost).
PRIMARY = ("crash", "hang", "agent")
SECOND = ("crash", "agent", "coordinator")  # faults that can land while a generation forms
FILE_FIELDS = ("kind", "step", "target", "during_recovery")
SETTLE_STEPS = 5  # a crash/hang/agent fault followed by this many steps and no new generation had no effect
# How far ahead of what `up` sees the ranks may be when a fault lands: the polls (0.1-0.25 s), the
# coordinator's answer and the signal, with room for a busy machine.
LEAD_S = 2.0
RUNNING, RECOVERING = 2, 3  # types_pb2.JOB_STATE_RUNNING / JOB_STATE_RECOVERING


class ScheduleError(ValueError):
    """A fault schedule or kind filter that cannot be used; the message names the flag or entry."""


@dataclass
class Fault:
    kind: str
    step: int  # training step at (or after) which it is injected
    target: str = ""  # node id ("" lets `up` pick a member of the job)
    during_recovery: bool = False  # fires while the job recovers from the fault before it
    injected_at: float | None = None  # external: when `up` injected it; internal: when the rank fired it
    generation_before: int = 0
    job_step: int = 0  # the job's step when it was injected
    landed: str = ""  # the job's state when it was injected: running or recovering
    effect: bool = True  # False when there was nothing to hit (no live rank)
    held_back: str = ""  # why it fired later than its step (a bit flip's check window)
    back_at: float | None = None  # coordinator faults: when the coordinator answered again
    recovery_s: float | None = None
    detail: str = ""

    def entry(self) -> dict[str, Any]:
        """The fault as a `--faults FILE` entry."""
        out: dict[str, Any] = {"kind": self.kind, "step": self.step, "target": self.target}
        if self.during_recovery:
            out["during_recovery"] = True
        return out


@dataclass
class UpOptions:
    run_dir: Path
    nodes: int = 2
    spares: int = 1
    workers_per_node: int = 1
    steps: int = 300
    preset: str = "tiny"
    corpus: str = "sotu"
    vocab_size: int = 2048
    chaos: int | None = None
    tls: bool = True
    sets: dict[str, Any] = field(default_factory=dict)
    samples: int = 3
    hang_floor_s: float = 5.0
    chaos_kinds: tuple[str, ...] = KINDS
    fault_every: int | None = None  # None: one fault of each kind (the demo schedule)
    recovery_faults: bool = True  # with fault_every: one second fault during a recovery per round
    faults: list[Fault] | None = None  # an explicit schedule (--faults FILE) instead of a seeded one
    faults_source: str = ""
    recovery_bound_s: float = 60.0
    golden: bool = True  # compare the final state with a fault-free run (runs with faults only)
    entrypoint: str = ""  # a user's SDK program (a .py file or a module) instead of the built-in trainer
    entry_args: tuple[str, ...] = ()  # its arguments (``--steps N`` is appended)


ENTRYPOINT_NAME = "user"  # what the local agents call the program given to --entrypoint


def entrypoint_target(text: str) -> str:
    """``--entrypoint``'s program as an agent's allow-list takes it: an absolute script path or a
    module name."""
    if text.endswith(".py"):
        path = Path(text).resolve()
        if not path.is_file():
            raise ScheduleError(f"--entrypoint {text}: no such file")
        return str(path)
    if not all(part.isidentifier() for part in text.split(".")):
        raise ScheduleError(f"--entrypoint {text}: expected a .py file or a dotted module name")
    return text


# -- schedules (pure) ----------------------------------------------------------------------------------
def parse_kinds(text: str) -> tuple[str, ...]:
    """``--chaos-kinds crash,bitflip`` -> the kinds, in canonical order; unknown names are refused."""
    names = [k.strip().lower() for k in text.split(",") if k.strip()]
    if not names:
        raise ScheduleError(
            f"--chaos-kinds {text!r}: name at least one kind; valid kinds: {', '.join(KINDS)}"
        )
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise ScheduleError(
            f"--chaos-kinds: unknown kind{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid kinds: {', '.join(KINDS)}"
        )
    return tuple(k for k in KINDS if k in names)


def next_check(step: int, every: int) -> int:
    """The first replica-fingerprint check strictly after ``step`` (checks run every ``every`` steps)."""
    return (step // every + 1) * every


def flip_answered(step: int, every: int) -> int:
    """The step by which a bit flip at ``step`` has been checked and answered: the next fingerprint check,
    plus the steps its verdict and the rollback decision take."""
    return next_check(step, every) + 3


def held_back_until(rank_step: int, flips: Iterable[int], check_every: int, lead: int) -> int | None:
    """The step an external fault must wait for, or None when it may fire at ``rank_step``. A crash or
    hang between a bit flip and its fingerprint check erases the flip unseen (the flipped replica dies,
    or the survivors go back before it to heal), so the flip would be reported undetected. The ranks
    run ahead of what `up` sees by up to ``lead`` steps, so the window opens that much before the flip."""
    if check_every <= 0:
        return None  # no fingerprint checks: a flip is never seen, nothing to keep apart
    ends = [
        flip_answered(b, check_every) for b in flips if b - lead <= rank_step < flip_answered(b, check_every)
    ]
    return max(ends, default=None)


def _after_bitflips(faults: list[Fault], check_every: int) -> list[Fault]:
    """No fault before the fingerprint check that sees a bit flip: an undetected flip is an unhealthy job
    (a replacement healed from the flipped replica would carry the flip on)."""
    not_before = 0
    for f in faults:
        if not f.during_recovery:
            f.step = max(f.step, not_before)
        if f.kind == "bitflip" and check_every > 0:
            not_before = flip_answered(f.step, check_every)
    return faults


def chaos_schedule(
    seed: int,
    steps: int,
    nodes: list[str],
    *,
    kinds: tuple[str, ...] = KINDS,
    fault_every: int | None = None,
    check_every: int = 20,
    recovery_faults: bool = True,
) -> list[Fault]:
    """The seeded schedule, in step order.

    Without ``fault_every``: one fault of each kind, at seeded, spread-out steps in the middle of the
    run. With it: about one fault every ``fault_every`` steps, kinds drawn in shuffled rounds (every kind
    in every round), and once per round a second fault during the recovery from a crash, hang or agent
    fault (``recovery_faults``); a round has at least ``len(KINDS)`` faults (a single chosen kind
    repeats six times). The same arguments always give the same schedule.
    """
    rng = random.Random(seed)
    chosen = [k for k in KINDS if k in kinds]
    if not chosen:
        raise ScheduleError(f"no fault kinds chosen; valid kinds: {', '.join(KINDS)}")
    if fault_every is None:
        rng.shuffle(chosen)
        lo, hi = int(steps * 0.12), int(steps * 0.85)
        span = (hi - lo) // len(chosen)
        out = []
        for i, kind in enumerate(chosen):
            step = lo + i * span + rng.randrange(max(1, span // 2))
            out.append(Fault(kind, step, rng.choice(nodes)))
        return _after_bitflips(out, check_every)
    if fault_every < 2:
        raise ScheduleError(f"--fault-every {fault_every}: must be at least 2 steps")
    lo = max(8, fault_every // 2)
    hi = steps - max(fault_every, check_every + 5 if "bitflip" in chosen and check_every > 0 else 0, 5)
    if hi < lo:
        raise ScheduleError(
            f"--steps {steps} is too short for --fault-every {fault_every}: faults start at step {lo} and "
            f"must leave {steps - hi} steps at the end"
        )
    primaries = [k for k in chosen if k in PRIMARY]
    seconds = [k for k in chosen if k in SECOND]
    pairs = recovery_faults and bool(primaries) and bool(seconds)
    out: list[Fault] = []
    bag: list[str] = []
    pair_left = False
    not_before = 0
    step = lo + rng.randrange(max(1, fault_every // 2))
    while True:
        if not bag:  # a round: every chosen kind equally often, at least len(KINDS) faults
            bag = chosen * -(-len(KINDS) // len(chosen))
            rng.shuffle(bag)
            pair_left = pairs
        kind = bag.pop()
        step = max(step, not_before)
        if step > hi:
            break
        out.append(Fault(kind, step, rng.choice(nodes)))
        if pair_left and kind in PRIMARY:
            out.append(Fault(rng.choice(seconds), step, rng.choice(nodes), during_recovery=True))
            pair_left = False
        if kind == "bitflip" and check_every > 0:
            not_before = flip_answered(step, check_every)
        step += rng.randint(fault_every - fault_every // 2, fault_every + fault_every // 2)
    return out


def parse_faults(entries: Any, *, steps: int, nodes: list[str], where: str = "faults") -> list[Fault]:
    """Validate a `--faults FILE` schedule (a JSON list); errors name the entry and the field."""
    if not isinstance(entries, list):
        raise ScheduleError(f"{where}: expected a JSON list of fault entries, got {type(entries).__name__}")
    out: list[Fault] = []
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise ScheduleError(f"{at}: expected an object with kind and step, got {type(e).__name__}")
        unknown = sorted(set(e) - set(FILE_FIELDS))
        if unknown:
            raise ScheduleError(
                f"{at}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"fields: {', '.join(FILE_FIELDS)}"
            )
        kind = e.get("kind")
        if kind not in KINDS:
            what = "missing" if "kind" not in e else f"{kind!r} is not a fault kind"
            raise ScheduleError(f"{at}.kind: {what}; valid kinds: {', '.join(KINDS)}")
        step = e.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            what = "missing" if "step" not in e else f"expected an integer, got {step!r}"
            raise ScheduleError(f"{at}.step: {what}")
        if not 0 <= step < steps:
            raise ScheduleError(f"{at}.step: {step} is outside the run (0 <= step < --steps {steps})")
        target = e.get("target", "")
        if not isinstance(target, str) or (target and target not in nodes):
            raise ScheduleError(f"{at}.target: {target!r} is not a node of this run ({', '.join(nodes)})")
        during = e.get("during_recovery", False)
        if not isinstance(during, bool):
            raise ScheduleError(f"{at}.during_recovery: expected true or false, got {during!r}")
        if during and kind not in SECOND:
            raise ScheduleError(
                f"{at}.during_recovery: a {kind} fault cannot be timed to a recovery; "
                f"use one of {', '.join(SECOND)}"
            )
        out.append(Fault(kind, step, target, during_recovery=during))
    order = sorted(range(len(out)), key=lambda i: out[i].step)  # stable: file order breaks ties
    prev: int | None = None
    for i in order:
        f = out[i]
        if f.kind not in EXTERNAL:
            continue
        if f.during_recovery and (prev is None or out[prev].kind not in PRIMARY or out[prev].during_recovery):
            before = "nothing" if prev is None else f"{where}[{prev}] ({out[prev].entry()})"
            raise ScheduleError(
                f"{where}[{i}].during_recovery: must follow a crash, hang or agent fault at or before "
                f"step {f.step} (it follows {before})"
            )
        prev = i
    return [out[i] for i in order]


def load_faults(path: Path, *, steps: int, nodes: list[str]) -> list[Fault]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ScheduleError(f"--faults {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ScheduleError(f"--faults {path}: not valid JSON ({e})") from None
    return parse_faults(data, steps=steps, nodes=nodes, where=f"{path}: faults")


def nan_horizon(faults: list[Fault]) -> int | None:
    """``hardware_horizon_steps`` that keeps every scheduled NaN a one-off (None: fewer than two)."""
    steps = sorted(f.step for f in faults if f.kind == "nan")
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    return max(1, min(gaps) - 1) if gaps else None


def restart_budget(faults: list[Fault], default: int = 50) -> int:
    """``max_restarts`` for a schedule: each external fault may cost a couple of restarts."""
    return min(10_000, max(default, 3 * sum(f.kind in EXTERNAL for f in faults) + 10))


def check_recoveries(faults: list[Fault], bound_s: float) -> dict[str, Any]:
    """The recovery-bound invariant over the injected external faults' measured recoveries."""
    measured = [f for f in faults if f.recovery_s is not None]
    over = [
        {"kind": f.kind, "step": f.step, "target": f.target, "recovery_s": f.recovery_s}
        for f in measured
        if f.recovery_s > bound_s  # type: ignore[operator]
    ]
    unmeasured = [
        {"kind": f.kind, "step": f.step, "detail": f.detail}
        for f in faults
        if f.kind in EXTERNAL and f.injected_at is not None and f.effect and f.recovery_s is None
    ]
    return {
        "ok": not over,
        "bound_s": bound_s,
        "measured": len(measured),
        "worst_s": max((f.recovery_s for f in measured), default=None),  # type: ignore[type-var]
        "over": over,
        "unmeasured": unmeasured,
    }


def measure_recoveries(faults: list[Fault], records: list[dict[str, Any]]) -> None:
    """Set each injected external fault's ``recovery_s``: from its injection to the first step (any rank's
    progress record) of a generation newer than the one it hit, before the next fault that is not a
    second fault during its recovery (so a fault followed by one during its recovery is measured to the
    first step after both). A coordinator kill: until the coordinator answered again."""
    import bisect

    injected = sorted(
        (f for f in faults if f.kind in EXTERNAL and f.injected_at is not None),
        key=lambda f: f.injected_at,  # type: ignore[arg-type,return-value]
    )
    recs = sorted((r for r in records if "t" in r), key=lambda r: r["t"])
    times = [r["t"] for r in recs]
    for i, f in enumerate(injected):
        assert f.injected_at is not None
        f.recovery_s = None
        if f.kind == "coordinator":
            if f.back_at is not None:
                f.recovery_s = round(f.back_at - f.injected_at, 3)
            continue
        if not f.effect:
            continue
        nxt = next((g for g in injected[i + 1 :] if not g.during_recovery), None)
        until = nxt.injected_at if nxt is not None and nxt.injected_at is not None else math.inf
        for r in recs[bisect.bisect_right(times, f.injected_at) :]:
            if r["t"] >= until:
                break
            if r.get("generation", 0) > f.generation_before:
                f.recovery_s = round(r["t"] - f.injected_at, 3)
                break


class _ProgressTail:
    """One job's progress records, read incrementally (a long run writes thousands): rank 0's latest, and
    the newest generation any rank completed a step in. The files are read by the kernel's
    :class:`~stanchion.files.JsonlTails` (a torn last line waits for the next poll)."""

    def __init__(self, run_root: Path):
        self.tails = JsonlTails(run_root, "workers/*/w*/progress.jsonl")
        self.latest: dict[str, Any] | None = None
        self.generation = 0  # the newest generation with a completed step

    def poll(self, job_id: str) -> dict[str, Any] | None:
        for r in self.tails.read():
            if r.get("job_id") != job_id:
                continue
            self.generation = max(self.generation, int(r.get("generation", 0)))
            if r.get("rank") == 0 and (self.latest is None or r.get("t", 0) >= self.latest.get("t", 0)):
                self.latest = r
        return self.latest


class Up:
    def __init__(self, opts: UpOptions, console: Any):
        self.o = opts
        self.console = console
        target = entrypoint_target(opts.entrypoint) if opts.entrypoint else ""
        if target and opts.sets:
            raise ScheduleError(
                "--set changes the built-in trainer's config: pass your program's own flags instead"
            )
        self.cluster = LocalCluster(
            opts.run_dir,
            tls=opts.tls,
            hang_floor_s=opts.hang_floor_s,
            stop_grace_s=15.0,
            heartbeat_timeout_s=10.0,
            entrypoints={ENTRYPOINT_NAME: target} if target else None,
        )
        self.nodes = [f"node-{i}" for i in range(opts.nodes)]
        self.spares = [f"spare-{i}" for i in range(opts.spares)]
        self.data_name = (
            f"{opts.corpus}-{opts.vocab_size}"
            if opts.corpus in ("sotu", "fixture")
            else f"corpus-{opts.vocab_size}"
        )
        # The layout must fit before anything starts (a bad --set or a batch that does not divide over
        # the nodes names its key here, not as a refused submission after every daemon started).
        self.faults: list[Fault] = []
        self.check_every = self._check_every()
        if not opts.entrypoint:
            self._job_spec(()).train_config().check_world(opts.nodes * opts.workers_per_node)
        if opts.faults is not None:
            self.faults = list(opts.faults)
        elif opts.chaos is not None:
            self.faults = chaos_schedule(
                opts.chaos,
                opts.steps,
                self.nodes,
                kinds=opts.chaos_kinds,
                fault_every=opts.fault_every,
                check_every=self.check_every,
                recovery_faults=opts.recovery_faults,
            )
        self.internal = [f for f in self.faults if f.kind in INTERNAL]  # in job-spec order (their ids)
        self.external = [f for f in self.faults if f.kind in EXTERNAL]  # in injection order
        self.job_id = ""
        self.seen_decisions = 0
        self.seen_adoptions = 0
        self.awaiting_adoption = False  # an agent was killed: say when its successor adopts the ranks
        self.started = 0.0
        self.finished = 0.0
        self.uncordoned: list[dict[str, str]] = []
        self.tail = _ProgressTail(self.cluster.run_root)

    # -- setting up ---------------------------------------------------------------------------------
    def _check_every(self) -> int:
        """Steps between replica fingerprint checks (a bit flip is seen at the next one)."""
        if self.o.entrypoint:  # a user's program: the guard's default
            from stanchion.sdk.protections import Protections

            return Protections().fingerprint_every
        return self._job_spec(()).train_config().integrity.fingerprint_every

    def prepare_data(self) -> Path | None:
        from trainer.data import prepare

        if self.o.entrypoint:
            return None  # the program brings its own data

        out = self.cluster.data_root / self.data_name
        if not (out / "meta.json").exists():
            self.say(f"preparing the {self.o.corpus} corpus (vocab {self.o.vocab_size}) in {out}")
            prepare(self.o.corpus, self.o.vocab_size, out, progress=lambda m: None)
        return out

    def _job_spec(
        self, faults: tuple[dict[str, Any], ...], *, name: str = "demo", golden: bool = False
    ) -> Any:
        from coordinator.jobspec import JobSpec
        from stanchion.settings import merge

        trainer = merge(
            {"preset": self.o.preset, "steps": self.o.steps, "data": {"path": self.data_name}}, self.o.sets
        )
        extra: dict[str, Any] = {}
        if golden:
            extra["min_nodes"] = self.o.nodes  # the reference runs at full size, never shrunk
        elif self.faults:
            extra["max_restarts"] = restart_budget(self.faults)
            horizon = nan_horizon(self.faults)
            if horizon is not None:
                extra["hardware_horizon_steps"] = horizon
        if self.o.entrypoint:
            extra.update(entrypoint=ENTRYPOINT_NAME, args=(*self.o.entry_args, "--steps", str(self.o.steps)))
            trainer = {}
        return JobSpec(
            name=name,
            nodes=self.o.nodes,
            min_nodes=extra.pop("min_nodes", 1),
            workers_per_node=self.o.workers_per_node,
            faults=faults,
            trainer=trainer,
            **extra,
        )

    def spec(self, *, golden: bool = False) -> str:
        from coordinator.jobspec import MAX_SPEC_BYTES, to_toml

        faults = []
        for f in [] if golden else self.internal:
            rank = self.nodes.index(f.target) * self.o.workers_per_node if f.target in self.nodes else 0
            if f.kind == "nan":
                faults.append({"kind": "nan", "step": f.step, "rank": rank})
            elif f.kind == "bitflip":
                faults.append({"kind": "bitflip", "step": f.step, "rank": rank, "target": "param", "bit": 24})
        spec = self._job_spec(tuple(faults), name="golden" if golden else "demo", golden=golden)
        if not self.o.entrypoint:
            spec.train_config()  # a bad --set names its key before anything starts
        text = to_toml(spec)
        if len(text.encode()) > MAX_SPEC_BYTES:
            raise ScheduleError(
                f"the schedule's {len(faults)} bitflip/nan faults do not fit in one job spec "
                f"({MAX_SPEC_BYTES} bytes): use a larger --fault-every or fewer --steps"
            )
        return text

    def start(self) -> None:
        c = self.cluster
        import shutil

        # A fresh cluster every time: the prepared data is kept, state, runs and logs are not.
        for stale in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
            (c.root / stale).unlink(missing_ok=True)
        for d in ("runs", "logs"):
            shutil.rmtree(c.root / d, ignore_errors=True)
            (c.root / d).mkdir(parents=True)
        if self.o.tls:
            c.init_tls(self.nodes + self.spares)
        c.start_coordinator()
        self.say(
            f"coordinator on {c.address} ({'mTLS' if self.o.tls else 'plaintext'}), metrics on :{c.metrics_port}"
        )
        for n in self.nodes:
            c.start_agent(n, workers=self.o.workers_per_node)
        for s in self.spares:
            c.start_agent(s, workers=self.o.workers_per_node, spare=True)
        self.say(
            f"agents: {', '.join(self.nodes)}"
            + (f"; spares: {', '.join(self.spares)}" if self.spares else "")
        )

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)  # reasons quote errors: "[...]"

    def describe_schedule(self) -> str:
        if not self.faults:
            return ""
        where = (
            f"chaos seed {self.o.chaos}" if self.o.faults is None else f"faults from {self.o.faults_source}"
        )
        if len(self.faults) <= 12:
            return f", {where}: " + ", ".join(
                f"{f.kind}@{f.step}" + ("(during its recovery)" if f.during_recovery else "")
                for f in self.faults
            )
        counts = {k: sum(f.kind == k for f in self.faults) for k in KINDS}
        second = sum(f.during_recovery for f in self.faults)
        return (
            f", {where}: {len(self.faults)} faults ("
            + ", ".join(f"{k} {n}" for k, n in counts.items() if n)
            + f"; {second} of them during a recovery), the first at step {self.faults[0].step}"
        )

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.prepare_data()
        spec = self.spec()
        self.start()
        self.cluster.wait_warm()
        self.job_id = self.cluster.submit(spec)
        self.started = time.time()
        what = self.o.entrypoint or f"the {self.o.preset} preset"
        self.say(
            f"job {self.job_id}: {self.o.steps} steps of {what} on {self.o.nodes} node(s)"
            + self.describe_schedule()
        )
        job = self.watch()
        self.finished = time.time()
        out = self.summary(job)
        if self.faults:
            out["invariants"] = self.invariants(out)
            out["invariants_ok"] = all(v["ok"] is not False for v in out["invariants"].values())
        return out

    def watch(self) -> Any:
        from protos.stanchion.v1 import types_pb2

        live = _Display(self) if self.console.is_terminal else None
        last_print = 0
        last_explain = last_tail = 0.0
        prev_state = ""
        rec = None
        try:
            if live:
                live.start()
            while True:
                try:
                    job = self.cluster.job(self.job_id)
                except Exception:  # noqa: BLE001 - the coordinator may be restarting (chaos)
                    time.sleep(0.2)
                    continue
                now = time.time()
                for f in self.external:
                    if f.kind == "coordinator" and f.injected_at is not None and f.back_at is None:
                        f.back_at = now  # it answers again
                state = types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
                if state != prev_state or now - last_explain >= 1.0:
                    self.new_decisions()
                    last_explain = now
                if prev_state == "recovering" and state == "running":
                    self.repair()
                prev_state = state
                if state in ("succeeded", "failed", "cancelled"):
                    return job
                self.inject(job)
                if now - last_tail >= 0.25:  # a faster poll (a second fault waiting) needs no progress
                    rec, last_tail = self.tail.poll(self.job_id), now
                if live:
                    live.update(job, state, rec)
                elif rec and rec.get("step", 0) >= last_print + 25:
                    last_print = rec["step"]
                    self.say(
                        f"step {rec['step']:>5}/{self.o.steps}  loss {rec['loss']:.4f}  "
                        f"{rec.get('tokens_per_s', 0):,.0f} tok/s  gen {job.generation}  {state}"
                        + (f"  faults {self.injected_count()}/{len(self.external)}" if self.external else "")
                    )
                time.sleep(0.1 if self._armed() else 0.25)
        finally:
            if live:
                live.stop()

    def injected_count(self) -> int:
        return sum(f.injected_at is not None for f in self.external)

    def _pending(self) -> tuple[Fault | None, Fault | None]:
        """The next external fault to inject and the one injected before it."""
        prev = None
        for f in self.external:
            if f.injected_at is None:
                return f, prev
            prev = f
        return None, prev

    def _armed(self) -> bool:
        """A second fault is waiting for the recovery its predecessor causes: poll faster."""
        f, prev = self._pending()
        return f is not None and f.during_recovery and prev is not None

    def new_decisions(self) -> None:
        try:
            decisions = self.cluster.explain(self.job_id).decisions
        except Exception:  # noqa: BLE001 - the coordinator may be restarting
            return
        for d in decisions[self.seen_decisions :]:
            if "checkpoint at step" in d.reason and "is good" in d.reason:
                continue  # routine; `stanchion job explain` lists them all
            self.say(f"[{time.strftime('%H:%M:%S')}] gen {d.generation}: {d.reason}")
        self.seen_decisions = len(decisions)
        if self.awaiting_adoption:  # not a decision: the coordinator records it as an event
            try:
                adoptions = self._adoptions()
            except Exception:  # noqa: BLE001 - the coordinator may be restarting
                return
            for a in adoptions[self.seen_adoptions :]:
                self.say(f"[{time.strftime('%H:%M:%S')}] {a.reason}")
                self.awaiting_adoption = False
            self.seen_adoptions = len(adoptions)

    def repair(self) -> None:
        """Injected faults are transient: a node cordoned for one (a bit flip's replica with three or more
        nodes) returns to the pool once the job runs again, as a repaired node would."""
        if not self.faults:
            return
        from protos.stanchion.v1 import operator_pb2, types_pb2

        try:
            for n in self.cluster.nodes():
                if n.state == types_pb2.NODE_STATE_CORDONED:
                    self.cluster.rpc("UncordonNode", operator_pb2.UncordonNodeRequest(node_id=n.node_id))
                    self.uncordoned.append({"node": n.node_id, "reason": n.reason})
                    self.say(f"[{time.strftime('%H:%M:%S')}] chaos: uncordoned {n.node_id} ({n.reason})")
        except Exception:  # noqa: BLE001 - the coordinator may be restarting; try at the next recovery
            return

    def _stepped_since(self, prev: Fault) -> bool:
        """Has a rank completed a step in a generation newer than the one ``prev`` hit? (The progress files
        say so first; the coordinator's RUNNING may come from a heartbeat that reports the new generation
        with a step computed in the old one.)"""
        return self.tail.poll(self.job_id) is not None and self.tail.generation > prev.generation_before

    def _settled(self, prev: Fault, job: Any) -> bool:
        """Has the job got over ``prev``? Progress since it, and a step of a newer generation after a rank
        fault."""
        if not prev.effect:
            return True
        if job.step <= prev.job_step:
            return False
        if prev.kind in PRIMARY and not self._stepped_since(prev):
            if job.step < prev.job_step + SETTLE_STEPS:
                return False
            prev.effect = False  # training went on in the same generation: nothing was hit
            prev.detail += (
                "; its ranks were adopted: no new generation"
                if prev.kind == "agent"
                else "; no new generation followed"
            )
        return True

    def _held_back(self, f: Fault) -> bool:
        """Keep ``f`` out of a bit flip's window between the flip and its check (see held_back_until)."""
        flips = [g.step for g in self.internal if g.kind == "bitflip"]
        if not flips:
            return False
        rec = self.tail.poll(self.job_id)
        rank_step = int(rec["step"]) if rec else 0
        step_s = float(rec.get("step_time_s") or 0) if rec else 0.0
        lead = 2 + (math.ceil(LEAD_S / step_s) if step_s > 0 else 0)
        until = held_back_until(rank_step, flips, self.check_every, lead)
        if until is not None and not f.held_back:
            f.held_back = f"held back at step {rank_step} until step {until}: a bit flip's check window"
        return until is not None

    def inject(self, job: Any) -> None:
        f, prev = self._pending()
        if f is None:
            return
        if f.during_recovery and prev is not None:
            moved_on = job.generation > prev.generation_before  # the coordinator started a new generation
            if not ((moved_on and job.state in (RUNNING, RECOVERING)) or self._settled(prev, job)):
                return
            # landed in the recovery unless a step of a newer generation was already completed
            landed = "running" if not prev.effect or self._stepped_since(prev) else "recovering"
        else:
            if job.state != RUNNING or job.step < f.step:  # only while RUNNING: it meets a healthy job
                return
            if prev is not None and not self._settled(prev, job):
                return
            landed = "running"
        if not self._held_back(f):
            self._fire(f, job, landed)

    def _live_rank(self, job: Any, f: Fault) -> tuple[str, dict[str, Any]] | None:
        """A live rank of the job's current generation, on the target first, then on other members."""
        for node in [f.target, *(n for n in job.nodes if n != f.target)]:
            ranks = [r for r in self.cluster.ranks(node) if r["generation"] == job.generation]
            if ranks:
                return node, ranks[0]
        return None

    def _fire(self, f: Fault, job: Any, landed: str) -> None:
        c = self.cluster
        if job.nodes and f.target not in job.nodes:  # the node left the job (replaced earlier): hit a member
            f.target = job.nodes[len(f.kind) % len(job.nodes)]
        if f.kind in ("crash", "hang"):
            found = self._live_rank(job, f)
            if found is None:
                if landed == "recovering":
                    return  # the forming generation has no rank yet: look again at the next poll
                f.effect, f.detail = False, "no live rank found"
            else:
                f.target, rank = found
                sig = signal.SIGKILL if f.kind == "crash" else signal.SIGSTOP
                f.injected_at = time.time()
                c.signal_pid(rank["pid"], sig)
                f.detail = f"{'SIGKILL' if f.kind == 'crash' else 'SIGSTOP'} rank {rank['rank']} (pid {rank['pid']}) on {f.target}"
        f.injected_at = f.injected_at or time.time()
        f.generation_before, f.job_step, f.landed = job.generation, job.step, landed
        if f.kind == "agent":
            c.kill_agent(f.target)
            f.detail = f"SIGKILL the agent of {f.target} (its ranks train on)"
            c.restart_agent(f.target)  # as systemd would; it adopts the ranks its predecessor left
            self.awaiting_adoption = True
        elif f.kind == "coordinator":
            c.kill_coordinator()
            f.detail = "SIGKILL the coordinator, then restart it on the same state"
            c.start_coordinator()
        when = f"while generation {job.generation} forms" if landed == "recovering" else f"at step {job.step}"
        self.say(f"[{time.strftime('%H:%M:%S')}] chaos: {f.detail} {when}")

    # -- the summary -----------------------------------------------------------------------------------
    def summary(self, job: Any) -> dict[str, Any]:
        from protos.stanchion.v1 import types_pb2

        mine = [r for r in self.cluster.progress() if r.get("job_id") == self.job_id]
        recs = [r for r in mine if r.get("rank") == 0]
        steps = job.step
        final = [r for r in recs if r.get("generation") == job.generation]
        step_times = [r["step_time_s"] for r in recs if r.get("step_time_s")]
        median_step = statistics.median(step_times) if step_times else 0.0
        wall = self.finished - self.started
        explain = self.cluster.explain(self.job_id)
        decisions = list(explain.decisions)
        restarts = _restarts_by_reason(self.cluster, self.job_id)
        fired = {
            e.get("id"): e
            for e in self.cluster.events(EventKind.FAULT_INJECTED)
            if e.get("job_id") == self.job_id and e.get("id") is not None
        }
        for i, f in enumerate(self.internal):  # the trainer's own faults: when the rank fired them
            if i in fired:
                f.injected_at = fired[i].get("t")
                f.detail = f"rank {fired[i].get('rank')} at step {fired[i].get('step')}"
        measure_recoveries(self.faults, mine)
        recovery = [f.recovery_s for f in self.faults if f.kind in PRIMARY and f.recovery_s is not None]
        val = None
        finished = [e for e in self.cluster.events(EventKind.FINISHED) if e.get("job_id") == self.job_id]
        if finished:
            val = finished[-1].get("val_loss")
        alarms = [
            e
            for kind in (EventKind.NONFINITE, EventKind.FINGERPRINT_MISMATCH)
            for e in self.cluster.events(kind)
            if e.get("job_id") == self.job_id
        ]
        detected = self._detected(decisions + self._adoptions(), alarms)
        meta_path = self.cluster.data_root / self.data_name / "meta.json"
        meta = {} if self.o.entrypoint else json.loads(meta_path.read_text())
        out = {
            "job_id": self.job_id,
            "state": types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
            "steps_completed": steps,
            "steps_computed": len(recs),
            "lost_steps": max(0, len(recs) - steps),
            "final_fingerprint": job.final_fingerprint,
            "restarts": restarts,
            "schedule": [f.entry() for f in self.faults],
            "schedule_source": (
                {"file": self.o.faults_source}
                if self.o.faults is not None
                else {
                    "seed": self.o.chaos,
                    "kinds": list(self.o.chaos_kinds),
                    "fault_every": self.o.fault_every,
                    "recovery_faults": self.o.recovery_faults,
                }
                if self.o.chaos is not None
                else None
            ),
            "faults_scheduled": len(self.faults),
            "faults_fired": sum(f.injected_at is not None for f in self.faults),
            "faults_by_kind": {
                k: {
                    "scheduled": sum(f.kind == k for f in self.faults),
                    "fired": sum(f.kind == k and f.injected_at is not None for f in self.faults),
                }
                for k in KINDS
                if any(f.kind == k for f in self.faults)
            },
            "second_faults": {
                "scheduled": sum(f.during_recovery for f in self.faults),
                "landed_in_recovery": sum(
                    f.during_recovery and f.landed == "recovering" for f in self.faults
                ),
                "landed_after_recovery": sum(
                    f.during_recovery and f.landed == "running" for f in self.faults
                ),
            },
            "faults_injected": [
                {
                    "kind": f.kind,
                    "step": f.step,
                    "target": f.target,
                    "detail": f.detail,
                    "fired": f.injected_at is not None,
                    "during_recovery": f.during_recovery,
                    "landed": f.landed,
                    "held_back": f.held_back,
                    "recovery_s": f.recovery_s,
                }
                for f in self.faults
                if f.injected_at is not None or f.kind in INTERNAL
            ],
            "faults_detected": detected,
            "recovery_seconds": recovery,
            "coordinator_recovery_seconds": _coordinator_recoveries(decisions),
            "uncordoned": self.uncordoned,
            "wall_seconds": round(wall, 2),
            "median_step_seconds": median_step,
            "ettr": round(min(1.0, steps * median_step / wall), 4) if wall > 0 else None,
            "final_val_loss": val,
            "unigram_entropy_nats": meta.get("unigram_entropy_nats"),
            "generations": job.generation,
            "final_generation_steps": len(final),
        }
        ckpts = sorted((self.cluster.run_root / self.job_id / "checkpoints").glob("step-*"))
        out["samples"] = []
        if self.o.samples and ckpts and out["state"] == "succeeded" and not self.o.entrypoint:
            from trainer.sample import sample_lines

            out["samples"] = sample_lines(ckpts[-1], self.o.samples)
        return out

    def _adoptions(self) -> list[Any]:
        """A restarted agent's adoption of its node's ranks, as a decision-like record (what answered
        an agent kill when no new generation was needed)."""
        from types import SimpleNamespace

        from stanchion.vocab import CoordinatorEventKind

        return [
            SimpleNamespace(
                time=e.time,
                reason=f"the restarted agent of {e.node_id} adopted its ranks "
                f"{json.loads(e.detail_json).get('ranks')}: training went on in generation {e.generation}",
            )
            for e in self.cluster.job_events(self.job_id)
            if e.kind == CoordinatorEventKind.RANKS_ADOPTED
        ]

    def _detected(self, decisions: list[Any], alarms: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Each fault and whether the system saw it: a coordinator decision answering it or, for a
        NaN or a bit flip, the ranks' own detector event (``alarms``) when a rollback already under
        way for an earlier alarm replays past it, so that no decision of its own was needed."""
        signs = {
            "crash": ("crashed",),
            "hang": ("hung",),
            # a killed agent's restarted successor adopts its ranks, or reports them gone (a new
            # generation), or the node is declared lost
            "agent": ("adopted", "lost", "went silent", "its agent restarted"),
            "coordinator": ("coordinator restarted",),
            "nan": ("nonfinite",),
            "bitflip": ("replica fingerprints",),
        }

        # A fault's answer comes before the next fault of its family is injected (the next external
        # fault waits for the job to get over it; the second fault during a recovery comes after the
        # first one's answer by construction). The ranks fire NaNs and bit flips themselves, on their
        # own schedule, so one may land while an external fault is being answered: the families'
        # signs never overlap, so each is only bounded by faults of its own family.
        def family(kind: str) -> str:
            return "external" if kind in EXTERNAL else kind

        out = []
        for f in self.faults:
            if f.kind in EXTERNAL and f.injected_at is None:
                continue  # the job finished before its turn came
            since = f.injected_at if f.injected_at is not None else 0.0  # an unfired trainer fault: any time
            times = [
                g.injected_at
                for g in self.faults
                if g.injected_at is not None and family(g.kind) == family(f.kind) and g.injected_at > since
            ]
            until = min(times, default=math.inf)
            if f.kind == "bitflip":
                until = math.inf  # seen at the next fingerprint check, which may come after a NaN
            hits = [
                d.reason
                for d in decisions
                if since <= d.time < until and any(s in d.reason for s in signs[f.kind])
            ]
            if not hits and f.kind in INTERNAL:
                event = {"nan": EventKind.NONFINITE, "bitflip": EventKind.FINGERPRINT_MISMATCH}[f.kind]
                hits = [
                    f"detected by rank {a.get('rank')}: {a['event']} at step {a.get('step')} "
                    "(no decision of its own: the coordinator was answering an earlier alarm)"
                    for a in alarms
                    if a.get("event") == event and a.get("step", -1) >= f.step and a.get("t", 0) >= since
                ]
            out.append(
                {
                    "kind": f.kind,
                    "step": f.step,
                    "detected": bool(hits),
                    "decision": hits[0] if hits else "",  # whole: what was decided comes last
                }
            )
        return out

    # -- the invariants ------------------------------------------------------------------------------
    def invariants(self, summary: dict[str, Any]) -> dict[str, Any]:
        ok = summary["state"] == "succeeded"
        out: dict[str, Any] = {
            "job_succeeded": {
                "ok": ok,
                "detail": summary["state"] if ok else f"{summary['state']}: {self._job_reason()}",
            },
            "recoveries_within_bound": check_recoveries(self.external, self.o.recovery_bound_s),
        }
        if not self.o.golden:
            golden: dict[str, Any] = {"ok": None, "detail": "not checked (--no-golden)"}
        elif not ok:
            golden = {"ok": None, "detail": "not checked: the job did not succeed"}
        else:
            golden = self.golden(summary)
        out["final_state_matches_fault_free"] = golden
        return out

    def _job_reason(self) -> str:
        try:
            return str(self.cluster.job(self.job_id).reason)[:300]
        except Exception:  # noqa: BLE001
            return "(reason unavailable)"

    def golden(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The same job without faults, on the same cluster, right after: its final fingerprint."""
        from protos.stanchion.v1 import types_pb2

        self.repair()  # the reference runs on the whole pool, at full size
        self.say("fault-free reference run of the same job, to compare final states")
        started = time.time()
        job_id = self.cluster.submit(self.spec(golden=True))
        timeout_s = 120 + 2 * max(summary["wall_seconds"], 60)
        last_print = 0
        job: Any = None

        def finished() -> str | None:
            """The reference job's final state once it has one; its progress on the way there."""
            nonlocal job, last_print
            try:
                job = self.cluster.job(job_id)
            except Exception:  # noqa: BLE001 - a transient RPC failure
                return None
            state = types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            if state in ("succeeded", "failed", "cancelled"):
                return state
            if job.step >= last_print + max(25, self.o.steps // 10):
                last_print = job.step
                self.say(f"reference step {job.step:>5}/{self.o.steps}  {state}")
            return None

        try:
            state = wait_until(finished, timeout_s, "the fault-free reference run to end", interval_s=0.5)
        except TimeoutError:
            state = "timed out"
        res: dict[str, Any] = {
            "fingerprint": summary["final_fingerprint"],
            "fault_free_job_id": job_id,
            "fault_free_fingerprint": job.final_fingerprint if job is not None else "",
            "fault_free_wall_seconds": round(time.time() - started, 2),
        }
        if state != "succeeded":
            reason = job.reason[:200] if job is not None else ""
            return {
                **res,
                "ok": False,
                "detail": f"the fault-free run did not succeed ({state}) {reason}".strip(),
            }
        same = bool(job.final_fingerprint) and job.final_fingerprint == summary["final_fingerprint"]
        return {
            **res,
            "ok": same,
            "detail": "equal" if same else "the final state differs from the fault-free run's",
        }


def _restarts_by_reason(cluster: LocalCluster, job_id: str) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(cluster.root / "coordinator.db") as db:
        row = db.execute("SELECT data FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return dict(json.loads(row[0]).get("restarts_by_reason", [])) if row else {}


def _coordinator_recoveries(decisions: list[Any]) -> list[float]:
    import re

    out = []
    for d in decisions:
        m = re.search(r"recovered in ([0-9.]+)s", d.reason)
        if m:
            out.append(float(m.group(1)))
    return out


class _Display:
    """A live panel for terminals (rich)."""

    def __init__(self, up: Up):
        from rich.live import Live

        self.up = up
        self.live = Live(console=up.console, refresh_per_second=4, transient=True)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self, job: Any, state: str, rec: dict[str, Any] | None) -> None:
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        t.add_row("job", self.up.job_id, "state", state, "generation", str(job.generation))
        if rec:
            t.add_row(
                "step",
                f"{rec['step']}/{self.up.o.steps}",
                "loss",
                f"{rec['loss']:.4f}",
                "tokens/s",
                f"{rec.get('tokens_per_s', 0):,.0f}",
            )
        if self.up.external:
            t.add_row(
                "faults", f"{self.up.injected_count()}/{len(self.up.external)} injected", "", "", "", ""
            )
        t.add_row(
            "restarts",
            str(job.restarts),
            "nodes",
            ",".join(job.nodes),
            "elapsed",
            f"{time.time() - self.up.started:.0f}s",
        )
        self.live.update(t)
