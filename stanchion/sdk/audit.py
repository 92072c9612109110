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

from stanchion.sdk.fingerprint import tensor_fingerprint

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
    suspects = certain_culprits(world, {a for a, _ in bad})
    if suspects:
        reason = f"rank(s) {list(suspects)} disagree with both ring neighbours on recomputed gradients"
    else:
        reason = (
            f"recomputed gradients disagree on edges {list(bad)}, but no rank can be named with certainty"
        )
    return AuditVerdict(False, bad, suspects, reason)


def certain_culprits(world: int, bad_edges: set[int]) -> tuple[int, ...]:
    """The ranks every minimal explanation of the bad edges names.

    Edge r joins ranks r and r+1. A rank that computes wrong spoils both of its edges (its own digest
    and its recomputation of the next rank's batch). Bad edges come in arcs of consecutive edges;
    the arc's end ranks touch a good edge, so they are innocent, and the two ranks next to them must
    be culprits. Between those, the remaining path of bad edges may be explained in several ways:
    only ranks in every minimum explanation are named (a path of n ranks, n odd, has exactly one).
    A fully bad ring has many explanations and names nobody.
    """
    if not bad_edges or len(bad_edges) == world:
        return ()
    named: set[int] = set()
    start = next(r for r in range(world) if r in bad_edges and (r - 1) % world not in bad_edges)
    r = start
    for _ in range(world):  # walk the ring once, arc by arc
        if r in bad_edges and (r - 1) % world not in bad_edges:
            k = 0
            while (r + k) % world in bad_edges:
                k += 1
            interior = [(r + i) % world for i in range(1, k)]  # ranks strictly inside the arc
            if interior:  # one bad edge alone fits no single culprit: name nobody for it
                named.update({interior[0], interior[-1]})
                middle = interior[1:-1]  # a path whose edges the two forced culprits leave open
                if len(middle) % 2 == 1:
                    named.update(middle[1::2])
        r = (r + 1) % world
    return tuple(sorted(named))
