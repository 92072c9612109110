"""The guard: Stanchion's protections around a user's own training loop, one step at a time.

::

    rt = stanchion.join()
    guard = stanchion.guard(rt, model, optimizer, steps=N, batch_at=batch_at, loss_fn=loss_fn)
    for step in guard:                       # honours rollbacks, skip windows, stops, re-forming
        with guard.step() as s:
            for micro in range(accum):
                s.backward(loss_fn(model, batch_at(s.data_index, rt.rank, micro)), accum=accum)
        guard.maybe_checkpoint()
    guard.finish()

Leaving the ``with`` block commits the step, in this order: the rank's gradients are audited when
due (a neighbour's micro-batch recomputed), averaged across data-parallel ranks, and every rank
agrees in one small all-gather on the loss, on non-finite values, on stop and rollback requests and
on the audit digests. Both start during the last micro-batch's backward pass where they can: the
gradient buckets as they fill, the agreement (except on audit steps) as soon as that micro-batch's
loss exists. A step with a non-finite value anywhere is skipped by every rank; otherwise
the gradients are clipped and the optimizer (and the registered schedulers) step. Then the periodic
checks: replica fingerprints of parameters and optimizer state, a snapshot, an evaluation.

When a collective fails under an agent (a peer died or hung and was killed), the step is left
uncommitted, the rank leaves the broken group, waits for the agent's next assignment and re-forms
in place, keeping its state: the next iteration of ``for step in guard`` starts in the new group,
where a replacement rank heals from a live replica. Under plain torchrun a failed collective ends
the process (torchrun restarts the group, which resumes from the newest checkpoint).

Invariant for re-forming: after a re-form every rank (survivors and replacements) starts at the top
of an iteration of ``for step in guard``, so their collectives line up again.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager

from stanchion.sdk import contract, devices, fingerprint, liveness, numerics, sharded
from stanchion.sdk.audit import audit_verdict, digest_of, grad_digest
from stanchion.sdk.checkpoint import CheckpointManager, new_stager
from stanchion.sdk.contract import Assignment
from stanchion.sdk.control import Agreement, Cadence, Cadences, Control
from stanchion.sdk.faults import FaultHooks
from stanchion.sdk.monitors import SpikeDetector, group_norms
from stanchion.sdk.parallel import (
    Abandoned,
    CollectiveFailed,
    GradSync,
    all_gather_rows,
    broadcast_training_state,
    collective,
    is_backend_failure,
    new_group,
    wait,
)
from stanchion.sdk.protections import Protections
from stanchion.sdk.runtime import Runtime, Superseded
from stanchion.sdk.skips import data_index
from stanchion.sdk.snapshot import SnapshotRing
from stanchion.sdk.stragglers import StragglerDetector
from stanchion.vocab import EventKind, Resume

log = logging.getLogger(__name__)

# What ends a generation without ending the process (under an agent): a lost peer, an agreed move to
# a newer generation, or a formation abandoned for a newer one.
_REFORM = (CollectiveFailed, Abandoned)


class GenerationChange(Exception):
    """Every rank agreed, at the same step, that a newer generation has been assigned."""


BatchAt = Callable[[int, int, int], Any]  # (data index, data-parallel rank, micro-batch) -> batch
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss


@dataclass(frozen=True)
class PendingCheck:
    """Fingerprints of the state after ``step``, compared through the next step's agreement."""

    step: int
    names: list[str]
    values: torch.Tensor  # int64 on the host, one per tensor (stanchion/sdk/fingerprint.py)
    folded: int  # what the agreement carries


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


class Step:
    """One optimizer step in progress: ``with guard.step() as s``."""

    def __init__(self, guard: Guard, index: int):
        self._guard = guard
        self.index = index  # 0-based: the step being computed
        self.number = index + 1  # the step's number once committed
        self.data_index = data_index(index, guard.cursor.skip_windows)  # where its data starts
        self.committed: bool | None = None  # set when the block ends: was the update applied?
        self.loss: float | None = None  # the loss every rank agreed on (their mean)
        self._losses = 0
        self._loss_sum: torch.Tensor | None = None
        self._audit_own = 0
        self._accum = 1
        self._agreement: Callable[[], Agreement] | None = None  # started before the last backward pass
        self._t0 = time.perf_counter()
        self._sharded: tuple[str, float, int] | None = None
        self.compute_s = 0.0  # from the step's start to the end of its last backward pass

    def backward(self, loss: torch.Tensor, accum: int = 1) -> None:
        """``(loss / accum).backward()``, and report ``loss`` for the step's agreement. Call it once
        per micro-batch instead of ``loss.backward()``."""
        g = self._guard
        if self._losses == 0:
            loss = g.rt.fault_hooks.corrupt_loss(self.number, loss, self.data_index)
            self._accum = accum
        if self._agreement is not None:  # a backward pass after the last one: agree again at the end
            self._agreement()
            self._agreement = None
        detached = loss.detach().double()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._losses += 1
        last = self._losses == accum
        audit_due = g._audit_due(self.number)
        if last and not audit_due:
            # Everything the agreement needs is known now: its all-gather runs during this backward pass.
            self._agreement = Agreement.start(g.control(self, self.local_loss()), g.rt.device)
        # The last micro-batch's backward pass completes the gradients: their all-reduce starts
        # bucket by bucket while it runs.
        sync = g.grad_sync if g.overlap and last else None
        if sync is not None:
            sync.arm()
        try:
            if self._losses == 1 and audit_due:
                self._audit_own = g.local_grad_digest(lambda: (loss / accum).backward())
            else:
                (loss / accum).backward()
        finally:
            if sync is not None:
                sync.disarm()
        if last:  # the rank's own work of the step, before it waits on any peer
            self.compute_s = time.perf_counter() - self._t0

    def local_loss(self) -> torch.Tensor:
        """This rank's mean micro-batch loss so far, in float64, where it was computed."""
        return self._loss_sum / self._losses

    def __enter__(self) -> Step:
        if self._guard.mesh is not None:
            # FSDP's all-gathers and reduce-scatters run inside the forward and backward passes: a
            # rank blocked there waits on a peer (what the agent's liveness check must know).
            self._sharded = liveness.enter("sharded forward and backward")
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        g = self._guard
        g._in_step = None
        if self._sharded is not None:
            liveness.leave(self._sharded, completed=exc is None)
            if (
                exc is not None
                and not isinstance(exc, (*_REFORM, GenerationChange))
                and is_backend_failure(exc)
            ):
                exc = CollectiveFailed(f"FSDP's collectives in the forward or backward pass: {exc}")
        if exc is None:
            try:
                g._commit(self)
            except (*_REFORM, GenerationChange) as e:
                if self.committed is None:
                    self.committed = False
                g._fail(e)
            return False
        self.committed = False
        if isinstance(exc, (*_REFORM, GenerationChange)):
            g._fail(exc)
            return True
        return False


