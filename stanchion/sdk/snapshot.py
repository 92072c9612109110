"""In-memory snapshots for rollback in place.

A snapshot is a host-memory copy of parameters, optimizer state and the trainer's small extra state
(step, data cursor, monitors), taken only after a replica fingerprint check passed, so a snapshot is
known-consistent across replicas. ``restore`` copies it back into the live tensors, on every rank at
the same agreed step, without restarting any process.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the tensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Snapshot:
    step: int
    params: list[torch.Tensor]
    optim: list[dict[str, torch.Tensor]]  # per parameter (optimizer order): state key -> tensor
    extra: dict[str, Any]


class SnapshotRing:
    """The newest ``keep`` snapshots, oldest first."""

    def __init__(self, keep: int):
        self.ring: deque[Snapshot] = deque(maxlen=keep)

    def __len__(self) -> int:
        return len(self.ring)

    def steps(self) -> list[int]:
        return [s.step for s in self.ring]

    def clear(self) -> None:
        self.ring.clear()

    def take(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
    ) -> None:
        # The snapshot about to be evicted lends its host buffers: no allocation in steady state.
        evicted = self.ring[0] if len(self.ring) == self.ring.maxlen else None
        old_params = evicted.params if evicted else []
        params = [
            _to_host(p, old_params[i] if i < len(old_params) else None)
            for i, p in enumerate(model.parameters())
        ]
        optim = []
        for i, p in enumerate(_optim_params(optimizer)):
            state = optimizer.state.get(p, {})
            old = evicted.optim[i] if evicted and i < len(evicted.optim) else {}
            optim.append(
                {
                    k: _to_host(v, old.get(k)) if torch.is_tensor(v) else copy.deepcopy(v)
                    for k, v in state.items()
                }
            )
        self.ring.append(Snapshot(step, params, optim, copy.deepcopy(extra)))

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        for snap in reversed(self.ring):
            if step < 0 or snap.step <= step:
                return snap
        return None

    def restore(
        self, snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Copy ``snap`` back into the live model and optimizer; drop newer snapshots."""
        with torch.no_grad():
            for p, saved in zip(model.parameters(), snap.params, strict=True):
                local_shard(p).copy_(saved)
            for p, saved in zip(_optim_params(optimizer), snap.optim, strict=True):
                live = optimizer.state.get(p)
                if not saved:
                    optimizer.state.pop(p, None)
                    continue
                if live is None:
                    live = optimizer.state[p] = {}
                for k in list(live):
                    if k not in saved:
                        del live[k]
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        if k in live and torch.is_tensor(live[k]):
                            local_shard(live[k]).copy_(v)
                        else:
                            live[k] = v.to(local_shard(p).device, copy=True)
                    else:
                        live[k] = copy.deepcopy(v)
        while self.ring and self.ring[-1].step > snap.step:
            self.ring.pop()
        return copy.deepcopy(snap.extra)


def _to_host(t: torch.Tensor, reuse: torch.Tensor | None) -> torch.Tensor:
    src = local_shard(t).detach()
    if reuse is not None and reuse.shape == src.shape and reuse.dtype == src.dtype:
        return reuse.copy_(src)
    if src.is_cuda:  # pinned host memory: the copy runs at full PCIe speed
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
    return src.to("cpu", copy=True)


def _optim_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
