"""Ring recomputation audit: catch wrong compute before the all-reduce.

Every M steps rank r also computes the gradient of rank r+1's first micro-batch. Both publish a
digest of that gradient in the step's control all-gather. Edge (r, r+1) is bad when rank r's
recomputation differs from rank r+1's own result. A rank whose both edges are bad is the one that
computes wrong numbers: it is named in one round. Replica fingerprints cannot see this fault,
because every replica applies the same (wrong) averaged update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.fingerprint import tensor_fingerprint

_MASK = (1 << 64) - 1


def digest_of(tensors: Sequence[torch.Tensor | None]) -> int:
    """One signed int64 summarising tensors: sum of (2i+1) * fingerprint_i, wrapping.

    Odd multipliers keep any single tensor's change visible (an odd number is invertible mod 2^64).
    """
    total = 0
    for i, t in enumerate(tensors):
        if t is not None:
            total = (total + (2 * i + 1) * int(tensor_fingerprint(t))) & _MASK
    return total - (1 << 64) if total >= 1 << 63 else total


def grad_digest(params: Sequence[torch.nn.Parameter]) -> int:
    return digest_of([p.grad for p in params])


@dataclass(frozen=True)
class AuditVerdict:
    agree: bool
    bad_edges: tuple[tuple[int, int], ...]
    suspect_ranks: tuple[int, ...]
    reason: str


def audit_verdict(own: Sequence[int], recomputed_next: Sequence[int]) -> AuditVerdict:
    """``own[r]``: rank r's digest of its own micro-batch; ``recomputed_next[r]``: rank r's digest of
    rank r+1's micro-batch."""
    world = len(own)
    bad = tuple((r, (r + 1) % world) for r in range(world) if recomputed_next[r] != own[(r + 1) % world])
    if not bad:
        return AuditVerdict(True, (), (), f"{world} ranks agree on recomputed gradients")
    if world == 2:
        return AuditVerdict(
            False, bad, (), "2 ranks disagree on recomputed gradients: with two, it cannot tell which"
        )
    bad_set = set(bad)
    suspects = tuple(
        r for r in range(world) if ((r - 1) % world, r) in bad_set and (r, (r + 1) % world) in bad_set
    )
    if suspects:
        reason = f"rank(s) {list(suspects)} disagree with both ring neighbours on recomputed gradients"
    else:
        reason = (
            f"recomputed gradients disagree on edges {list(bad)}, but no rank disagrees with both neighbours"
        )
    return AuditVerdict(False, bad, suspects, reason)
