"""In-memory snapshots for rollback in place.

A snapshot is a host-memory copy of parameters, optimizer state and the trainer's small extra state
(step, data cursor, monitors). Only a snapshot of state the replicas agreed on is ever restored: one
is taken either after a fingerprint check passed (``verified``), or at the same time as a check
whose verdict comes with the next step's agreement (taken unverified, then :meth:`SnapshotRing.verify`
or :meth:`SnapshotRing.reject_unverified`), so a snapshot every step costs no collective of its own.
``restore`` copies a verified snapshot back into the live tensors, on every rank at the same agreed
step, without restarting any process.

Eviction spares a **pinned** snapshot: the rollback target of an alarm whose answer (a rollback
request from the coordinator) is still on its way, so frequent snapshots do not push it out.

A snapshot is copied in the background (``take(background=True)``): a thread copies the tensors
to host memory (on a GPU: on a side stream, into pinned buffers) while the next step's forward and
backward passes run, which read the parameters and optimizer state but never write them. The
snapshot counts as taken only once the copy is complete: :meth:`SnapshotRing.settle` waits for it,
and the guard settles before anything writes that state (the optimizer step, a restore, a load).
Every method of the ring settles first. Host buffers are those of the snapshot the new one evicts,
or spare ones: those of snapshots dropped by a restore or a clear, and those :meth:`SnapshotRing.
reserve` allocates (and touches, so no page is faulted in later) on a thread at the start of
training. So a snapshot step never allocates, the first ones included.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import deque
from collections.abc import Callable
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
    verified: bool = True  # the replicas agreed on this state (only verified snapshots are restored)


class SnapshotRing:
    """The newest ``keep`` snapshots, oldest first, and at most one being copied."""

    def __init__(self, keep: int):
        self.ring: deque[Snapshot] = deque(maxlen=keep)
        self._copying: threading.Thread | None = None
        self._copied: list[Snapshot | BaseException] = []
        self._spare: list[Snapshot] = []  # host buffers to lend to new snapshots
        self._reserving: threading.Thread | None = None
        self._reserved: list[Snapshot | BaseException] = []
        self._pinned: int | None = None  # step of the snapshot eviction spares

    def __len__(self) -> int:
        self.settle()
        return len(self.ring)

    def steps(self) -> list[int]:
        self.settle()
        return [s.step for s in self.ring]

    def clear(self) -> None:
        self.settle()
        old = list(self.ring)
        self.ring.clear()
        self._pinned = None
        for snap in old:
            self._lend(snap)

    def verify(self, step: int) -> None:
        """The replicas agreed on the state of ``step``: its snapshot becomes a rollback target."""
        self.settle()
        for snap in self.ring:
            if snap.step == step:
                snap.verified = True

    def reject_unverified(self) -> None:
        """The replicas disagreed: drop the snapshots never verified (their buffers are kept)."""
        self.settle()
        for snap in [s for s in self.ring if not s.verified]:
            self.ring.remove(snap)
            self._lend(snap)

    def pin(self, step: int) -> None:
        """Spare the newest verified snapshot at or before ``step`` from eviction (one pin at a time;
        a new pin replaces the old). Released by :meth:`unpin`, a restore or a clear."""
        snap = self.newest_at_or_before(step)
        self._pinned = None if snap is None else snap.step

    def unpin(self) -> None:
        self._pinned = None

    def reserve(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Allocate, on a thread of its own, the host buffers of every snapshot the ring can still
        hold, and touch them: the snapshot steps that follow copy into memory that is already
        there. Only a snapshot that finds no spare buffers waits for it; it reads no live state
        (the shapes are read here), so nothing else does."""
        self._join_reserve()
        copying = 1 if self._copying is not None else 0  # a snapshot being copied has its buffers
        missing = self.ring.maxlen - len(self.ring) - len(self._spare) - copying
        if missing <= 0:
            return
        specs = _specs(
            list(model.parameters()), [optimizer.state.get(p, {}) for p in _optim_params(optimizer)]
        )

        def run() -> None:
            try:
                for _ in range(missing):
                    self._reserved.append(_blank(*specs))
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                self._reserved.append(e)

        self._reserving = threading.Thread(target=run, name="stanchion-snapshot-reserve", daemon=False)
        self._reserving.start()

    def _join_reserve(self) -> None:
        if self._reserving is None:
            return
        self._reserving.join()
        self._reserving = None
        done, self._reserved = self._reserved, []
        for d in done:
            if isinstance(d, BaseException):
                raise d
            self._lend(d)

    def _lend(self, snap: Snapshot) -> None:
        """Keep ``snap``'s buffers for a later snapshot, up to what the ring can hold."""
        if len(self.ring) + len(self._spare) < self.ring.maxlen:
            self._spare.append(snap)

    def take(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        *,
        background: bool = False,
        verified: bool = True,
    ) -> None:
        """Snapshot the state as it is now. ``background``: copy in a thread; nothing may write
        the parameters or the optimizer state until :meth:`settle` (see the module docstring).
        ``verified=False``: the check of this state is still out (see :meth:`verify`)."""
        self.settle()
        # The snapshot about to be evicted (the oldest not pinned), or a spare, lends its host
        # buffers: no allocation.
        if len(self.ring) == self.ring.maxlen:
            evicted: Snapshot | None = next((s for s in self.ring if s.step != self._pinned), self.ring[0])
            self.ring.remove(evicted)
        else:
            if not self._spare:
                self._join_reserve()  # buffers being reserved: wait for them rather than allocate
            evicted = self._spare.pop() if self._spare else None
        params = list(model.parameters())
        states = [optimizer.state.get(p, {}) for p in _optim_params(optimizer)]
        extra = copy.deepcopy(extra)
        copy_all = _copier(step, params, states, extra, evicted, verified)
        if not background:
            self.ring.append(copy_all())
            return

        def run() -> None:
            try:
                self._copied.append(copy_all())
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by settle()
                self._copied.append(e)

        # Not a daemon: a process that ends while a copy runs waits for it (a daemon thread still
        # inside torch when the interpreter exits aborts the process).
        self._copying = threading.Thread(target=run, name="stanchion-snapshot", daemon=False)
        self._copying.start()

    def settle(self) -> None:
        """Wait for a snapshot being copied and add it to the ring (raise what its copy raised)."""
        if self._copying is None:
            return
        self._copying.join()
        self._copying = None
        done = self._copied.pop()
        if isinstance(done, BaseException):
            raise done
        self.ring.append(done)

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        """The newest verified snapshot at or before ``step`` (any step: ``step`` < 0)."""
        self.settle()
        for snap in reversed(self.ring):
            if snap.verified and (step < 0 or snap.step <= step):
                return snap
        return None

    def restore(
        self, snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Copy ``snap`` back into the live model and optimizer; drop newer snapshots."""
        self.settle()
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
            self._lend(self.ring.pop())
        self._pinned = None  # the rollback it was kept for has happened
        return copy.deepcopy(snap.extra)


def _copier(
    step: int,
    params: list[torch.Tensor],
    states: list[dict[str, Any]],
    extra: dict[str, Any],
    evicted: Snapshot | None,
    verified: bool,
) -> Callable[[], Snapshot]:
    """The copy of a snapshot, to run now or in a thread. On a GPU it runs on a side stream that
    first waits for the work queued so far (the optimizer step that made this state)."""
    side: Any = None
    if any(local_shard(p).is_cuda for p in params):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())

    def copy_all() -> Snapshot:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            old_params = evicted.params if evicted else []
            host = [_to_host(p, old_params[i] if i < len(old_params) else None) for i, p in enumerate(params)]
            optim = []
            for i, state in enumerate(states):
                old = evicted.optim[i] if evicted and i < len(evicted.optim) else {}
                optim.append(
                    {
                        k: _to_host(v, old.get(k)) if torch.is_tensor(v) else copy.deepcopy(v)
                        for k, v in state.items()
                    }
                )
        if side is not None:
            side.synchronize()
        return Snapshot(step, host, optim, extra, verified)

    return copy_all


Spec = tuple[torch.Size, torch.dtype, bool]  # shape, dtype, pinned (the source is on a GPU)


def _specs(
    params: list[torch.Tensor], states: list[dict[str, Any]]
) -> tuple[list[Spec], list[dict[str, Spec]]]:
    """What host buffers a snapshot of ``params`` and ``states`` needs."""

    def spec(t: torch.Tensor) -> Spec:
        src = local_shard(t)
        return src.shape, src.dtype, src.is_cuda

    return [spec(p) for p in params], [
        {k: spec(v) for k, v in st.items() if torch.is_tensor(v)} for st in states
    ]


def _blank(params: list[Spec], states: list[dict[str, Spec]]) -> Snapshot:
    """Host buffers of those specs, their pages touched (zeros): what :func:`_to_host` copies into."""

    def make(spec: Spec) -> torch.Tensor:
        shape, dtype, pinned = spec
        return torch.zeros(shape, dtype=dtype, pin_memory=pinned)

    return Snapshot(-1, [make(p) for p in params], [{k: make(v) for k, v in st.items()} for st in states], {})


def _to_host(t: torch.Tensor, reuse: torch.Tensor | None) -> torch.Tensor:
    src = local_shard(t).detach()
    if reuse is not None and reuse.shape == src.shape and reuse.dtype == src.dtype:
        return reuse.copy_(src)
    if src.is_cuda:  # pinned host memory: the copy runs at full PCIe speed
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
    return src.to("cpu", copy=True)


def _optim_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