class Guard:
    """Stanchion's protections around one model and one optimizer. Make it with :func:`guard`."""

    def __init__(
        self,
        rt: Runtime,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        steps: int,
        state: Mapping[str, Any] | None = None,
        schedulers: Sequence[Any] = (),
        batch_at: BatchAt | None = None,
        loss_fn: LossFn | None = None,
        evaluate: Callable[[], float] | None = None,
        eval_every: int = 0,
        mesh: Any = None,
        replicate_dim: str | None = None,
        protections: Protections | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        async_checkpoint: bool = True,
        grad_clip: float = 0.0,
        tokens_per_step: int = 0,
        flops_per_token: float = 0.0,
        layer_groups: Mapping[str, Sequence[str]] | None = None,
        activations: Sequence[torch.nn.Module] | None = None,
        initial_state: Callable[[], None] | None = None,
        config: Mapping[str, Any] | None = None,
        resume: str = "auto",
        precision: str | None = None,
    ):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(
                "guard(model=...): pass the module itself, not a DistributedDataParallel wrapper: the "
                "guard averages gradients itself (in a fixed layout, so restarts stay bit-exact), and a "
                "DDP wrapper is bound to a process group that cannot survive re-forming"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"guard(optimizer=...): expected one torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if steps <= 0:
            raise ValueError(f"guard(steps={steps}): must be > 0")
        if (batch_at is None) != (loss_fn is None):
            raise ValueError("guard(): pass batch_at and loss_fn together (the audit needs both), or neither")
        if mesh is not None:  # a replicate dimension the mesh lacks is named now, not at the first check
            replica_groups(mesh.mesh.tolist(), list(mesh.mesh_dim_names), replicate_dim)
        p = protections or Protections()
        self.rt = rt
        rt.where = lambda: (self.cursor.step, self.cursor.request_id)
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.state = dict(state or {})
        for i, sched in enumerate(schedulers):
            self.state.setdefault(f"scheduler.{i}", sched)
        for name, obj in self.state.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"guard(state={{{name!r}: ...}}): needs state_dict() and load_state_dict()")
        self.schedulers = list(schedulers)
        self.batch_at, self.loss_fn = batch_at, loss_fn
        self.evaluate_fn = evaluate
        self.mesh = mesh
        self.replicate_dim = replicate_dim
        self.precision = precision  # what loss_fn computes in ("bf16" under autocast): recorded, compared
        self._shard_group: dist.ProcessGroup | None = None  # formed at the first gradient norm (HSDP)
        self.protections = p
        self.cadence = Cadences(
            fingerprint=Cadence(p.fingerprint_every),
            snapshot=Cadence(p.snapshot_every),
            audit=Cadence(p.audit_every),
            checkpoint=Cadence(checkpoint_every),
            eval=Cadence(eval_every),
        )
        self.keep_checkpoints, self.async_checkpoint = keep_checkpoints, async_checkpoint
        self.grad_clip = grad_clip
        self.tokens_per_step = tokens_per_step
        # MFU's denominator: every rank's device peak (None: no MFU, see stanchion.sdk.devices).
        peak = devices.device_peak(rt.device) if flops_per_token else None
        self.flops_per_token, self.peak_flops = flops_per_token, peak * rt.world_size if peak else None
        self.config = dict(config or {})
        self.resume = resume
        self.params = list(model.parameters())
        self.layer_groups = dict(layer_groups) if layer_groups else top_level_groups(model)
        self.grad_sync = GradSync(self.params) if mesh is None else None
        # Sharded, a rank's own gradient exists only as FSDP's reduce-scatter inputs (the audit's).
        audits = self.cadence.audit.every > 0 and loss_fn is not None
        self._grad_digest = sharded.install_grad_digest(model) if mesh is not None and audits else None
        # Overlap the all-reduce with the backward pass, except when faults are injected into the
        # local gradients before it (chaos runs): the buckets, hence the sums, are the same either way.
        self.overlap = self.grad_sync is not None and type(rt.fault_hooks) is FaultHooks
        self.cursor = Cursor()
        self.has_state = False  # trained or restored in this process: may serve as a healing source
        self.snapshots = SnapshotRing(p.snapshots_kept)
        self.spikes = SpikeDetector(
            window=p.spike_window,
            min_history=p.spike_min_history,
            loss_z=p.spike_loss_z,
            grad_z=p.spike_grad_z,
            rel_floor=p.spike_rel_floor,
        )
        self.stragglers = StragglerDetector(threshold=p.straggler_ratio, window=p.straggler_window)
        self._compute_s = 0.0  # this rank's own compute time of its last step (sent in the next agreement)
        self.counters = {
            "nonfinite": 0,
            "spikes": 0,
            "fingerprint_mismatches": 0,
            "audit_mismatches": 0,
            "stragglers": 0,
        }
        self.ckpt: CheckpointManager | None = None
        # Staging buffers of asynchronous checkpoints, kept for the process's life (see checkpoint.py).
        self._stager: DefaultStager | None = None  # made at the first generation (it knows the device)
        self.final_val_loss: float | None = None
        self.final_fingerprint = ""  # the state's digest once finished (equal runs, equal digests)
        self.outcome = ""  # "finished" or "stopped" once the loop has ended
        self._broken: BaseException | None = None  # the generation failed: re-form before going on
        self._in_step: Step | None = None
        self._pending_check: PendingCheck | None = None  # fingerprints awaiting the next agreement
        self._rolls_back = False  # the last mismatch verdict rolls every rank back in place
        self._act_norms: list[torch.Tensor] = []
        self._act_hooks = [
            m.register_forward_hook(self._activation_hook(i)) for i, m in enumerate(activations or ())
        ]
        # A process told to start over must equal a fresh one: the program's own re-initialisation,
        # or a host copy of the state as it is now (before any step).
        self._initial = initial_state
        self._initial_copy = None if initial_state is not None else self._host_copy()
        self._enter(rt.assignment)

    # ------------------------------------------------------------------------------------------
    # The loop
    def __iter__(self) -> Iterator[int]:
        """The steps to compute, as 0-based indices (``step`` of ``for step in guard``)."""
        while True:
            if self._broken is not None:
                self._reform()
                continue
            if self.outcome:
                return
            if self.cursor.step >= self.steps:
                try:
                    if self._conclude():
                        self.outcome = "finished"
                except (*_REFORM, GenerationChange) as e:
                    self._fail(e)
                continue
            yield self.cursor.step

    def step(self) -> Step:
        """The context of one optimizer step: compute the gradients inside it (``s.backward``)."""
        if self._broken is not None or self.outcome:
            raise RuntimeError("guard.step(): use it inside `for step in guard:`, once per iteration")
        self.optimizer.zero_grad(set_to_none=True)  # a step cut short may have left some
        if self.grad_sync is not None:
            self.grad_sync.reset()
        s = Step(self, self.cursor.step)
        self._act_norms = []
        self.rt.fault_hooks.begin_step(s.number, self.model)
        self._in_step = s
        return s

    def maybe_checkpoint(self) -> bool:
        """Save a checkpoint if one is due at this step (every ``checkpoint_every`` steps); returns
        whether one was started. The final checkpoint is written by the loop's end itself."""
        step = self.cursor.step
        if self._broken is not None or self.outcome or not self.cadence.checkpoint.due(step):
            return False
        if step >= self.steps:
            return False
        try:
            self.save_checkpoint()
        except (*_REFORM, GenerationChange) as e:
            self._fail(e)
            return False
        return True

    def finish(self) -> str:
        """After the loop: wait for checkpoints, write the final event, close the files. Returns
        "finished" or "stopped" (SIGTERM: a checkpoint was written at the step every rank agreed on).
        A process that re-formed in place then ends without the interpreter's shutdown (see
        :meth:`Runtime.end_safely_at_exit`)."""
        if self.ckpt is not None:
            self.ckpt.wait()
        if self.outcome == "finished":
            self.final_fingerprint = self.canonical_digest()
            self.rt.event(
                EventKind.FINISHED,
                step=self.cursor.step,
                fingerprint=self.final_fingerprint,
                val_loss=self.final_val_loss,
                tokens_total=self.cursor.tokens,
            )
        for h in self._act_hooks:
            h.remove()
        self.teardown_generation()
        if self._stager is not None:
            self._stager.close()
        self.rt.close()
        self.rt.end_safely_at_exit()
        return self.outcome

    @property
    def world_size(self) -> int:
        return self.rt.world_size

    @property
    def rank(self) -> int:
        return self.rt.rank

    # ------------------------------------------------------------------------------------------
    # Generations
    def _fail(self, e: BaseException) -> None:
        """A generation broke (or every rank agreed to move to a newer one)."""
        if not self.rt.managed:
            raise e  # torchrun restarts the group
        if isinstance(e, Abandoned):
            self.rt.event(EventKind.ABANDONED, reason=str(e), has_state=self.has_state)
        elif isinstance(e, CollectiveFailed):
            self.rt.event(EventKind.COLLECTIVE_FAILED, error=str(e)[:500], has_state=self.has_state)
        else:
            self.rt.event(EventKind.GENERATION_CHANGE, step=self.cursor.step, has_state=self.has_state)
        if self.mesh is not None:
            sharded.release(self.model, self.mesh)
        self.teardown_generation(broken=not isinstance(e, GenerationChange))
        # Without its traceback: the frames it holds would keep the broken groups alive (see release).
        self._broken = e.with_traceback(None)
        e.__context__ = e.__cause__ = None

    def _rebind_mesh(self) -> None:
        """Move the sharded model to the generation just formed (see :mod:`stanchion.sdk.sharded`)."""
        try:
            sharded.rebind(self.model, self.mesh)
        except sharded.LayoutChanged as e:
            # Every rank sees the same world, so all leave: their agents start new processes,
            # which build the mesh for this world and restore a checkpoint.
            log.warning("the sharded model cannot re-form in place (%s): exiting for a new process", e)
            raise SystemExit(contract.EXIT_ERROR) from e

    def _reform(self) -> None:
        """Wait for the next assignment and join it (again on failure); exits if told to stop."""
        while self._broken is not None:
            if self.rt.stop_requested:
                raise SystemExit(contract.EXIT_OK)
            failed = self.rt.assignment.generation
            try:
                assignment = self.rt.wait_for_next(failed)
            except Superseded:
                raise SystemExit(contract.EXIT_SUPERSEDED) from None
            self._broken = None
            try:
                self.rt.form()
                if self.mesh is not None:
                    self._rebind_mesh()
                self._enter(assignment)
            except (*_REFORM, GenerationChange) as e:
                self._fail(e)

    def _enter(self, assignment: Assignment | None) -> None:
        """The group is formed: a checkpoint manager for it, the state, the first checks."""
        try:
            ckpt_pg = new_group(self.rt.collective_timeout_s)
            if self.async_checkpoint and self._stager is None:
                self._stager = new_stager(self.rt.device)
            self.ckpt = CheckpointManager(
                self.rt.run_dir,
                rank=self.rt.rank,
                keep=self.keep_checkpoints,
                async_save=self.async_checkpoint,
                events=lambda name, f: self.rt.event(name, **f),
                process_group=ckpt_pg,
                fault_point=self.rt.fault_hooks.freeze_point,
                generation=self.rt.generation,
                stager=self._stager,
            )
            self.restore(assignment)
            self.stragglers.reset()  # a new generation: other peers, maybe other hardware
            self._compute_s = 0.0
            self.rt.event(
                EventKind.STARTED,
                world_size=self.rt.world_size,
                pid=os.getpid(),
                node_id=os.environ.get(contract.ENV_NODE_ID, ""),
                resumed_step=self.cursor.step,
            )
        except (*_REFORM, GenerationChange) as e:
            self._fail(e)

    def teardown_generation(self, *, broken: bool = False) -> None:
        """Leave the generation; a broken one at once: a checkpoint in flight is abandoned, not
        awaited, and collectives still in flight are not waited for (see ``leave_group``)."""
        self._pending_check = None  # its verdict would have come in this generation's agreement
        self._shard_group = None  # made of this generation's ranks
        self.snapshots.settle()  # a copy still running (local: it always ends) is complete or raises
        if self.ckpt is not None:
            step = self.ckpt.abandon()
            if step is not None:
                self.rt.event(
                    EventKind.CHECKPOINT_ABANDONED, step=step, reason="the group broke while it was in flight"
                )
            self.ckpt = None
        self.rt.leave(broken=broken)

    def settle_copies(self) -> None:
        """Wait for the copies of the state still running in the background (a snapshot, a
        checkpoint's staging) before the state is written."""
        self.snapshots.settle()
        if self.ckpt is not None:
            self.ckpt.settle()

    # ------------------------------------------------------------------------------------------
    # Restoring state for a generation
    def restore(self, assignment: Assignment | None) -> None:
        assert self.ckpt is not None
        self.settle_copies()  # what follows writes the state a snapshot or a checkpoint may still be copying
        # Without an agent: resume "none" starts from step 0; "auto" or a path loads a checkpoint.
        mode = (
            assignment.resume
            if assignment
            else (Resume.FRESH if self.resume == "none" else Resume.CHECKPOINT)
        )
        explicit = (
            assignment.checkpoint if assignment else ("" if self.resume in ("auto", "none") else self.resume)
        )
        restored = False
        why: str | None = f"resume: {mode.value}"  # why a checkpoint, if one is restored
        if assignment is not None and assignment.rollback_to >= 0 and self.has_state:
            # Roll back past an alarm's onset before anyone serves as a healing source.
            snap = self.snapshots.newest_at_or_before(assignment.rollback_to)
            if snap is not None:
                self._restore_snapshot(snap)
            else:
                self.has_state = False  # nothing old enough here: do not serve as a source
        if mode == Resume.PEER:
            why = self._heal_from_peer()
            if why is not None and assignment is not None and assignment.rollback_to >= 0:
                why += f"; the assignment rolls back to step {assignment.rollback_to}"
            restored = why is None
        if not restored and mode != Resume.FRESH:
            max_step = (
                assignment.rollback_to if assignment is not None and assignment.rollback_to >= 0 else None
            )
            path = self.ckpt.find_resume(explicit, max_step=max_step, fallback=assignment is not None)
            if path is not None:
                self._load_checkpoint(path, why=why or "")
                restored = True
        if not restored:
            self._reset_to_initial()
        if assignment is not None:  # the coordinator's list of skipped windows is authoritative
            self.cursor.skip_windows = [list(w) for w in assignment.skip_windows]
        self.has_state = True
        self.snapshots.clear()
        self.spikes.forget_after(self.cursor.step)
        if self.check_fingerprints(reason="start of generation") and self.cadence.snapshot.every:
            self.take_snapshot()  # the first rollback target (snapshot_every=0: no snapshots at all)
            self.snapshots.reserve(self.model, self.optimizer)  # the later ones' buffers, on a thread
        if self.cursor.step == 0 and self.protections.startup_check and self.loss_fn is not None:
            self.startup_determinism_check()

    def _extra(self) -> dict[str, Any]:
        """What besides tensors travels with a snapshot, a heal and a checkpoint."""
        return {
            "cursor": self.cursor.to_json(),
            "spikes": self.spikes.state(),
            "state": {k: v.state_dict() for k, v in self.state.items()},
        }

    def _load_extra(self, extra: Mapping[str, Any], *, keep_decisions: bool = False) -> None:
        request_id, windows = self.cursor.request_id, self.cursor.skip_windows
        self.cursor = Cursor.from_json(extra["cursor"])
        if keep_decisions:
            # Handled requests stay handled and skipped windows stay skipped: both are decisions about
            # the future, not state of the past.
            self.cursor.request_id, self.cursor.skip_windows = request_id, windows
        if "spikes" in extra:
            self.spikes.load_state(extra["spikes"])
        for name, sd in (extra.get("state") or {}).items():
            if name in self.state:
                self.state[name].load_state_dict(copy.deepcopy(sd))

    def _heal_from_peer(self) -> str | None:
        """Pick the live rank with the newest state and broadcast it to everyone else. Returns None
        when healed, else why not (every rank then restores a checkpoint)."""
        device = self.rt.device
        mine = torch.tensor(
            [1 if self.has_state else 0, self.cursor.step, self.cursor.last_agreed_step],
            dtype=torch.int64,
            device=device,
        )
        rows = all_gather_rows(mine, "choosing a healing source")
        stateful = [r for r in range(rows.shape[0]) if rows[r, 0] == 1]
        if not stateful:
            return "no live rank holds state to heal from"
        # Heal only from verified state. A replica corrupted after the last fingerprint agreement A
        # passed the damage to every survivor through its gradients of step A + 2 onwards (those of
        # step A + 1 came from its state at A, which agreed). So survivors past A + 1 first go back
        # to their newest snapshot at or before A (all hold the same snapshots). With fingerprints
        # every step (the default) that never happens: no step is lost.
        verified = min(int(rows[r, 2]) for r in stateful)
        if any(int(rows[r, 1]) > verified + 1 for r in stateful) and self.has_state:
            snap = self.snapshots.newest_at_or_before(verified)
            from_step = self.cursor.step
            if snap is not None:
                self._restore_snapshot(snap)
                self.rt.event(
                    EventKind.HEAL_ROLLBACK,
                    from_step=from_step,
                    step=self.cursor.step,
                    reason=f"state after step {verified} was never compared across replicas",
                )
            else:  # nothing verified to heal from here: a checkpoint restores everyone
                self.has_state = False
        mine = torch.tensor([1 if self.has_state else 0, self.cursor.step], dtype=torch.int64, device=device)
        rows = all_gather_rows(mine, "choosing a healing source")
        groups = self.replica_groups()
        held = [(bool(r[0]), int(r[1])) for r in rows.tolist()]
        plan = heal_sources(held, groups)
        if plan is None:
            return (
                f"no verified state at step {verified} or later to heal from "
                f"(has state, step, by rank: {held}; replica groups {groups})"
            )
        best_step, sources = plan
        mine_group = next(i for i, g in enumerate(groups) if self.rt.rank in g)
        if len(groups[mine_group]) == 1:  # sharded without replicas: this rank's own state is it
            return None
        src = sources[mine_group]
        t0 = time.perf_counter()
        group = None if self.mesh is None else self.mesh.get_group(self.replicate_dim)
        extra = broadcast_training_state(self.model, self.optimizer, self._extra(), src=src, group=group)
        self._load_extra(extra)
        self.rt.event(
            EventKind.HEALED, source_rank=src, step=best_step, seconds=round(time.perf_counter() - t0, 4)
        )
        return None

    def _load_checkpoint(self, path: Path, *, why: str) -> None:
        assert self.ckpt is not None
        manifest = self.ckpt.load(path, self.model, self.optimizer)
        extra = {"cursor": manifest.get("cursor", {"step": manifest["step"]})}
        if "spikes" in manifest:
            extra["spikes"] = manifest["spikes"]
        if manifest.get("state"):
            extra["state"] = decode_state(manifest["state"])
        self._load_extra(extra)
        self.cursor.step = int(manifest["step"])
        digest = self.canonical_digest()
        if manifest.get("fingerprint") and digest != manifest["fingerprint"]:
            raise RuntimeError(
                f"checkpoint {path} loaded but its state fingerprint {digest} differs from the manifest's "
                f"{manifest['fingerprint']}: refusing to train on it"
            )
        self.rt.event(
            EventKind.RESTORED, path=str(path), step=self.cursor.step, fingerprint=digest, reason=why
        )
        changed = numerics.differences(manifest.get("numerics", {}), self.numerics())
        if changed:
            log.warning(
                "resumed from %s under other numerics (%s): the run goes on, but no longer bit-exact "
                "with the one that wrote the checkpoint",
                path,
                "; ".join(changed),
            )
            self.rt.event(EventKind.NUMERICS_CHANGED, path=str(path), step=self.cursor.step, changed=changed)

    def numerics(self) -> dict[str, Any]:
        return numerics.settings(self.rt.device, self.params, self.precision)

    def _host_copy(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optim": copy.deepcopy(self.optimizer.state_dict()),
            "state": {k: copy.deepcopy(v.state_dict()) for k, v in self.state.items()},
        }

    def _reset_to_initial(self) -> None:
        if self.has_state:  # a used process told to start over: identical to a fresh one
            self.optimizer.zero_grad(set_to_none=True)
            if self._initial is not None:
                self._initial()
            else:
                init = self._initial_copy
                with torch.no_grad():
                    for k, v in self.model.state_dict().items():
                        v.copy_(init["model"][k])
                self.optimizer.load_state_dict(copy.deepcopy(init["optim"]))
                for k, sd in init["state"].items():
                    self.state[k].load_state_dict(copy.deepcopy(sd))
        self.cursor = Cursor()

    def startup_determinism_check(self) -> None:
        """Compute the first micro-batch's gradient twice; unequal digests mean results are not
        bitwise reproducible here, which exact fingerprints, resume and bisection all rely on."""
        batch, digests = self.batch_at(0, self.rt.rank, 0), []
        with liveness.pause("start-up determinism check"):
            for _ in range(2):
                self.optimizer.zero_grad(set_to_none=True)
                digests.append(self.local_grad_digest(lambda: self.loss_fn(self.model, batch).backward()))
        self.optimizer.zero_grad(set_to_none=True)
        if digests[0] != digests[1]:
            log.error("NOT DETERMINISTIC: two replays of the first micro-batch gave different gradients")
            self.rt.event(EventKind.NONDETERMINISTIC, digests=[str(d) for d in digests])

    # ------------------------------------------------------------------------------------------
    # Committing a step
    def _audit_due(self, step_no: int) -> bool:
        return self.cadence.audit.due(step_no) and self.loss_fn is not None and self.rt.world_size > 1

    def _commit(self, s: Step) -> None:
        """The rest of the step once the user's gradients exist (see the module's docstring)."""
        hooks, step_no = self.rt.fault_hooks, s.number
        audit_due = self._audit_due(step_no)
        audit_next = self.recompute_neighbour(s) if audit_due else None
        hooks.corrupt_grads(step_no, self.model)
        hooks.hang_point(step_no)
        if self.grad_sync is not None:
            self.grad_sync.all_reduce_mean(self.rt.world_size)
        agreed = self.agree(s, audit_next)
        s.loss = agreed.loss
        self._compute_s = s.compute_s  # travels in the next step's agreement
        self.watch_stragglers(step_no, agreed)
        # The previous step's fingerprints travelled in this agreement: if the replicas disagreed,
        # the state this step would update is already wrong (see settle_check).
        roll_back = self.settle_check(agreed) and self._rolls_back
        sq, labels, grad_norm = self.grad_norms()
        record = self.new_record(s, grad_norm)
        force_check = False  # replicas diverged under the audit: check fingerprints this step
        if agreed.nonfinite_ranks or not math.isfinite(grad_norm):
            self.skip_step(record, agreed.nonfinite_ranks, grad_norm)
            s.committed = False
        elif roll_back:  # not applied: the rollback below returns to agreed state
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = True
            s.committed = False
        else:
            self.clip(grad_norm)
            self.settle_copies()  # a snapshot or a checkpoint still being copied reads what this step writes
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            hooks.corrupt_state(step_no, self.model, self.optimizer)
            force_check = audit_due and not self.judge_audit(step_no, agreed)
            self.watch_spikes(step_no, record)
            s.committed = True
        for sched in self.schedulers:  # a skipped step is a step of the schedule too
            sched.step()
        self.cursor.step = step_no
        self.cursor.tokens += self.tokens_per_step
        if roll_back:
            self.rollback_mismatch()
        else:
            self.periodic_checks(step_no, force_check)
        if agreed.newest_request > self.cursor.request_id:
            self.handle_request(agreed.newest_request, agreed)
        self.finish_record(record, s, sq, labels)
        if agreed.stop:
            self.save_checkpoint(blocking=True)
            self.rt.event(EventKind.STOPPED, reason="SIGTERM")
            self.outcome = "stopped"
        elif self.cadence.eval.due(step_no) and step_no < self.steps:
            self.evaluate()

    def recompute_neighbour(self, s: Step) -> int:
        """Gradient digest of the next rank's first micro-batch, computed here (the audit)."""
        stash = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        batch = self.batch_at(s.data_index, (self.rt.rank + 1) % self.rt.world_size, 0)
        digest = self.local_grad_digest(lambda: (self.loss_fn(self.model, batch) / s._accum).backward())
        for p, g in zip(self.params, stash, strict=True):
            p.grad = g
        return digest

    def local_grad_digest(self, backward: Callable[[], None]) -> int:
        """Run ``backward`` (one micro-batch's, onto empty gradients) and digest the local gradient
        it made: the parameters' gradients, or under FSDP the inputs of its reduce-scatters (every
        rank computing the same micro-batch from the same parameters gets the same digest)."""
        if self._grad_digest is None:
            backward()
            return grad_digest(self.params)
        prints: list[torch.Tensor] = []
        with self._grad_digest.capture(prints):
            backward()
        return digest_of(prints)

    def params_digest(self) -> int:
        """Digest of the parameters an audit's gradients came from, equal on ranks that used the
        same ones: under FSDP, summed over the shards of this rank's replica."""
        d = digest_of(self.params)
        if self.mesh is None:
            return d
        t = torch.tensor([d], dtype=torch.int64, device=self.rt.device)
        with collective("parameter digest all-reduce"):
            work = dist.all_reduce(t, group=self.shard_group(), async_op=True)
        wait(work, "parameter digest all-reduce")
        return int(t.item())

    def control(self, s: Step, loss: float | torch.Tensor, audit_next: int | None = None) -> Control:
        """This rank's row of the step's agreement (``audit_next``: on audit steps only)."""
        rt, audit_due = self.rt, audit_next is not None
        return Control(
            step_index=s.index,
            loss=loss,
            stop=rt.stop_requested,
            request=self.newest_request_id(),
            next_generation=rt.newest_assignment_generation() if rt.managed else -1,
            audit_own=s._audit_own,
            audit_next=audit_next or 0,
            # On audit steps, the parameters the gradients came from: an audit between replicas whose
            # parameters already differ says nothing about compute (the fingerprint check names them).
            param_digest=self.params_digest() if audit_due else 0,
            state_digest=self._pending_check.folded if self._pending_check else 0,
            compute_us=round(self._compute_s * 1e6),
        )

    def agree(self, s: Step, audit_next: int | None) -> Agreement:
        if s._agreement is not None:
            agreed = s._agreement()
        else:
            loss = s.local_loss() if s._losses else 0.0
            agreed = Agreement.gather(self.control(s, loss, audit_next), self.rt.device)
        if agreed.newest_generation > self.rt.generation:
            # A newer generation exists (membership change): everyone leaves at this step, before
            # applying it, and rejoins with the state it has (the step is recomputed there).
            self.optimizer.zero_grad(set_to_none=True)
            raise GenerationChange()
        return agreed

    def grad_norms(self) -> tuple[torch.Tensor, list[str], float]:
        """Per-layer-group squared gradient norms, their labels, and the global norm."""
        sq, labels = group_norms(self.model, self.layer_groups)
        if self.mesh is not None:
            # Sharded: sum the shards' squares over one replica's ranks, so that each shard counts
            # once (summed over the whole world, HSDP's R replicas made the norm sqrt(R) too large).
            group = self.shard_group()
            with collective("layer norm all-reduce"):
                work = dist.all_reduce(sq, group=group, async_op=True)
            wait(work, "layer norm all-reduce")
        return sq, labels, float(sq.sum().sqrt())

    def shard_group(self) -> dist.ProcessGroup | None:
        """The ranks of this rank's replica (None: the whole world, under plain FSDP)."""
        if self.replicate_dim is None:
            return None
        if self._shard_group is None:  # every rank gets here at the same step: the groups form together
            mesh, names = self.mesh.mesh.tolist(), list(self.mesh.mesh_dim_names)
            self._shard_group, _ = dist.new_subgroups_by_enumeration(
                shard_groups(mesh, names, self.replicate_dim)
            )
        return self._shard_group

    def new_record(self, s: Step, grad_norm: float) -> dict[str, Any]:
        return {
            "step": s.number,
            "loss": s.loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": grad_norm,
            "generation": self.rt.generation,
            "rank": self.rt.rank,
            "world_size": self.rt.world_size,
            "data_index": s.data_index,
            "micro_batches": s._losses,
            "job_id": self.rt.job_id,
        }

    def skip_step(self, record: dict[str, Any], nonfinite_ranks: list[int], grad_norm: float) -> None:
        """Non-finite guard: every rank saw the same agreement, so every rank skips the same step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite"] += 1
        self.snapshots.pin(record["step"] - 1)  # the replay's rollback target, until the rollback comes
        self.rt.event(
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
        coef = self.grad_clip / (grad_norm + 1e-6) if self.grad_clip else 1.0
        if coef < 1.0:
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)

    def watch_spikes(self, step_no: int, record: dict[str, Any]) -> None:
        for spike in self.spikes.observe(step_no, {"loss": record["loss"], "grad_norm": record["grad_norm"]}):
            self.counters["spikes"] += 1
            self.snapshots.pin(step_no - 1)  # the replay's rollback target, until the rollback comes
            self.rt.event(
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

    def watch_stragglers(self, step_no: int, agreed: Agreement) -> None:
        """Every rank sees every rank's compute time; a straggler reports itself (one event each)."""
        started, ended = self.stragglers.observe(step_no, agreed.compute_s)
        me = self.rt.rank
        for s in started:
            if s.rank == me:
                self.counters["stragglers"] += 1
                log.warning(
                    "straggler: rank %d's own compute took %.2fx its peers' median over %d steps "
                    "(%.4fs against %.4fs)",
                    me,
                    s.ratio,
                    s.window,
                    s.own_s,
                    s.peers_s,
                )
                self.rt.event(
                    EventKind.STRAGGLER,
                    step=step_no,
                    suspect_ranks=[me],
                    ratio=s.ratio,
                    own_s=s.own_s,
                    peers_s=s.peers_s,
                    window=s.window,
                    threshold=self.stragglers.threshold,
                )
        if me in ended:
            self.rt.event(
                EventKind.STRAGGLER_CLEARED, step=step_no, suspect_ranks=[me], ratio=self.stragglers.ratio(me)
            )

    def periodic_checks(self, step_no: int, force_check: bool) -> None:
        """Fingerprints when due (and before every checkpoint); a snapshot only of agreed state.

        When nothing waits on the verdict (no checkpoint or audit alarm at this step), the
        fingerprints are folded into the next step's agreement instead of an all-gather of their
        own: the verdict then comes one step later, before that step is applied. A snapshot due at
        such a step is copied at once and becomes a rollback target with that verdict."""
        c = self.cadence
        if not (c.fingerprint.due(step_no) or c.checkpoint.due(step_no) or force_check):
            return
        # A snapshot may wait for a folded verdict when the ring can hold it beside a verified one.
        fold_snapshot = self.protections.snapshots_kept >= 2 or not c.snapshot.due(step_no)
        if self.rt.world_size > 1 and fold_snapshot and not (c.checkpoint.due(step_no) or force_check):
            names, values = fingerprint.fingerprints(fingerprint.named_state(self.model, self.optimizer))
            self._pending_check = PendingCheck(step_no, names, values, fingerprint.folded(values))
            if c.snapshot.due(step_no):  # a rollback target once the verdict says the replicas agree
                self.take_snapshot(verified=False)
            return
        if self.check_fingerprints(reason="periodic", in_place=True):
            if c.snapshot.due(step_no):
                self.take_snapshot()
        elif self._rolls_back:  # every rank saw the same comparison
            self.rollback_mismatch()

    def settle_check(self, agreed: Agreement) -> bool:
        """The verdict on the fingerprints folded into this step's agreement: True when replicas
        disagree (the event is out). Every rank holds a pending check at the same steps, and reads
        the same agreement, so all of them take the same branch and its all-gather lines up."""
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return False
        if all(agreed.states_agree(g) for g in self.replica_groups() if len(g) > 1):
            self.cursor.last_agreed_step = pending.step
            self.snapshots.verify(pending.step)
            return False
        # Someone differs: the whole vectors name the odd rank and the tensors.
        rows = all_gather_rows(pending.values.to(self.rt.device), "fingerprint all-gather")
        if self.judge_fingerprints(pending.step, pending.names, rows, reason="periodic", in_place=True):
            self.snapshots.verify(pending.step)
            return False
        self.snapshots.reject_unverified()  # a snapshot of this state is no rollback target
        return True

    def rollback_mismatch(self) -> None:
        """Back to the last state the replicas agreed on: the target the mismatch event named."""
        self.rollback(
            contract.Request(
                id=self.cursor.request_id,
                kind="rollback",
                to_step=self.cursor.last_agreed_step,
                reason="fingerprint mismatch",
            )
        )

    def finish_record(self, record: dict[str, Any], s: Step, sq: torch.Tensor, labels: list[str]) -> None:
        for fired in self.rt.fault_hooks.drain():
            self.rt.event(EventKind.FAULT_INJECTED, **fired)
        step_time = time.perf_counter() - s._t0
        record.update(
            step_time_s=step_time,
            tokens=self.tokens_per_step,
            tokens_total=self.cursor.tokens,
            tokens_per_s=self.tokens_per_step / step_time,
            **mfu(self.flops_per_token, self.tokens_per_step / step_time, self.peak_flops),
            layer_grad_norms={
                lab: math.sqrt(max(float(v), 0.0)) for lab, v in zip(labels, sq.tolist(), strict=True)
            },
            activation_norms=[float(a) for a in self._act_norms],
            compute_s=s.compute_s,
            straggler_ratio=self.stragglers.ratio(self.rt.rank),
            **{f"{k}_total": v for k, v in self.counters.items()},
            checkpoint_stall_s=self.ckpt.last_stall_s if self.ckpt else 0.0,
        )
        self.rt.record(record)

    def _activation_hook(self, i: int) -> Callable[..., None]:
        """RMS of a watched module's output in the step's first forward pass (by position ``i``)."""

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if self._in_step is not None and self._in_step._losses == 0 and len(self._act_norms) == i:
                out = output[0] if isinstance(output, tuple) else output
                self._act_norms.append(out.detach().float().pow(2).mean().sqrt())

        return hook

    def judge_audit(self, step_no: int, agreed: Agreement) -> bool:
        """Returns False when the audit could not judge compute because replicas diverged."""
        if not agreed.params_agree():
            return False
        verdict = audit_verdict([r.audit_own for r in agreed.rows], [r.audit_next for r in agreed.rows])
        if not verdict.agree:
            self.counters["audit_mismatches"] += 1
            last_clean = step_no - self.protections.audit_every
            self.rt.event(
                EventKind.AUDIT_MISMATCH,
                step=step_no,
                suspect_ranks=list(verdict.suspect_ranks),
                bad_edges=[list(e) for e in verdict.bad_edges],
                reason=verdict.reason,
                onset_window=[max(last_clean, 0), step_no],
            )
        return True

    def check_fingerprints(self, *, reason: str, in_place: bool = False) -> bool:
        """All-gather fingerprints of parameters and optimizer state; compare replicas exactly."""
        self._pending_check = None  # this check supersedes one waiting for the next agreement
        step = self.cursor.step
        if self.rt.world_size == 1:
            self.cursor.last_agreed_step = step
            return True
        names, values = fingerprint.fingerprints(fingerprint.named_state(self.model, self.optimizer))
        rows = all_gather_rows(values.to(self.rt.device), "fingerprint all-gather")
        return self.judge_fingerprints(step, names, rows, reason=reason, in_place=in_place)

    def judge_fingerprints(
        self, step: int, names: list[str], rows: torch.Tensor, *, reason: str, in_place: bool = False
    ) -> bool:
        """Compare each replica group's rows of fingerprints of the state after ``step``; an event
        names the odd ranks and tensors when they differ.

        ``in_place``: the caller can roll back at this verdict (a periodic check). It then does,
        when ``self._rolls_back`` says so: with ``on_mismatch="rollback"``, or under an agent when no
        rank can be named (no majority) and a snapshot of agreed state is at hand, which is what the
        coordinator would ask for, only 2-3 steps later. The event names the step
        (``rolls_back_to``; -1: the coordinator's to answer), so it does not ask again."""
        self._rolls_back = False
        for group in self.replica_groups():
            if len(group) < 2:
                continue
            cmp = fingerprint.compare_replicas({r: rows[r] for r in group}, names)
            if not cmp.agree:
                self.counters["fingerprint_mismatches"] += 1
                # The rollback target is the last agreement, on every rank alike (a majority's
                # snapshot of this step is not one: all ranks must hold the same targets).
                self.snapshots.pin(self.cursor.last_agreed_step)
                mode = self.protections.on_mismatch
                target = self.snapshots.newest_at_or_before(self.cursor.last_agreed_step)
                self._rolls_back = in_place and (
                    mode == "rollback" or (self.rt.managed and not cmp.suspect_ranks and target is not None)
                )
                self.rt.event(
                    EventKind.FINGERPRINT_MISMATCH,
                    step=step,
                    suspect_ranks=list(cmp.suspect_ranks),
                    reason=cmp.reason,
                    tensors=list(cmp.mismatched_tensors)[:20],
                    onset_window=[self.cursor.last_agreed_step, step],
                    check=reason,
                    rolls_back_to=target.step if self._rolls_back and target is not None else -1,
                )
                return False
        self.cursor.last_agreed_step = step
        return True

    def replica_groups(self) -> list[list[int]]:
        if self.mesh is None:
            return [list(range(self.rt.world_size))]
        return replica_groups(self.mesh.mesh.tolist(), list(self.mesh.mesh_dim_names), self.replicate_dim)

    def take_snapshot(self, *, verified: bool = True) -> None:
        # Hyperparameters too (a scheduler sets the learning rate in the optimizer's param groups):
        # a rollback must train on with the values of the step it returns to.
        hyper = [
            {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in self.optimizer.param_groups
        ]
        extra = {**self._extra(), "hyper": hyper}
        # Copied while the next step's forward and backward run; settled before its optimizer step.
        self.snapshots.take(
            self.cursor.step,
            self.model,
            self.optimizer,
            extra,
            background=self.protections.snapshot_in_background,
            verified=verified,
        )

    # ------------------------------------------------------------------------------------------
    # Requests from the agent (rollback in place)
    def newest_request_id(self) -> int:
        reqs = self.rt.paths.requests(self.cursor.request_id)
        return reqs[-1].id if reqs else self.cursor.request_id

    def handle_request(self, request_id: int, agreed: Agreement) -> None:
        """Every rank handles the agreed request at the same step; the lowest rank holding the
        request file broadcasts its content so no rank waits for its own copy."""
        src = min(agreed.holders_of(request_id))
        mine = [r.to_json() for r in self.rt.paths.requests(self.cursor.request_id) if r.id == request_id]
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
            self.rt.event(
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
        self.rt.event(
            EventKind.ROLLBACK,
            request_id=req.id,
            from_step=from_step,
            step=self.cursor.step,
            skip=[list(w) for w in req.skip],
            reason=req.reason,
        )

    def _restore_snapshot(self, snap: Any) -> None:
        self._pending_check = None  # a check of the state left behind
        extra = self.snapshots.restore(snap, self.model, self.optimizer)
        self._load_extra(extra, keep_decisions=True)
        for group, saved in zip(self.optimizer.param_groups, extra.get("hyper", ()), strict=False):
            for k, v in saved.items():
                if torch.is_tensor(v) and torch.is_tensor(group.get(k)):
                    group[k].copy_(v)  # a tensor learning rate is updated in place, never replaced
                else:
                    group[k] = copy.deepcopy(v)

    # ------------------------------------------------------------------------------------------
    # Checkpoints, evaluation, the end
    def canonical_digest(self) -> str:
        """The whole training state's fingerprint, independent of sharding and world size."""
        if self.mesh is None:
            return fingerprint.state_digest(self.model, self.optimizer)
        full = [
            (n, t.full_tensor() if hasattr(t, "full_tensor") else t)
            for n, t in fingerprint.named_state(self.model, self.optimizer)
        ]
        return fingerprint.digest(fingerprint.fingerprints(full)[1])

    def save_checkpoint(self, *, blocking: bool = False) -> None:
        with liveness.pause("checkpoint"):
            self._save_checkpoint(blocking=blocking)

    def _save_checkpoint(self, *, blocking: bool) -> None:
        t0 = time.perf_counter()  # the stall counts the fingerprints and the manifest's fields too
        step = self.cursor.step
        agreed = self.cursor.last_agreed_step == step
        if not agreed:
            agreed = self.check_fingerprints(reason="checkpoint")
        if not agreed:
            self.rt.event(
                EventKind.CHECKPOINT_SKIPPED, step=step, reason="replica fingerprints disagree at this step"
            )
            return
        fields = {
            "config": self.config,
            "cursor": self.cursor.to_json(),
            "spikes": self.spikes.state(),
            "fingerprint": self.canonical_digest(),
            "replicas_agree": True,
            "world_size": self.rt.world_size,
            "parallel": "ddp" if self.mesh is None else "fsdp",
            "generation": self.rt.generation,
            "numerics": self.numerics(),
        }
        if self.state:
            fields["state"] = encode_state({k: v.state_dict() for k, v in self.state.items()})
        self.rt.fault_hooks.freeze_point(step, "checkpoint")
        stall = self.ckpt.save(step, self.model, self.optimizer, fields, blocking=blocking, since=t0)
        log.info("checkpoint at step %d: training blocked %.3f s", step, stall)

    def evaluate(self) -> float | None:
        """Run the program's ``evaluate`` (every rank, in step); an ``eval`` event with its value."""
        if self.evaluate_fn is None:
            return None
        with liveness.pause("evaluation"):
            val = float(self.evaluate_fn())
        self.rt.event(EventKind.EVAL, step=self.cursor.step, val_loss=val)
        return val

    def _conclude(self) -> bool:
        """The end of training, inside the generation: its collectives can lose a peer like any
        step's, and a re-formed generation (survivors keep their state) does this part again.
        Returns False when the last step's replica check rolled the run back: it goes on."""
        if self._pending_check is not None:  # no next step brings its verdict: check now
            self.periodic_checks(self.cursor.step, force_check=True)
            if self.cursor.step < self.steps:
                return False
        self.final_val_loss = self.evaluate()
        if self.cadence.checkpoint.every:
            self.save_checkpoint(blocking=True)
        self.ckpt.wait()
        return True


def replica_groups(mesh: Any, dim_names: Sequence[str], replicate_dim: str | None) -> list[list[int]]:
    """Ranks holding the same state in a device mesh (nested lists of global ranks, one axis per
    name): the ranks along ``replicate_dim`` that share every other coordinate. Without a replicate
    dimension (plain FSDP) every rank holds its own shard and has no replica."""
    ranks = torch.tensor(mesh)
    if replicate_dim is None:
        return [[int(r)] for r in ranks.flatten()]
    if replicate_dim not in dim_names:
        raise ValueError(
            f"guard(replicate_dim={replicate_dim!r}): the mesh's dimensions are {list(dim_names)}"
        )
    axis = list(dim_names).index(replicate_dim)
    return [[int(r) for r in row] for row in ranks.movedim(axis, -1).reshape(-1, ranks.shape[axis])]


def heal_sources(
    ranks: Sequence[tuple[bool, int]], groups: Sequence[Sequence[int]]
) -> tuple[int, list[int]] | None:
    """Where each replica group heals from: ``ranks[r]`` is (has state, step) of rank r, ``groups``
    the ranks holding the same state (:func:`replica_groups`). Returns (step, the source rank of
    each group): in each group its member with state at the newest step, the lowest rank first.
    None when some group has no member with state, or the groups' newest steps differ: then no
    set of sources makes a whole model, and a checkpoint restores everyone."""
    best = []
    for g in groups:
        held = [(ranks[r][1], -r) for r in g if ranks[r][0]]
        if not held:
            return None
        best.append(max(held))
    steps = {step for step, _ in best}
    if len(steps) != 1:
        return None
    return steps.pop(), [-neg for _, neg in best]


def shard_groups(mesh: Any, dim_names: Sequence[str], replicate_dim: str) -> list[list[int]]:
    """The complement of :func:`replica_groups`: for each position along ``replicate_dim``, the
    ranks of that one replica, which together hold every shard once."""
    ranks = torch.tensor(mesh)
    axis = list(dim_names).index(replicate_dim)
    return [[int(r) for r in ranks.select(axis, i).flatten()] for i in range(ranks.shape[axis])]


def top_level_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Gradient-norm groups by the model's top-level children (a bounded set of labels)."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    return groups


def encode_state(state: dict[str, Any]) -> dict[str, Any]:
    """Registered objects' state for a checkpoint manifest: JSON as is, else torch.save bytes."""
    try:
        json.dumps(state, allow_nan=False)
        return {"json": state}
    except (TypeError, ValueError):
        buf = io.BytesIO()
        torch.save(state, buf)
        return {"torch": base64.b64encode(buf.getvalue()).decode()}


def decode_state(encoded: dict[str, Any]) -> dict[str, Any]:
    if "json" in encoded:
        return encoded["json"]
    return torch.load(io.BytesIO(base64.b64decode(encoded["torch"])), weights_only=False)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> dict[str, float]:
    """``{"mfu": ...}``: the job's model FLOP/s over all its devices' dense bf16 peak; {} when the
    model's FLOPs or the devices' peak are unknown."""
    if not flops_per_token or not peak_flops:
        return {}
    return {"mfu": flops_per_token * tokens_per_s / peak_flops}


def guard(rt: Runtime, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Guard:
    """Register the program's model, optimizer and state with Stanchion; see :class:`Guard`.

    Options: ``steps`` (required), ``state`` (name -> object with ``state_dict``/``load_state_dict``,
    identical on every data-parallel rank), ``schedulers`` (stepped once per step, committed or
    skipped), ``batch_at(data_index, dp_rank, micro)`` and ``loss_fn(model, batch)`` (the audit and
    the start-up determinism check), ``evaluate`` and ``eval_every``, ``mesh`` and
    ``replicate_dim`` (FSDP2/HSDP), ``protections``, ``checkpoint_every``, ``keep_checkpoints``,
    ``async_checkpoint``, ``grad_clip``, ``tokens_per_step`` and ``flops_per_token`` (the
    progress records' tokens/s and, on a GPU whose peak is known, MFU), ``layer_groups``, ``activations``
    (modules whose output RMS is recorded), ``initial_state`` (a function that re-initialises the
    model and optimizer; default: a host copy is kept), ``config`` (stored in every manifest),
    ``resume`` (torchrun only: "auto", "none" or a checkpoint path), ``precision`` (what
    ``loss_fn`` computes in, e.g. "bf16": recorded with the other numerics of every checkpoint).
    """
    return Guard(rt, model, optimizer, **options)
