"""Straggler detection: a rank whose own compute is consistently slower than its peers'.

Every rank already sends one row per step to the step's agreement (:mod:`stanchion.sdk.control`);
the row also carries the rank's *own compute time* of its previous step: from the step's start to
the end of its last backward pass, which is the rank's data, forward and backward work, before any
wait on a peer (the gradient all-reduce and the agreement are started there, not waited for). A slow
rank makes every step slow for everyone, so step times cannot name it; compute times can. Nothing is
launched for it: no extra kernel, collective or synchronisation.

Every rank holds the same rows, so every rank reaches the same verdict at the same step. A rank's
*ratio* at a step is its compute time over the median of its peers'; it is a straggler once the
median of its ratios over the last ``window`` steps exceeds ``threshold`` (1.2 by default: 20%
slower), so one slow step (a page fault, a collection, a checkpoint) never names anyone, and it
stops being one once that median falls back to the threshold or below. The first ``window`` steps
of a generation are not counted: a job's first steps (and a re-formed one's) share the machine with
the node's standbys starting and caches warming, which says nothing about the hardware. Under FSDP the forward and
backward passes wait on peers' all-gathers, which evens the times out: a straggler there may go
unnamed, never a healthy rank named.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Straggler:
    rank: int
    ratio: float  # the median of its ratios (own compute / its peers' median) over the window
    own_s: float  # its median compute time over the window
    peers_s: float  # its peers' median compute time over the window
    window: int
    step: int  # the step whose agreement completed the window


class StragglerDetector:
    def __init__(self, threshold: float = 1.2, window: int = 20):
        self.threshold, self.window = threshold, window
        self._ratios: list[deque[float]] = []
        self._own: list[deque[float]] = []
        self._peers: list[deque[float]] = []
        self.stragglers: set[int] = set()
        self._warmup = window  # steps still to skip: the start of a generation

    def reset(self) -> None:
        """Forget every observation (a new generation may run on other hardware)."""
        self._ratios, self._own, self._peers = [], [], []
        self.stragglers = set()
        self._warmup = self.window

    def ratio(self, rank: int) -> float | None:
        """``rank``'s windowed ratio, once its window is full."""
        if rank >= len(self._ratios) or len(self._ratios[rank]) < self.window:
            return None
        return statistics.median(self._ratios[rank])

    def observe(self, step: int, compute_s: Sequence[float]) -> tuple[list[Straggler], list[int]]:
        """Take one step's compute times, one per rank (0 where a rank has none to report, as in the
        first step of a generation: the step is then skipped). Returns the ranks that became
        stragglers at this step and those that stopped being ones."""
        if self.window <= 0 or len(compute_s) < 2 or min(compute_s) <= 0:
            return [], []
        if self._ratios and len(compute_s) != len(self._ratios):
            self.reset()  # another world: what was seen says nothing about it
        if self._warmup > 0:
            self._warmup -= 1
            return [], []
        if not self._ratios:
            self._ratios = [deque(maxlen=self.window) for _ in compute_s]
            self._own = [deque(maxlen=self.window) for _ in compute_s]
            self._peers = [deque(maxlen=self.window) for _ in compute_s]
        started, ended = [], []
        for rank, own in enumerate(compute_s):
            peers = statistics.median(t for r, t in enumerate(compute_s) if r != rank)
            self._ratios[rank].append(own / peers)
            self._own[rank].append(own)
            self._peers[rank].append(peers)
            ratio = self.ratio(rank)
            if ratio is None:
                continue
            if ratio > self.threshold and rank not in self.stragglers:
                self.stragglers.add(rank)
                own_s, peers_s = statistics.median(self._own[rank]), statistics.median(self._peers[rank])
                started.append(Straggler(rank, ratio, own_s, peers_s, self.window, step))
            elif ratio <= self.threshold and rank in self.stragglers:
                self.stragglers.discard(rank)
                ended.append(rank)
        return started, ended
