"""The per-step agreement: what each rank contributes, and what all of them then know.

Once per step, before the optimizer step, every rank all-gathers one :class:`Control` row (int64
columns, packed and unpacked here and nowhere else). Every rank then holds the same
:class:`Agreement`, so every decision that changes the trajectory (skip a non-finite step, stop,
apply an agent's request, leave for a newer generation, judge the audit) is taken by all ranks at
the same step. The row is complete once the last micro-batch's loss exists, so outside audit steps
the all-gather starts before that micro-batch's backward pass and its latency hides behind it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stanchion.sdk.parallel import start_all_gather_rows


def float_bits(x: float) -> int:
    """A float's exact bits as an int64, for an integer all-gather."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


@dataclass(frozen=True)
class Control:
    """One rank's row."""

    step_index: int  # the 0-based index of the step being computed: ranks must agree on it
    loss: float | torch.Tensor  # this rank's mean micro-batch loss (carried as its exact bits)
    stop: bool  # SIGTERM received: every rank checkpoints and stops at this step
    request: int  # the newest agent request id this rank has seen
    next_generation: int = -1  # the newest generation assigned to this rank (-1: none newer known)
    audit_own: int = 0  # audit steps: digest of this rank's own first micro-batch gradients
    audit_next: int = 0  # audit steps: digest of the next rank's first micro-batch, recomputed here
    param_digest: int = 0  # audit steps: digest of the parameters the gradients came from
    state_digest: int = 0  # the previous step's replica fingerprints, folded (0: none to compare)
    compute_us: int = 0  # this rank's own compute time of its previous step (0: none yet), for stragglers

    def pack(self, device: torch.device) -> torch.Tensor:
        """The row as int64 on ``device``. ``loss`` may be a 0-dim tensor still being computed on
        the device: its bits are then copied there, with no wait for the host."""
        lazy = isinstance(self.loss, torch.Tensor)
        values = [
            self.step_index,
            0 if lazy else float_bits(self.loss),
            0 if lazy else int(not math.isfinite(self.loss)),
            int(self.stop),
            self.request,
            self.audit_own,
            self.audit_next,
            self.next_generation,
            self.param_digest,
            self.state_digest,
            self.compute_us,
        ]
        row = torch.tensor(values, dtype=torch.int64)
        row = row.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else row.to(device)
        if lazy:
            loss = self.loss.detach().to(device=device, dtype=torch.float64).reshape(1)
            row[1:2] = loss.view(torch.int64)
            row[2:3] = (~torch.isfinite(loss)).to(torch.int64)
        return row

    @classmethod
    def unpack(cls, row: Sequence[int]) -> Control:
        step_index, loss_bits, _nonfinite, stop, request, own, nxt, next_gen, params, state, compute = (
            int(v) for v in row
        )
        return cls(
            step_index=step_index,
            loss=bits_float(loss_bits),
            stop=bool(stop),
            request=request,
            next_generation=next_gen,
            audit_own=own,
            audit_next=nxt,
            param_digest=params,
            state_digest=state,
            compute_us=compute,
        )


@dataclass(frozen=True)
class Agreement:
    """Every rank's :class:`Control` row for one step, identical on every rank."""

    rows: tuple[Control, ...]

    @classmethod
    def gather(cls, mine: Control, device: torch.device) -> Agreement:
        return cls.start(mine, device)()

    @classmethod
    def start(cls, mine: Control, device: torch.device) -> Callable[[], Agreement]:
        """Start the all-gather of ``mine``; the function returned waits for the agreement. A step
        starts it before its last backward pass, which then hides its latency."""
        gathered = start_all_gather_rows(mine.pack(device), "step control all-gather")

        def result() -> Agreement:
            agreement = cls(tuple(Control.unpack(r) for r in gathered().tolist()))
            indices = [r.step_index for r in agreement.rows]
            if len(set(indices)) != 1:
                raise RuntimeError(f"ranks are out of step at step {mine.step_index + 1}: {indices}")
            return agreement

        return result

    @property
    def loss(self) -> float:
        """The mean of the ranks' losses (the global batch's loss)."""
        return sum(r.loss for r in self.rows) / len(self.rows)

    @property
    def nonfinite_ranks(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not math.isfinite(r.loss)]

    @property
    def stop(self) -> bool:
        return any(r.stop for r in self.rows)

    @property
    def newest_request(self) -> int:
        return max(r.request for r in self.rows)

    @property
    def newest_generation(self) -> int:
        return max(r.next_generation for r in self.rows)

    def holders_of(self, request_id: int) -> list[int]:
        """Ranks that have seen the request (a broadcast source for the others)."""
        return [i for i, r in enumerate(self.rows) if r.request == request_id]

    def states_agree(self, group: Sequence[int]) -> bool:
        """Whether the replicas in ``group`` sent the same folded fingerprints."""
        return len({self.rows[r].state_digest for r in group}) == 1

    @property
    def compute_s(self) -> list[float]:
        """Each rank's own compute time of its previous step, in seconds (0.0: none reported)."""
        return [r.compute_us / 1e6 for r in self.rows]

    def params_agree(self) -> bool:
        """Audit steps: whether every rank computed from the same parameters."""
        return len({r.param_digest for r in self.rows}) == 1


@dataclass(frozen=True)
class Cadence:
    """A protection that runs every ``every`` steps (0: never)."""

    every: int

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0


@dataclass(frozen=True)
class Cadences:
    """When each periodic protection and chore is due: the loop asks ``due(step)``."""

    fingerprint: Cadence
    snapshot: Cadence
    audit: Cadence
    checkpoint: Cadence
    eval: Cadence
