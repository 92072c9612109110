"""Fault injection: a replayable schedule of real faults inside trainer ranks.

Driven by ``--faults FILE`` (a JSON list) so every chaos run can be replayed. Off unless a schedule is
given: with no schedule the trainer holds ``None`` instead of an injector and no hook is installed.

Entries (``rank`` -1 means every rank; an optional ``"node": ID`` limits a fault to the ranks on that
node, for hardware faults that must follow the machine when ranks move):

- ``{"kind": "bitflip", "step": S, "rank": R, "target": "param"|"optim"|"grad"|"activation",
  "tensor": NAME|null, "index": I|null, "bit": B}``; ``grad`` is the rank's local gradient before
  the all-reduce, ``activation`` a block output in the forward pass.
- ``{"kind": "compute", "rank": R, "from_step": S, "prob": P}``: from step S, with probability P per
  step, the rank's matrix multiplications return a wrong element (a mercurial core).
- ``{"kind": "nan", "step": S, "rank": R}``: the rank's loss becomes NaN.
- ``{"kind": "crash", "step": S, "rank": R}``: the rank SIGKILLs itself.
- ``{"kind": "hang", "step": S, "rank": R}``: the rank blocks forever before the step's
  collectives (alive, beating, outside any collective), so its peers wait in their all-reduce.
- ``{"kind": "wedge", "step": S, "rank": R}``: the rank blocks forever *inside* a collective (a
  message the backend lost, a wedged device queue), so every rank is alive and in a collective.
- ``{"kind": "freeze", "step": S, "rank": R, "at": "step"|"checkpoint"}``: the rank SIGSTOPs itself,
  every thread at once (a process stuck in the kernel or on its device). ``at = "checkpoint"`` fires
  inside the checkpoint of step S, just before this rank takes part in it, so its peers are left with
  an asynchronous checkpoint in flight that can never complete; ``at = "commit"`` fires in the
  checkpoint's background thread after this rank wrote its part, before the commit vote, while the
  main thread trains on; ``at = "join"`` fires as the rank joins generation S (here ``step`` names a
  generation), before its group forms: a rank that never joins.
- ``{"kind": "slow", "rank": R, "from_step": S, "delay_s": D, "until_step": U|null}``.

One-shot faults (bitflip, nan, crash, hang) fire once per run: the firing rank records it with an
exclusive create in ``RUN_DIR/faults/``, so a replay after a rollback or restart sees a transient
fault that does not recur. ``"repeat": true`` makes one fire at every pass over its step instead
(a fault tied to the data, which the replay-first policy must classify as such).

A fired fault becomes a ``fault_injected`` event with the time it fired. Those after which the rank
does not go on (crash, hang, freeze) are written at once, before the process dies or stops; the
others at the end of their step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stanchion.sdk import liveness

if TYPE_CHECKING:  # the coordinator validates schedules without importing torch
    import torch

log = logging.getLogger(__name__)

KINDS = ("bitflip", "compute", "nan", "crash", "hang", "wedge", "freeze", "slow")
FREEZE_POINTS = ("step", "checkpoint", "commit", "join")
TARGETS = ("param", "optim", "grad", "activation")
_ONE_SHOT = ("bitflip", "nan", "crash", "hang", "wedge", "freeze")
_FINAL = ("crash", "hang", "wedge", "freeze")  # the process dies or stops where they fire


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = -1
    step: int = -1
    from_step: int = -1
    until_step: int = -1
    target: str = "param"
    tensor: str | None = None
    index: int | None = None
    bit: int = 30
    prob: float = 1.0
    delay_s: float = 0.0
    repeat: bool = False
    node: str = ""  # only ranks on this node (a hardware fault follows the machine, not the rank)
    data_index: int = -1  # instead of a step: fire at whichever step trains on this data (a poisoned batch)
    at: str = "step"  # freeze only: where in step ``step`` the rank stops (FREEZE_POINTS)
    id: int = 0

    def applies_to(self, rank: int, node: str = "") -> bool:
        return self.rank in (-1, rank) and self.node in ("", node)


def parse(entries: Any) -> list[Fault]:
    """Validate a schedule; errors name the entry and the field (types included)."""
    from stanchion.settings import ConfigError, build

    if not isinstance(entries, list):
        raise ValueError("faults: expected a JSON list of fault entries")
    out = []
    for i, e in enumerate(entries):
        where = f"faults[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object")
        if e.get("kind") not in KINDS:
            raise ValueError(f"{where}.kind: {e.get('kind')!r} is not one of {', '.join(KINDS)}")
        if "id" in e:
            raise ValueError(f"{where}: unknown field 'id'")
        try:
            f = build(Fault, {**e, "id": i}, path=where)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if f.kind in _ONE_SHOT and f.step < 0 and not (f.kind == "nan" and f.data_index >= 0):
            raise ValueError(f"{where}.step: a {f.kind} fault needs a step >= 0 (or, for nan, a data_index)")
        if f.kind in ("compute", "slow") and f.from_step < 0:
            raise ValueError(f"{where}.from_step: a {f.kind} fault needs from_step >= 0")
        if f.at not in FREEZE_POINTS:
            raise ValueError(f"{where}.at: expected one of {', '.join(FREEZE_POINTS)}")
        if f.target not in TARGETS:
            raise ValueError(f"{where}.target: expected one of {', '.join(TARGETS)}")
        if not 0 <= f.bit <= 63:
            raise ValueError(f"{where}.bit: expected 0..63")
        if not 0.0 <= f.prob <= 1.0:
            raise ValueError(f"{where}.prob: expected a probability in [0, 1]")
        if f.delay_s < 0:
            raise ValueError(f"{where}.delay_s: must be >= 0")
        out.append(f)
    return out


def load(path: str | os.PathLike[str]) -> list[Fault]:
    with open(path) as f:
        return parse(json.load(f))


def flip_bit(t: torch.Tensor, index: int, bit: int) -> None:
    """Flip one bit of element ``index`` (in row-major order) of ``t``, in place, whatever its strides."""
    import numpy as np
    import torch

    element = t.detach()[np.unravel_index(index, tuple(t.shape))] if t.dim() else t.detach()  # a 0-d view
    size = element.element_size()
    view = element.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[size])
    width = size * 8
    bit %= width
    mask = -(1 << (width - 1)) if bit == width - 1 else 1 << bit  # the sign bit as the type's minimum
    view ^= mask


class FaultHooks:
    """The trainer's fault-injection points, in the order a step reaches them. This base class
    injects nothing: it is what a run without a fault schedule uses, so the loop calls the hooks
    unconditionally. :class:`FaultInjector` fires a schedule's faults at them."""

    def set_rank(self, rank: int) -> None:
        """A re-formed generation may give this process another rank."""

    def freeze_point(self, step: int, at: str) -> None:
        """Joining a generation (``step`` is its number), before a checkpoint, before its commit."""

    def begin_step(self, step: int, model: torch.nn.Module) -> None:
        """Start of a step."""

    def corrupt_loss(self, step: int, loss: torch.Tensor, data_index: int = -1) -> torch.Tensor:
        """The first micro-batch's loss, before the backward pass."""
        return loss

    def corrupt_grads(self, step: int, model: torch.nn.Module) -> None:
        """The rank's local gradients, before the all-reduce."""

    def hang_point(self, step: int) -> None:
        """Just before the step's collectives."""

    def corrupt_state(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Parameters or optimizer state, after the optimizer step."""

    def drain(self) -> list[dict[str, Any]]:
        """Faults fired since the last call (the trainer turns them into events)."""
        return []


class FaultInjector(FaultHooks):
    """Fires the schedule's faults at the trainer's named hook points for one rank."""

    def __init__(
        self,
        faults: Sequence[Fault],
        *,
        rank: int,
        seed: int,
        state_dir: Path | None,
        node: str = "",
        announce: Callable[[dict[str, Any]], None] | None = None,
    ):
        """``announce`` receives, at once, the record of a fault after which this process does not
        go on (crash, hang, freeze): such a record would never be drained at the end of its step."""
        self.all_faults = list(faults)
        self.announce = announce
        self.node = node
        self.faults = [f for f in faults if f.applies_to(rank, node)]
        self.rank = rank
        self.seed = seed
        self.state_dir = state_dir
        self.fired: list[dict[str, Any]] = []  # what fired in this process, for tests and events
        self._undrained: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._activation_hooks: list[Any] = []
        self._compute_active = False
        self._step = -1

    # -- bookkeeping -------------------------------------------------------------------------
    def set_rank(self, rank: int) -> None:
        """A re-formed generation may give this process another rank."""
        self.rank = rank
        self.faults = [f for f in self.all_faults if f.applies_to(rank, self.node)]

    def _claim(self, f: Fault, step: int) -> bool:
        """One-shot faults fire once per run, across restarts and rollbacks."""
        if f.repeat or self.state_dir is None:
            return True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(
                self.state_dir / f"fired-{f.id}-rank{self.rank}", os.O_CREAT | os.O_EXCL | os.O_WRONLY
            )
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _due(self, kind: str, step: int, data_index: int = -1) -> list[Fault]:
        def hits(f: Fault) -> bool:
            return f.step == step if f.data_index < 0 else f.data_index == data_index

        return [f for f in self.faults if f.kind == kind and hits(f) and self._claim(f, step)]

    def _record(self, f: Fault, step: int, **detail: Any) -> None:
        rec = {"fault": f.kind, "id": f.id, "step": step, **detail}
        self.fired.append(rec)
        # "t": when it fired, not when the step ends and the event is written: a detector's event
        # (and the coordinator's decision on it) can come before that, and must not look earlier.
        event = {**rec, "t": time.time()}
        log.warning("fault injected: %s", rec)
        if f.kind in _FINAL and self.announce is not None:
            self.announce(event)
        else:
            self._undrained.append(event)

    def drain(self) -> list[dict[str, Any]]:
        """Faults fired since the last call (the trainer turns them into events)."""
        out, self._undrained = self._undrained, []
        return out

    # -- hook points, in the order a step reaches them -----------------------------------------
    def begin_step(self, step: int, model: torch.nn.Module) -> None:
        """Start of step: crash, hang, slow, and arm the compute and activation faults."""
        self._step = step
        for f in self._due("crash", step):
            self._record(f, step)
            os.kill(os.getpid(), signal.SIGKILL)
        for f in self.faults:
            if f.kind == "slow" and step >= f.from_step and (f.until_step < 0 or step < f.until_step):
                time.sleep(f.delay_s)
        self._compute_active = any(
            f.kind == "compute" and step >= f.from_step and self._rng(f, step).random() < f.prob
            for f in self.faults
        )
        if self._compute_active and not any(r["fault"] == "compute" for r in self.fired):
            self._record(next(f for f in self.faults if f.kind == "compute"), step)  # once: it repeats
        self._install_hooks(model, step)

    def hang_point(self, step: int) -> None:
        """Before the step's collectives: a hang blocks here, so peers wait in their all-reduce; a
        wedge blocks here too, but as a rank inside a collective that never completes."""
        for f in self._due("hang", step):
            self._record(f, step)
            while True:
                time.sleep(3600)
        for f in self._due("wedge", step):
            self._record(f, step)
            liveness.enter("gradient all-reduce (wedged)")
            while True:
                time.sleep(3600)
        self.freeze_point(step, "step")

    def freeze_point(self, step: int, at: str) -> None:
        """The whole process stops here (its liveness and checkpoint threads too) until killed."""
        for f in self.faults:
            if f.kind == "freeze" and f.at == at and f.step == step and self._claim(f, step):
                self._record(f, step)
                log.warning("freezing (SIGSTOP) at step %d, %s", step, at)
                # Directed at this thread, so this thread is the one that takes it, before it runs
                # another instruction; a process-directed kill() may be taken by another thread while
                # this one runs on into, say, the checkpoint's commit vote. SIGSTOP stops every thread.
                signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    def corrupt_loss(self, step: int, loss: torch.Tensor, data_index: int = -1) -> torch.Tensor:
        for f in self._due("nan", step, data_index):
            self._record(f, step)
            return loss * float("nan")
        return loss

    def corrupt_grads(self, step: int, model: torch.nn.Module) -> None:
        """The rank's local gradients, before the all-reduce."""
        for f in self._flips(step, "grad"):
            named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
            self._flip_one(f, step, named)

    def corrupt_state(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Parameters or optimizer state, after the optimizer step (a memory fault in one replica)."""
        for f in self._flips(step, "param"):
            self._flip_one(f, step, list(model.named_parameters()))
        for f in self._flips(step, "optim"):
            from stanchion.sdk.fingerprint import named_state

            named = [
                (n, t) for n, t in named_state(model, optimizer) if n.startswith("optim/") and t.numel() > 1
            ]
            self._flip_one(f, step, named)

    # -- internals -----------------------------------------------------------------------------
    def _flips(self, step: int, target: str) -> list[Fault]:
        return [
            f
            for f in self.faults
            if f.kind == "bitflip" and f.target == target and f.step == step and self._claim(f, step)
        ]

    def _rng(self, f: Fault, step: int) -> random.Random:
        return random.Random(f"{self.seed}/{f.id}/{step}/{self.rank}")

    def _flip_one(self, f: Fault, step: int, named: list[tuple[str, torch.Tensor]]) -> None:
        rng = self._rng(f, step)
        if f.tensor is not None:
            matches = [(n, t) for n, t in named if n == f.tensor or n.endswith("/" + f.tensor)]
            if not matches:
                raise ValueError(f"fault {f.id}: no tensor named {f.tensor!r}")
            name, t = matches[0]
        else:
            # Under FSDP a small tensor's shard on this rank may be empty: pick among those it holds.
            held = [(n, t) for n, t in named if (t.to_local() if hasattr(t, "to_local") else t).numel()]
            name, t = held[rng.randrange(len(held))]
        local = t.to_local() if hasattr(t, "to_local") else t
        index = f.index if f.index is not None else rng.randrange(local.numel())
        import torch

        with torch.no_grad():
            flip_bit(local, index, f.bit)
        self._record(f, step, tensor=name, index=index, bit=f.bit)

    def _install_hooks(self, model: torch.nn.Module, step: int) -> None:
        import torch

        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._compute_active:
            rng = random.Random(f"{self.seed}/compute/{self.rank}")
            element, bit = rng.randrange(1 << 16), rng.choice((20, 22, 24))

            def corrupt(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                out = output.clone()
                flip_bit(out, element % out.numel(), bit)
                return out

            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    self._hooks.append(m.register_forward_hook(corrupt))
        for f in self._flips(step, "activation"):
            blocks = getattr(model, "blocks", None)
            if blocks is not None:
                rng = self._rng(f, step)
                layer = rng.randrange(len(blocks))
                handle = blocks[layer].register_forward_hook(self._activation_flip(f, step, layer, rng))
                self._hooks.append(handle)
                self._activation_hooks.append(handle)

    def _activation_flip(self, fault: Fault, step: int, layer: int, rng: random.Random) -> Any:
        """A forward hook that flips one bit of a block's output once, in the step's first forward."""

        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            index = fault.index if fault.index is not None else rng.randrange(out.numel())
            flip_bit(out, index, fault.bit)
            self._record(fault, step, tensor=f"blocks.{layer}", index=index, bit=fault.bit)
            for h in self._activation_hooks:
                h.remove()
            self._activation_hooks = []
            return out

        return hook


def generate_schedule(
    seed: int,
    *,
    steps: int,
    world_size: int,
    mean_interval: float,
    mix: dict[str, float] | None = None,
    start_step: int = 5,
) -> list[dict[str, Any]]:
    """A seeded schedule of faults for benchmarks and chaos tests.

    Faults arrive as a Poisson process (mean ``mean_interval`` steps apart) starting after
    ``start_step``; each fault's kind is drawn from ``mix`` (default: the goodput benchmark's
    70% crash, 12% hang, 8% slow rank, 10% silent corruption).
    """
    mix = mix or {"crash": 0.70, "hang": 0.12, "slow": 0.08, "bitflip": 0.10}
    rng = random.Random(seed)
    kinds, weights = zip(*sorted(mix.items()), strict=True)
    out: list[dict[str, Any]] = []
    step = float(start_step)
    while True:
        step += rng.expovariate(1.0 / mean_interval)
        s = int(step)
        if s >= steps - 1:
            break
        kind = rng.choices(kinds, weights)[0]
        rank = rng.randrange(world_size)
        if kind == "slow":
            out.append({"kind": "slow", "rank": rank, "from_step": s, "until_step": s + 20, "delay_s": 0.05})
        elif kind == "bitflip":
            target = rng.choice(("param", "optim"))
            out.append(
                {"kind": "bitflip", "step": s, "rank": rank, "target": target, "bit": rng.randrange(20, 31)}
            )
        else:
            out.append({"kind": kind, "step": s, "rank": rank})
    return out
