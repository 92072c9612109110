"""The pretraining loop.

One optimizer step reads like the spec: set the learning rate; run the micro-steps (forward,
backward, accumulate), auditing a neighbour's micro-batch when due; average gradients across
data-parallel ranks; agree, in one small all-gather, on the loss, on non-finite values, on stop and
rollback requests and on the audit digests; skip a poisoned step; clip; step; then the periodic
checks: replica fingerprints, snapshot, checkpoint, evaluation.

Around the step sits the generation loop. A rank launched by torchrun forms its group once. A rank
launched by a Stanchion agent joins the generation named in its assignment; when a collective fails
(a peer died or hung and was killed) it leaves the broken group, waits for the next assignment and
re-forms in place, keeping its state, so only the lost rank is replaced and it heals from a live
peer instead of from disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from stanchion.files import JsonlWriter, write_json_atomic
from stanchion.vocab import DETECTORS, EventKind, Resume
from trainer import contract, fingerprint
from trainer.audit import audit_verdict, digest_of, grad_digest
from trainer.checkpoint import CheckpointManager
from trainer.config import TrainConfig, replace, to_dict
from trainer.contract import Assignment, WorkerPaths
from trainer.control import Agreement, Cadences, Control
from trainer.data import TokenData, data_index, eval_batches, get_batch
from trainer.faults import Fault, FaultHooks, FaultInjector
from trainer.liveness import LivenessThread
from trainer.model import GPT
from trainer.monitors import SpikeDetector, group_norms
from trainer.optim import build_optimizer, lr_at, reset_state, set_lr
from trainer.parallel import (
    Abandoned,
    CollectiveFailed,
    GradSync,
    Topology,
    all_gather_rows,
    broadcast_training_state,
    collective,
    env_topology,
    form_group,
    leave_group,
    new_group,
)
from trainer.snapshot import SnapshotRing

log = logging.getLogger(__name__)


class GenerationChange(Exception):
    """Every rank agreed, at the same step, that a newer generation has been assigned."""


class Superseded(Exception):
    """The agent told this waiting rank not to rejoin."""


@dataclass
class RunOptions:
    run_dir: Path
    worker_dir: Path
    faults: list[Fault] | None = None
    resume: str = "auto"  # "auto" (newest good checkpoint), "none", or a checkpoint path
    first_assignment: Assignment | None = None  # agent-managed: the generation to join first
    sample_lines: int = 0
    collective_timeout_s: float = 300.0
    poll_s: float = 0.01


@dataclass
class StepResult:
    record: dict[str, Any]
    stop: bool = False


@dataclass
class Cursor:
    """Everything besides tensors that defines where training is (broadcast when healing)."""

    step: int = 0  # completed optimizer steps
    skip_windows: list[list[int]] = field(default_factory=list)
    tokens: int = 0
    request_id: int = 0  # the newest request handled
    last_agreed_step: int = 0  # newest step whose replica fingerprints agreed

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skip_windows": [list(w) for w in self.skip_windows],
            "tokens": self.tokens,
            "request_id": self.request_id,
            "last_agreed_step": self.last_agreed_step,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cursor:
        return cls(
            int(d.get("step", 0)),
            [list(map(int, w)) for w in d.get("skip_windows", [])],
            int(d.get("tokens", 0)),
            int(d.get("request_id", 0)),
            int(d.get("last_agreed_step", d.get("step", 0))),
        )


class Trainer:
    def __init__(self, cfg: TrainConfig, opts: RunOptions):
        self.opts = opts
        self.paths = WorkerPaths(opts.worker_dir)
        self.paths.control.mkdir(parents=True, exist_ok=True)
        self.progress_out = JsonlWriter(self.paths.progress)
        self.events_out = JsonlWriter(self.paths.events)
        self.flight: deque[dict[str, Any]] = deque(maxlen=cfg.integrity.flight_records)
        self.data = TokenData(cfg.data.path)
        if cfg.model.vocab_size == 0:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=self.data.vocab_size))
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size}); set it to 0 to take the data's"
            )
        self.cfg = cfg
        self.topo: Topology | None = None
        self.job_id = ""  # set by an agent's assignment
        self.cursor = Cursor()
        self.has_state = False  # trained or restored in this process: may serve as a healing source
        self.stop_requested = False
        self.accum = 1
        self.fault_hooks: FaultHooks = FaultHooks()  # a no-op unless the run has a fault schedule
        self.ckpt: CheckpointManager | None = None
        self.snapshots = SnapshotRing(cfg.integrity.snapshots_kept)
        ic = cfg.integrity
        self.cadence = Cadences.of(cfg)
        self.spikes = SpikeDetector(
            window=ic.spike_window,
            min_history=ic.spike_min_history,
            loss_z=ic.spike_loss_z,
            grad_z=ic.spike_grad_z,
            rel_floor=ic.spike_rel_floor,
        )
        self.counters = {"nonfinite": 0, "spikes": 0, "fingerprint_mismatches": 0, "audit_mismatches": 0}
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Build the model now, before any group exists: a standby rank is warm when it is called.
        self.model = GPT(cfg.model)
        self.model.init_weights(cfg.seed)
        self.layer_groups = self.model.layer_groups()
        self.train_model: torch.nn.Module = (
            self.model
        )  # what runs forward (compiled, FSDP-wrapped); self.model holds the names
        self.optimizer: torch.optim.Optimizer | None = None
        self.grad_sync: GradSync | None = None
        self.final_val_loss: float | None = None

    # ------------------------------------------------------------------------------------------
    # Events and records
    def event(self, name: EventKind, **fields: Any) -> None:
        rank = self.topo.rank if self.topo else -1
        gen = self.topo.generation if self.topo else -1
        # request_epoch counts the in-job requests (rollbacks) handled so far: a detection repeated
        # after a replay is a new occurrence, not a duplicate of the first.
        rec = {
            "event": str(name),  # the plain value, in the file and in the log line below
            "rank": rank,
            "generation": gen,
            "step": fields.pop("step", self.cursor.step),
            "request_epoch": self.cursor.request_id,
            "job_id": self.job_id,
            **fields,
        }
        if name in DETECTORS:
            rec.setdefault("suspect_ranks", [])
            self.dump_flight(rec["step"])
        self.events_out.write(rec)
        log.info("event %s", rec)

    def dump_flight(self, step: int) -> None:
        path = self.paths.root / f"flight-{step:08d}.jsonl"
        with contextlib.suppress(OSError), path.open("w") as f:
            for r in self.flight:
                f.write(json.dumps(r, allow_nan=True) + "\n")

    # ------------------------------------------------------------------------------------------
    # Generations
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        LivenessThread(self.paths.root).start()
        assignment = self.opts.first_assignment
        if assignment is not None and assignment.stop:
            return contract.EXIT_SUPERSEDED
        while True:
            if self.stop_requested and assignment is not None and not self.has_state:
                return contract.EXIT_OK
            try:
                self.join(assignment)
                outcome = self.train()
                if outcome == "finished":
                    self.conclude()
                break
            except (CollectiveFailed, GenerationChange, Abandoned) as e:
                if assignment is None or (self.cfg.parallel == "fsdp" and isinstance(e, CollectiveFailed)):
                    raise
                failed_gen = assignment.generation
                if isinstance(e, Abandoned):
                    self.event(EventKind.ABANDONED, reason=str(e), has_state=self.has_state)
                elif isinstance(e, CollectiveFailed):
                    self.event(EventKind.COLLECTIVE_FAILED, error=str(e)[:500], has_state=self.has_state)
                else:
                    self.event(EventKind.GENERATION_CHANGE, step=self.cursor.step, has_state=self.has_state)
                self.teardown_generation()
                if self.stop_requested:
                    return contract.EXIT_OK
                try:
                    assignment = self.wait_for_assignment(failed_gen)
                except Superseded:
                    return contract.EXIT_SUPERSEDED
        self.finish(outcome)
        return contract.EXIT_OK

    def wait_for_assignment(self, after_generation: int) -> Assignment:
        a = self.paths.wait_for_assignment(
            after_generation, poll_s=self.opts.poll_s, give_up=lambda: self.stop_requested
        )
        if a is None or a.stop:
            raise Superseded()
        return a

    def join(self, assignment: Assignment | None) -> None:
        cfg = self.cfg
        if assignment is not None:
            self.job_id = assignment.job_id
        # Validate the layout before any process group starts.
        self.accum = cfg.check_world(assignment.world_size if assignment else env_topology()[1])
        rank = assignment.rank if assignment is not None else env_topology()[0]
        if self.opts.faults and not isinstance(self.fault_hooks, FaultInjector):
            self.fault_hooks = FaultInjector(
                self.opts.faults,
                rank=rank,
                seed=cfg.seed,
                state_dir=self.opts.run_dir / "faults",
                node=os.environ.get(contract.ENV_NODE_ID, ""),
                announce=lambda fired: self.event(EventKind.FAULT_INJECTED, **fired),
            )
        else:  # a re-formed generation may give this process another rank
            self.fault_hooks.set_rank(rank)
        if assignment is not None:
            self.fault_hooks.freeze_point(assignment.generation, "join")
        if assignment is not None:  # the coordinator learns who reached the rendezvous
            self.event(EventKind.JOINING, rank=assignment.rank, generation=assignment.generation)
        topo = form_group(
            assignment,
            device_kind=cfg.device,
            timeout_s=self.opts.collective_timeout_s,
            abandon=lambda: (
                self.stop_requested
                or (
                    assignment is not None and self.paths.latest_assignment(assignment.generation) is not None
                )
            ),
        )
        self.topo = topo
        if assignment is not None:
            self.job_id = assignment.job_id
        first = self.optimizer is None
        if first:
            self.model.to(topo.device)
            if cfg.parallel == "fsdp":
                self.train_model = self._shard(topo)
            if cfg.compile:  # the same module underneath: state dicts and fingerprints are unchanged
                self.train_model = torch.compile(self.train_model)
            self.optimizer = build_optimizer(self.model, cfg.optim, device_type=topo.device.type)
            self.grad_sync = GradSync(list(self.model.parameters())) if cfg.parallel == "ddp" else None
        ckpt_pg = new_group(self.opts.collective_timeout_s)
        self.ckpt = CheckpointManager(
            self.opts.run_dir,
            rank=topo.rank,
            keep=cfg.keep_checkpoints,
            async_save=cfg.async_checkpoint,
            events=lambda name, f: self.event(name, **f),
            process_group=ckpt_pg,
            fault_point=self.fault_hooks.freeze_point,
            generation=topo.generation,
        )
        if first and topo.is_main:
            log.info("resolved config: %s", json.dumps(to_dict(cfg), sort_keys=True))
        self.restore(assignment)
        self.event(
            EventKind.STARTED,
            world_size=topo.world_size,
            grad_accum=self.accum,
            pid=os.getpid(),
            node_id=os.environ.get(contract.ENV_NODE_ID, ""),
            resumed_step=self.cursor.step,
        )

    def _shard(self, topo: Topology) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        rep = self.cfg.hsdp_replicate
        if rep > 1:
            mesh = init_device_mesh(
                topo.device.type, (rep, topo.world_size // rep), mesh_dim_names=("replicate", "shard")
            )
        else:
            mesh = init_device_mesh(topo.device.type, (topo.world_size,), mesh_dim_names=("shard",))
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        return self.model

    def teardown_generation(self) -> None:
        """Leave a broken generation at once: a checkpoint in flight is abandoned, not awaited."""
        if self.ckpt is not None:
            step = self.ckpt.abandon()
            if step is not None:
                self.event(
                    EventKind.CHECKPOINT_ABANDONED, step=step, reason="the group broke while it was in flight"
                )
            self.ckpt = None
        leave_group()

    # ------------------------------------------------------------------------------------------
    # Restoring state for a generation
    def restore(self, assignment: Assignment | None) -> None:
        assert self.optimizer is not None and self.ckpt is not None and self.topo is not None
        # Without an agent: --resume none starts from step 0; auto or a path loads a checkpoint.
        mode = (
            assignment.resume
            if assignment
            else (Resume.FRESH if self.opts.resume == "none" else Resume.CHECKPOINT)
        )
        explicit = (
            assignment.checkpoint
            if assignment
            else ("" if self.opts.resume in ("auto", "none") else self.opts.resume)
        )
        restored = False
        if assignment is not None and assignment.rollback_to >= 0 and self.has_state:
            # Roll back past an alarm's onset before anyone serves as a healing source.
            snap = self.snapshots.newest_at_or_before(assignment.rollback_to)
            if snap is not None:
                self._restore_snapshot(snap)
            else:
                self.has_state = False  # nothing old enough here: do not serve as a source
        if mode == Resume.PEER:
            restored = self._heal_from_peer()
        if not restored and mode != Resume.FRESH:
            max_step = (
                assignment.rollback_to if assignment is not None and assignment.rollback_to >= 0 else None
            )
            path = self.ckpt.find_resume(explicit, max_step=max_step, fallback=assignment is not None)
            if path is not None:
                self._load_checkpoint(path)
                restored = True
        if not restored:
            self._reset_to_initial()
        if assignment is not None:  # the coordinator's list of skipped windows is authoritative
            self.cursor.skip_windows = [list(w) for w in assignment.skip_windows]
        self.has_state = True
        self.snapshots.clear()
        self.spikes.forget_after(self.cursor.step)
        agreed = self.check_fingerprints(reason="start of generation")
        if agreed:
            self.take_snapshot()
        if self.cursor.step == 0 and self.cfg.integrity.startup_check:
            self.startup_determinism_check()

    def _heal_from_peer(self) -> bool:
        """Pick the live rank with the newest state and broadcast it to everyone else."""
        assert self.topo is not None and self.optimizer is not None
        mine = torch.tensor(
            [1 if self.has_state else 0, self.cursor.step, self.cursor.last_agreed_step],
            dtype=torch.int64,
            device=self.topo.device,
        )
        rows = all_gather_rows(mine, "choosing a healing source")
        stateful = [r for r in range(rows.shape[0]) if rows[r, 0] == 1]
        if not stateful:
            return False
        # Heal only from verified state. A replica corrupted after the last fingerprint agreement A
        # (the one the fault took, say) passed the damage to every survivor through its gradients of
        # step A + 2 onwards (those of step A + 1 came from its state at A, which agreed). So
        # survivors past A + 1 first go back to their newest snapshot at or before A (all hold the
        # same snapshots). With fingerprints every step (the default) that never happens: no step
        # is lost, even when the fault broke the check of the current step itself.
        verified = min(int(rows[r, 2]) for r in stateful)
        if any(int(rows[r, 1]) > verified + 1 for r in stateful) and self.has_state:
            snap = self.snapshots.newest_at_or_before(verified)
            from_step = self.cursor.step
            if snap is not None:
                self._restore_snapshot(snap)
                self.event(
                    EventKind.HEAL_ROLLBACK,
                    from_step=from_step,
                    step=self.cursor.step,
                    reason=f"state after step {verified} was never compared across replicas",
                )
            else:  # nothing verified to heal from here: a checkpoint restores everyone
                self.has_state = False
        mine = torch.tensor(
            [1 if self.has_state else 0, self.cursor.step], dtype=torch.int64, device=self.topo.device
        )
        rows = all_gather_rows(mine, "choosing a healing source")
        candidates = [(int(rows[r, 1]), -r) for r in range(rows.shape[0]) if rows[r, 0] == 1]
        if not candidates:
            return False
        best_step, neg_rank = max(candidates)
        src = -neg_rank
        t0 = time.perf_counter()
        extra = broadcast_training_state(
            self.model,
            self.optimizer,
            {"cursor": self.cursor.to_json(), "spikes": self.spikes.state()},
            src=src,
        )
        self.cursor = Cursor.from_json(extra["cursor"])
        self.spikes.load_state(extra["spikes"])
        self.event(
            EventKind.HEALED, source_rank=src, step=best_step, seconds=round(time.perf_counter() - t0, 4)
        )
        return True

    def _load_checkpoint(self, path: Path) -> None:
        assert self.ckpt is not None and self.optimizer is not None
        manifest = self.ckpt.load(path, self.model, self.optimizer)
        self.cursor = Cursor.from_json(manifest.get("cursor", {"step": manifest["step"]}))
        self.cursor.step = int(manifest["step"])
        if "spikes" in manifest:
            self.spikes.load_state(manifest["spikes"])
        digest = self.canonical_digest()
        if manifest.get("fingerprint") and digest != manifest["fingerprint"]:
            raise RuntimeError(
                f"checkpoint {path} loaded but its state fingerprint {digest} differs from the manifest's "
                f"{manifest['fingerprint']}: refusing to train on it"
            )
        self.event(EventKind.RESTORED, path=str(path), step=self.cursor.step, fingerprint=digest)

    def _reset_to_initial(self) -> None:
        assert self.optimizer is not None
        if self.has_state:  # a used process told to start over: identical to a fresh one
            self.model.init_weights(self.cfg.seed)
            self.optimizer.zero_grad(set_to_none=True)
            # The explicit initial state build_optimizer made, not an empty one that whatever
            # touches it first (a checkpoint's get_state_dict) would fill in its own way.
            reset_state(self.optimizer)
        self.cursor = Cursor()

    def startup_determinism_check(self) -> None:
        """Compute the first micro-batch's gradient twice; unequal digests mean results are not
        bitwise reproducible here, which exact fingerprints, resume and bisection all rely on."""
        digests = []
        for _ in range(2):
            self.optimizer.zero_grad(set_to_none=True)
            x, y = self.batch(0, self.topo.rank, 0)
            _, loss = self.train_model(x, y)
            loss.backward()
            digests.append(grad_digest(list(self.model.parameters())))
        self.optimizer.zero_grad(set_to_none=True)
        if digests[0] != digests[1]:
            log.error("NOT DETERMINISTIC: two replays of the first micro-batch gave different gradients")
            self.event(EventKind.NONDETERMINISTIC, digests=[str(d) for d in digests])

    # ------------------------------------------------------------------------------------------
    # Training
    def batch(self, step_index: int, dp_rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        x, y = get_batch(
            self.data,
            seed=cfg.seed,
            step=step_index,
            dp_rank=dp_rank,
            dp_world=self.topo.world_size,
            micro_step=micro,
            micro_batch_size=cfg.data.micro_batch_size,
            grad_accum=self.accum,
            seq_len=cfg.data.seq_len,
            skip_windows=self.cursor.skip_windows,
        )
        return x.to(self.topo.device, non_blocking=True), y.to(self.topo.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision == "bf16" and self.topo.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> str:
        cfg = self.cfg
        while self.cursor.step < cfg.steps:
            result = self.train_step()
            if result.stop:
                self.save_checkpoint(blocking=True)
                self.event(EventKind.STOPPED, reason="SIGTERM")
                return "stopped"
            step = self.cursor.step
            if self.cadence.checkpoint.due(step) and step < cfg.steps:
                self.save_checkpoint()
            if self.cadence.eval.due(step) and step < cfg.steps:
                self.evaluate()
        return "finished"

    def train_step(self) -> StepResult:
        """One step, in the order of the spec: forward and backward over the micro-batches, the
        gradient all-reduce, the agreement (every rank learns every rank's loss, stop flag, newest
        request and generation), then clip and optimizer step (or, if any rank saw a non-finite
        value, a skip that every rank makes), the detectors, the periodic checks, the record."""
        topo, hooks = self.topo, self.fault_hooks
        t0 = time.perf_counter()
        index = self.cursor.step  # 0-based index of the step being computed
        step_no = index + 1
        lr = self.begin_step(index)
        audit_due = self.audit_due(step_no)
        local_loss, act_norms, audit_own = self.forward_backward(index, audit_due)
        audit_next = self.recompute_neighbour(index) if audit_due else 0
        hooks.corrupt_grads(step_no, self.model)
        hooks.hang_point(step_no)
        if self.grad_sync is not None:
            self.grad_sync.all_reduce_mean(topo.world_size)
        agreed = self.agree(index, local_loss, audit_due, audit_own, audit_next)
        sq, labels, grad_norm = self.grad_norms()
        record = self.new_record(step_no, agreed.loss, lr, grad_norm)
        force_check = False  # replicas diverged under the audit: check fingerprints this step
        if agreed.nonfinite_ranks or not math.isfinite(grad_norm):
            self.skip_step(record, agreed.nonfinite_ranks, grad_norm)
        else:
            self.clip(grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            hooks.corrupt_state(step_no, self.model, self.optimizer)
            force_check = audit_due and not self.judge_audit(step_no, agreed)
            self.watch_spikes(step_no, record)
        self.advance(step_no)
        self.periodic_checks(step_no, force_check)
        if agreed.newest_request > self.cursor.request_id:
            self.handle_request(agreed.newest_request, agreed)
        self.finish_record(record, t0, sq, labels, act_norms)
        return StepResult(record, stop=agreed.stop)

    # The parts of a step, in order.
    def begin_step(self, index: int) -> float:
        """Clear gradients (a step cut short by a failed collective may have left some), set the
        learning rate; returns it."""
        self.optimizer.zero_grad(set_to_none=True)
        lr = lr_at(index, self.cfg.optim, self.cfg.steps)
        set_lr(self.optimizer, lr)
        self.fault_hooks.begin_step(index + 1, self.model)
        return lr

    def audit_due(self, step_no: int) -> bool:
        return (
            self.cadence.audit.due(step_no)
            and self.topo.world_size > 1
            and self.cfg.parallel == "ddp"  # under FSDP local gradients never exist whole
        )

    def forward_backward(self, index: int, audit_due: bool) -> tuple[float, list[torch.Tensor], int]:
        """Micro-steps: forward, backward, accumulate (no communication until all are done).
        Returns this rank's mean loss, the first micro-batch's activation norms and, on audit steps,
        the digest of its gradients."""
        model, rank = self.model, self.topo.rank
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        audit_own = 0
        act_norms: list[torch.Tensor] = []
        for micro in range(self.accum):
            x, y = self.batch(index, rank, micro)
            with self.autocast():
                _, loss = self.train_model(x, y)
            if micro == 0:
                act_norms = list(model.activation_norms)
                loss = self.fault_hooks.corrupt_loss(
                    index + 1, loss, data_index(index, self.cursor.skip_windows)
                )
            (loss / self.accum).backward()
            loss_sum += loss.detach().double()
            if micro == 0 and audit_due:
                audit_own = grad_digest(list(model.parameters()))
        return float(loss_sum) / self.accum, act_norms, audit_own

    def agree(
        self, index: int, local_loss: float, audit_due: bool, audit_own: int, audit_next: int
    ) -> Agreement:
        topo = self.topo
        mine = Control(
            step_index=index,
            loss=local_loss,
            stop=self.stop_requested,
            request=self.newest_request_id(),
            next_generation=self.newest_assignment_generation() if topo.managed else -1,
            audit_own=audit_own,
            audit_next=audit_next,
            # On audit steps, the parameters the gradients came from: an audit between replicas whose
            # parameters already differ says nothing about compute (the fingerprint check names them).
            param_digest=digest_of(list(self.model.parameters())) if audit_due else 0,
        )
        agreed = Agreement.gather(mine, topo.device)
        if agreed.newest_generation > topo.generation:
            # A newer generation exists (membership change): everyone leaves at this step, before
            # applying it, and rejoins with the state it has (the step is recomputed there).
            self.optimizer.zero_grad(set_to_none=True)
            raise GenerationChange()
        return agreed

    def grad_norms(self) -> tuple[torch.Tensor, list[str], float]:
        """Per-layer-group squared gradient norms, their labels, and the global norm."""
        sq, labels = group_norms(self.model, self.layer_groups)
        if self.cfg.parallel == "fsdp":
            with collective("layer norm all-reduce"):
                dist.all_reduce(sq)
        return sq, labels, float(sq.sum().sqrt())

    def new_record(self, step_no: int, loss: float, lr: float, grad_norm: float) -> dict[str, Any]:
        topo = self.topo
        return {
            "step": step_no,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "generation": topo.generation,
            "rank": topo.rank,
            "world_size": topo.world_size,
            "data_index": data_index(step_no - 1, self.cursor.skip_windows),
            "job_id": self.job_id,
        }

    def skip_step(self, record: dict[str, Any], nonfinite_ranks: list[int], grad_norm: float) -> None:
        """Non-finite guard: every rank saw the same agreement, so every rank skips the same step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite"] += 1
        self.event(
            EventKind.NONFINITE,
            step=record["step"],
            suspect_ranks=nonfinite_ranks,
            loss=record["loss"],
            grad_norm=grad_norm,
            data_index=record["data_index"],
        )
        record["skipped"] = True

    def clip(self, grad_norm: float) -> None:
        """Clip by the global norm every rank agreed on."""
        clip = self.cfg.optim.grad_clip
        coef = clip / (grad_norm + 1e-6) if clip else 1.0
        if coef < 1.0:
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)

    def watch_spikes(self, step_no: int, record: dict[str, Any]) -> None:
        for spike in self.spikes.observe(step_no, {"loss": record["loss"], "grad_norm": record["grad_norm"]}):
            self.counters["spikes"] += 1
            self.event(
                EventKind.SPIKE,
                step=step_no,
                suspect_ranks=[],
                data_index=record["data_index"],
                metric=spike.metric,
                value=spike.value,
                median=spike.median,
                mad=spike.mad,
                z=spike.z,
                threshold=spike.threshold,
                window=list(spike.window),
            )

    def advance(self, step_no: int) -> None:
        self.cursor.step = step_no
        self.cursor.tokens += self.cfg.data.global_batch_size * self.cfg.data.seq_len

    def periodic_checks(self, step_no: int, force_check: bool) -> None:
        """Fingerprints when due (and before every checkpoint); a snapshot only of agreed state."""
        c = self.cadence
        if c.fingerprint.due(step_no) or c.checkpoint.due(step_no) or force_check:
            if self.check_fingerprints(reason="periodic"):
                if c.snapshot.due(step_no):
                    self.take_snapshot()
            elif self.cfg.integrity.on_mismatch == "rollback":  # every rank saw the same comparison
                self.rollback(
                    contract.Request(
                        id=self.cursor.request_id, kind="rollback", reason="fingerprint mismatch"
                    )
                )

    def finish_record(
        self,
        record: dict[str, Any],
        t0: float,
        sq: torch.Tensor,
        labels: list[str],
        act_norms: list[torch.Tensor],
    ) -> None:
        for fired in self.fault_hooks.drain():
            self.event(EventKind.FAULT_INJECTED, **fired)
        tokens = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        step_time = time.perf_counter() - t0
        record.update(
            step_time_s=step_time,
            tokens=tokens,
            tokens_total=self.cursor.tokens,
            tokens_per_s=tokens / step_time,
            layer_grad_norms={
                lab: math.sqrt(max(float(v), 0.0)) for lab, v in zip(labels, sq.tolist(), strict=True)
            },
            activation_norms=[float(a) for a in act_norms],
            **{f"{k}_total": v for k, v in self.counters.items()},
            checkpoint_stall_s=self.ckpt.last_stall_s if self.ckpt else 0.0,
        )
        self.progress_out.write(record)
        self.flight.append(record)

    def recompute_neighbour(self, index: int) -> int:
        """Gradient digest of the next rank's first micro-batch, computed here (the audit)."""
        params = list(self.model.parameters())
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        x, y = self.batch(index, (self.topo.rank + 1) % self.topo.world_size, 0)
        with self.autocast():
            _, loss = self.train_model(x, y)
        (loss / self.accum).backward()
        digest = grad_digest(params)
        for p, g in zip(params, stash, strict=True):
            p.grad = g
        return digest

    def judge_audit(self, step_no: int, agreed: Agreement) -> bool:
        """Returns False when the audit could not judge compute because replicas diverged."""
        if not agreed.params_agree():
            return False
        verdict = audit_verdict([r.audit_own for r in agreed.rows], [r.audit_next for r in agreed.rows])
        if not verdict.agree:
            self.counters["audit_mismatches"] += 1
            last_clean = step_no - self.cfg.integrity.audit_every
            self.event(
                EventKind.AUDIT_MISMATCH,
                step=step_no,
                suspect_ranks=list(verdict.suspect_ranks),
                bad_edges=[list(e) for e in verdict.bad_edges],
                reason=verdict.reason,
                onset_window=[max(last_clean, 0), step_no],
            )
        return True

    def check_fingerprints(self, *, reason: str) -> bool:
        """All-gather fingerprints of parameters and optimizer state; compare replicas exactly."""
        step = self.cursor.step
        if self.topo.world_size == 1:
            self.cursor.last_agreed_step = step
            return True
        names, values = fingerprint.fingerprints(fingerprint.named_state(self.model, self.optimizer))
        rows = all_gather_rows(values.to(self.topo.device), "fingerprint all-gather")
        groups = self.replica_groups()
        for group in groups:
            if len(group) < 2:
                continue
            cmp = fingerprint.compare_replicas({r: rows[r] for r in group}, names)
            if not cmp.agree:
                self.counters["fingerprint_mismatches"] += 1
                self.event(
                    EventKind.FINGERPRINT_MISMATCH,
                    step=step,
                    suspect_ranks=list(cmp.suspect_ranks),
                    reason=cmp.reason,
                    tensors=list(cmp.mismatched_tensors)[:20],
                    onset_window=[self.cursor.last_agreed_step, step],
                    check=reason,
                )
                return False
        self.cursor.last_agreed_step = step
        return True

    def replica_groups(self) -> list[list[int]]:
        """Ranks holding the same state: everyone under DDP, the same shard across replicas under HSDP."""
        world = self.topo.world_size
        if self.cfg.parallel == "ddp":
            return [list(range(world))]
        shards = world // self.cfg.hsdp_replicate
        return [[rep * shards + s for rep in range(self.cfg.hsdp_replicate)] for s in range(shards)]

    def take_snapshot(self) -> None:
        self.snapshots.take(
            self.cursor.step,
            self.model,
            self.optimizer,
            {"cursor": self.cursor.to_json(), "spikes": self.spikes.state()},
        )

    # ------------------------------------------------------------------------------------------
    # Requests from the agent (rollback in place)
    def newest_assignment_generation(self) -> int:
        a = self.paths.latest_assignment(self.topo.generation)
        return a.generation if a is not None else -1

    def newest_request_id(self) -> int:
        reqs = self.paths.requests(self.cursor.request_id)
        return reqs[-1].id if reqs else self.cursor.request_id

    def handle_request(self, request_id: int, agreed: Agreement) -> None:
        """Every rank handles the agreed request at the same step; the lowest rank holding the
        request file broadcasts its content so no rank waits for its own copy."""
        src = min(agreed.holders_of(request_id))
        mine = [r.to_json() for r in self.paths.requests(self.cursor.request_id) if r.id == request_id]
        box = [mine[0] if mine else None]
        with collective("broadcasting a request"):
            dist.broadcast_object_list(box, src=src)
        req = contract.Request.from_json(box[0])
        self.cursor.request_id = request_id
        if req.kind == "rollback":
            self.rollback(req)

    def rollback(self, req: contract.Request) -> None:
        snap = self.snapshots.newest_at_or_before(req.to_step)
        if snap is None:
            self.event(
                EventKind.ROLLBACK_UNAVAILABLE,
                request_id=req.id,
                to_step=req.to_step,
                snapshots=self.snapshots.steps(),
                reason="no in-memory snapshot at or before that step",
            )
            return
        from_step = self.cursor.step
        self._restore_snapshot(snap)
        self.cursor.skip_windows = self.cursor.skip_windows + [list(w) for w in req.skip]
        self.event(
            EventKind.ROLLBACK,
            request_id=req.id,
            from_step=from_step,
            step=self.cursor.step,
            skip=[list(w) for w in req.skip],
            reason=req.reason,
        )

    def _restore_snapshot(self, snap: Any) -> None:
        request_id, windows = self.cursor.request_id, self.cursor.skip_windows
        extra = self.snapshots.restore(snap, self.model, self.optimizer)
        self.cursor = Cursor.from_json(extra["cursor"])
        # Handled requests stay handled and skipped windows stay skipped: both are decisions about
        # the future, not state of the past.
        self.cursor.request_id, self.cursor.skip_windows = request_id, windows
        self.spikes.load_state(extra["spikes"])

    # ------------------------------------------------------------------------------------------
    # Checkpoints, evaluation, the end
    def canonical_digest(self) -> str:
        """The whole training state's fingerprint, independent of sharding and world size."""
        if self.cfg.parallel == "ddp":
            return fingerprint.state_digest(self.model, self.optimizer)
        full = [
            (n, t.full_tensor() if hasattr(t, "full_tensor") else t)
            for n, t in fingerprint.named_state(self.model, self.optimizer)
        ]
        return fingerprint.digest(fingerprint.fingerprints(full)[1])

    def save_checkpoint(self, *, blocking: bool = False) -> None:
        step = self.cursor.step
        agreed = self.cursor.last_agreed_step == step
        if not agreed:
            agreed = self.check_fingerprints(reason="checkpoint")
        if not agreed:
            self.event(
                EventKind.CHECKPOINT_SKIPPED, step=step, reason="replica fingerprints disagree at this step"
            )
            return
        fields = {
            "config": to_dict(self.cfg),
            "cursor": self.cursor.to_json(),
            "spikes": self.spikes.state(),
            "fingerprint": self.canonical_digest(),
            "replicas_agree": True,
            "world_size": self.topo.world_size,
            "parallel": self.cfg.parallel,
            "generation": self.topo.generation,
        }
        self.fault_hooks.freeze_point(step, "checkpoint")
        stall = self.ckpt.save(step, self.model, self.optimizer, fields, blocking=blocking)
        log.info("checkpoint at step %d: training blocked %.3f s", step, stall)

    def evaluate(self) -> float:
        cfg, topo = self.cfg, self.topo
        batches = eval_batches(
            self.data,
            seed=cfg.seed,
            n_batches=cfg.eval_batches,
            batch_size=cfg.data.micro_batch_size,
            seq_len=cfg.data.seq_len,
        )
        total = torch.zeros(2, dtype=torch.float64, device=topo.device)
        self.train_model.eval()
        # Every rank runs the same number of forwards (FSDP needs all ranks in each one); a rank
        # past the end evaluates batch 0 with weight 0.
        per_rank = -(-len(batches) // topo.world_size)
        with torch.no_grad():
            for j in range(per_rank):
                i = topo.rank + j * topo.world_size
                x, y = batches[i] if i < len(batches) else batches[0]
                with self.autocast():
                    _, loss = self.train_model(x.to(topo.device), y.to(topo.device))
                weight = 1.0 if i < len(batches) else 0.0
                total += torch.tensor([float(loss) * weight, weight], dtype=torch.float64, device=topo.device)
        self.train_model.train()
        with collective("evaluation all-reduce"):
            dist.all_reduce(total)
        val = float(total[0] / total[1])
        self.event(EventKind.EVAL, step=self.cursor.step, val_loss=val)
        return val

    def conclude(self) -> None:
        """The end of training, inside the generation: its collectives can lose a peer like any
        step's, and a re-formed generation (survivors keep their state) does this part again."""
        self.final_val_loss = self.evaluate()
        if self.cfg.checkpoint_every:
            self.save_checkpoint(blocking=True)

    def finish(self, outcome: str) -> None:
        if outcome == "finished":
            self.ckpt.wait()
            self.event(
                EventKind.FINISHED,
                step=self.cursor.step,
                fingerprint=self.canonical_digest(),
                val_loss=self.final_val_loss,
                tokens_total=self.cursor.tokens,
            )
        else:
            self.ckpt.wait()
        if self.opts.sample_lines and outcome == "finished":
            self.print_samples(self.opts.sample_lines)
        self.teardown_generation()
        self.progress_out.close()
        self.events_out.close()

    def print_samples(self, n: int) -> None:
        tok = self.data.tokenizer()
        gen = torch.Generator(device=self.topo.device).manual_seed(self.cfg.seed)
        start = torch.full((n, 1), self.data.eot_id, dtype=torch.long)
        # Every rank generates (FSDP needs all of them in each forward); rank 0 prints.
        out = self.model.generate(
            start.to(self.topo.device), max_new_tokens=64, temperature=0.8, top_k=40, generator=gen
        )
        if not self.topo.is_main:
            return
        for row in out.tolist():
            text = tok.decode(row[1:]).replace("\n", " ").strip()
            print(f"sample: {text}", flush=True)

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def write_error(self, exc: BaseException) -> None:
        """The error file the agent reads to classify a crash (the torchelastic convention)."""
        write_json_atomic(
            self.paths.error,
            {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
                "step": self.cursor.step,
                "rank": self.topo.rank if self.topo else -1,
                "time": time.time(),
            },
        )
        self.dump_flight(self.cursor.step)
