"""Exact fingerprints of tensors, and the majority vote that names an odd replica.

A tensor's fingerprint is the wrapping integer sum of its raw bits, viewed as the widest integer type
its byte length allows (int64 for most fp32 tensors), computed on the tensor's own device. Integer
addition is associative, so the sum is bit-exact whatever the reduction order or thread count. A
single flipped bit b changes the sum by ±2^b, which is never 0 modulo 2^64: every single-bit flip is
seen. (Two flips that cancel exactly are not; at one fingerprint per tensor that needs two opposite
flips of the same bit position in the same tensor between two checks.) On a CPU this runs at
several times memcpy bandwidth because it only reads (see `stanchion bench integrity`).

No tolerances anywhere: replicas either agree bit for bit or they do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

_INT_VIEWS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def tensor_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """0-d int64 tensor on ``t``'s device: the wrapping sum of ``t``'s raw bits."""
    if hasattr(t, "to_local"):  # a DTensor: this rank's shard
        t = t.to_local()
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    raw = flat.view(torch.uint8)
    for width, dtype in _INT_VIEWS:
        if nbytes % width == 0:
            return raw.view(dtype).sum(dtype=torch.int64)
    raise AssertionError("unreachable: every byte length is a multiple of 1")


def fingerprints(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """Names and a 1-D int64 tensor of per-tensor fingerprints, in the given order."""
    names, values = [], []
    for name, t in named:
        names.append(name)
        values.append(tensor_fingerprint(t))
    if not values:
        return names, torch.zeros(0, dtype=torch.int64)
    devices = {v.device for v in values}
    if len(devices) == 1:  # one copy to the host for all of them, not one synchronisation per tensor
        return names, torch.stack(values).cpu()
    return names, torch.stack([v.cpu() for v in values])


def named_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> list[tuple[str, torch.Tensor]]:
    """Parameters and optimizer state as (name, tensor) in a fixed order: what a replica must agree on."""
    out = [(f"param/{n}", p) for n, p in model.named_parameters()]
    if optimizer is not None:
        index = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for key in sorted(state):
                    v = state[key]
                    if torch.is_tensor(v):
                        out.append((f"optim/{index.get(id(p), '?')}/{key}", v))
    return out


def digest(values: torch.Tensor | Sequence[int]) -> str:
    """A short, stable hex digest of a fingerprint vector (for manifests, JSON and people)."""
    if torch.is_tensor(values):
        values = values.tolist()
    h = hashlib.sha256()
    for v in values:
        h.update(int(v).to_bytes(8, "little", signed=True))
    return h.hexdigest()[:16]


def folded(values: torch.Tensor | Sequence[int]) -> int:
    """A fingerprint vector folded into one signed 64-bit integer (its :func:`digest`), small enough
    to travel in the per-step agreement: equal vectors fold equal, and unequal ones fold unequal
    but with probability 2^-64."""
    v = int(digest(values), 16)
    return v - (1 << 64) if v >= 1 << 63 else v


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    return digest(fingerprints(named_state(model, optimizer))[1])


@dataclass(frozen=True)
class Comparison:
    agree: bool
    suspect_ranks: tuple[int, ...]  # empty when all agree or when nobody can be named
    reason: str
    mismatched_tensors: tuple[str, ...] = ()


def compare_replicas(rows: Mapping[int, torch.Tensor], names: Sequence[str] = ()) -> Comparison:
    """Compare fingerprint vectors of replicas (rank -> vector) and name the odd ones by majority.

    With two replicas a disagreement cannot say which one is wrong; with no strict majority nobody
    is named either. The reason says which case applied.
    """
    ranks = sorted(rows)
    keys = {r: tuple(rows[r].tolist()) for r in ranks}
    counts: dict[tuple[int, ...], list[int]] = {}
    for r in ranks:
        counts.setdefault(keys[r], []).append(r)
    if len(counts) <= 1:
        return Comparison(True, (), f"{len(ranks)} replicas agree")
    majority_key, majority = max(counts.items(), key=lambda kv: (len(kv[1]), -kv[1][0]))
    others = sorted(r for r in ranks if keys[r] != majority_key)
    bad_tensors: set[str] = set()
    if names:
        ref = rows[majority[0]]
        for r in others:
            diff = (rows[r] != ref).nonzero().flatten().tolist()
            bad_tensors.update(names[i] for i in diff)
    tensors = tuple(sorted(bad_tensors))
    if len(majority) * 2 <= len(ranks):
        groups = "; ".join(f"ranks {v}" for v in counts.values())
        if len(ranks) == 2:
            why = "2 replicas disagree: with two, it cannot tell which one is wrong"
        else:
            why = f"replicas disagree with no majority ({groups})"
        return Comparison(False, (), why, tensors)
    return Comparison(
        False,
        tuple(others),
        f"ranks {others} differ from the majority of {len(majority)} of {len(ranks)} replicas",
        tensors,
    )
