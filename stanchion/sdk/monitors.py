"""Stability monitors: robust spike detection and gradient norms.

The spike detector sees values every rank already agrees on (the all-reduced loss and the global
gradient norm), so every rank reaches the same verdict at the same step without extra communication.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Scale factor that makes the MAD a consistent estimator of the standard deviation for normal data.
_MAD_TO_SIGMA = 1.4826

# Floor on the z-score's scale, as a fraction of the window's median (``integrity.spike_rel_floor``,
# which must default to the same value). The MAD of a quiet window can be tiny: five losses around 2.0
# with a MAD of 0.0024 made a 2% move score z = 11, and every false alarm costs a rollback. With the
# floor a value must also exceed the median by more than threshold * floor, relative: at 0.02 and the
# default thresholds (loss 8, grad norm 10) that is +16% for the loss and +20% for the grad norm, below
# what a real spike looks like (loss jumps of tens of percent, grad norms several-fold).
DEFAULT_REL_FLOOR = 0.02
# Absolute floor, so that a window whose median is 0 never divides by zero.
_ABS_FLOOR = 1e-12


@dataclass(frozen=True)
class Spike:
    metric: str  # "loss" or "grad_norm"
    value: float
    median: float
    mad: float
    z: float
    threshold: float
    window: tuple[int, int]  # first and last step of the trailing window used


def robust_z(
    value: float, history: Sequence[float], rel_floor: float = DEFAULT_REL_FLOOR
) -> tuple[float, float, float]:
    """(z, median, MAD) of ``value`` against ``history`` using median/MAD, which a spike cannot drag.

    ``z = (value - median) / scale`` with ``scale = max(1.4826 * MAD, rel_floor * |median|, 1e-12)``:
    the MAD-based sigma, floored relative to the median so that a quiet (or perfectly flat) window
    does not turn a move of a few percent into a huge z-score. A value within ``k * rel_floor`` of
    the median, relatively, never scores above ``k``.
    """
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = max(_MAD_TO_SIGMA * mad, rel_floor * abs(med), _ABS_FLOOR)
    return (value - med) / scale, med, mad


class SpikeDetector:
    """Flags a loss or grad-norm value far above its trailing window (upward spikes only).

    Spiking values are not added to the window, so a run of spikes keeps being measured against the
    healthy baseline. The z-score's scale has a floor of ``rel_floor * |median|`` (see
    :func:`robust_z`), so on a quiet window a value is a spike only if it also exceeds the median by
    more than ``threshold * rel_floor``, relatively.
    """

    def __init__(
        self,
        *,
        window: int,
        min_history: int,
        loss_z: float,
        grad_z: float,
        rel_floor: float = DEFAULT_REL_FLOOR,
    ):
        if not 0 < rel_floor < 1:
            raise ValueError(f"rel_floor must be > 0 and < 1 (a fraction of the median), got {rel_floor}")
        self.min_history = min_history
        self.rel_floor = rel_floor
        self.thresholds = {"loss": loss_z, "grad_norm": grad_z}
        self.history: dict[str, deque[tuple[int, float]]] = {m: deque(maxlen=window) for m in self.thresholds}

    def observe(self, step: int, values: Mapping[str, float]) -> list[Spike]:
        spikes = []
        for metric, threshold in self.thresholds.items():
            value = values[metric]
            hist = self.history[metric]
            if not math.isfinite(value):
                continue  # the non-finite guard owns NaN/Inf
            if len(hist) >= self.min_history:
                z, med, mad = robust_z(value, [v for _, v in hist], self.rel_floor)
                if z > threshold:
                    spikes.append(Spike(metric, value, med, mad, z, threshold, (hist[0][0], hist[-1][0])))
                    continue
            hist.append((step, value))
        return spikes

    def state(self) -> dict[str, Any]:
        return {m: [list(x) for x in h] for m, h in self.history.items()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        for m, items in state.items():
            if m in self.history:
                self.history[m].clear()
                self.history[m].extend((int(s), float(v)) for s, v in items)

    def forget_after(self, step: int) -> None:
        """Drop observations newer than ``step`` (after a rollback, they will be seen again)."""
        for h in self.history.values():
            kept = [x for x in h if x[0] <= step]
            h.clear()
            h.extend(kept)


def group_norms(
    model: torch.nn.Module, groups: Mapping[str, Iterable[str]]
) -> tuple[torch.Tensor, list[str]]:
    """Squared L2 norms of the gradients, one per layer group, as a 1-D float32 tensor.

    Squares (not norms) so that shards can be summed across ranks under FSDP before the square root.
    """
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    labels, sq = [], []
    for label, names in groups.items():
        local = [
            g.to_local() if hasattr(g, "to_local") else g for n in names if (g := params[n].grad) is not None
        ]
        # A dot product per tensor: the sum of squares without a squared copy of the gradients.
        flat = [g.detach().reshape(-1).float() for g in local]  # .float() is free for float32 gradients
        dots = [torch.dot(x, x) for x in flat]
        total = torch.stack(dots).sum() if dots else torch.zeros((), dtype=torch.float32, device=device)
        labels.append(label)
        sq.append(total)
    return torch.stack(sq), labels
