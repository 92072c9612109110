"""Skipped data windows: where a step reads its data once anomalous batches have been skipped.

A window ``(start, length)`` is one decision, "when training reaches step ``start``, jump ahead
``length`` batches" (PaLM's remedy for a loss spike tied to its data). A program's data must be a
function of the data index, not of the step, for skips to take effect: ``Step.data_index`` is it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def normalize_windows(skip_windows: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Skipped windows as a canonical tuple: sorted by start, windows with the same start merged by
    adding their lengths, zero-length windows dropped. Each window is one event ("at step start,
    skip length batches"), so recording the same skip twice skips twice: the guard owns the list
    and stores it with each checkpoint."""
    merged: dict[int, int] = {}
    for window in skip_windows:
        start, length = (int(v) for v in window)
        if start < 0 or length < 0:
            raise ValueError(f"skip window {tuple(window)}: start and length must be >= 0")
        if length:
            merged[start] = merged.get(start, 0) + length
    return tuple(sorted(merged.items()))


def data_index(step: int, skip_windows: Iterable[Sequence[int]] = ()) -> int:
    """The data position of optimizer step ``step`` when windows ``(start_step, length)`` are skipped.

    ``d(s) = s + sum(length for start, length in windows if start <= s)``: steps before every window
    read the data they always did; the order of windows does not matter.
    """
    if step < 0:
        raise ValueError(f"step: {step} must be >= 0")
    return step + sum(length for start, length in normalize_windows(skip_windows) if start <= step)
