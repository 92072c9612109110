"""What `stanchion train` shows while it trains: rank 0's step, loss, tokens/s and time left.

On a terminal, a progress bar redrawn in place (rich); anywhere else (a log file, an agent's
output.log, a pipe), one plain line every ``every`` steps and at the last step, so logs stay
readable. Tokens/s and the time left come from the wall clock over the last few steps, so they
include everything the steps cost (checkpoints, evaluations), and the estimate follows a rollback
(the step count going back) instead of averaging across it. Everything goes to stderr: stdout
keeps only data (`--json`, samples).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

WINDOW = 20  # steps the rate is measured over


class ProgressDisplay:
    def __init__(
        self,
        total: int,
        tokens_per_step: int,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        every: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.tokens_per_step, self.clock = total, tokens_per_step, clock
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every = every or max(1, total // 20)
        self.recent: deque[tuple[float, int]] = deque(maxlen=WINDOW + 1)
        self.bar: Any = None
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
                console=Console(file=self.stream, force_terminal=True),
            )
            self.task = self.bar.add_task("train", total=total, loss="–", tps="–", eta="–")
            self.bar.start()

    def update(self, step: int, loss: float | None) -> None:
        """Step ``step`` (1-based) completed with the agreed ``loss`` (None: not known)."""
        now = self.clock()
        if self.recent and step <= self.recent[-1][1]:
            self.recent.clear()  # a rollback: the rate starts again from here
        self.recent.append((now, step))
        rate = self.steps_per_s()
        tps = "–" if rate is None else f"{rate * self.tokens_per_step:,.0f}"
        eta = "–" if rate is None else clock_text((self.total - step) / rate)
        loss_text = "–" if loss is None else f"{loss:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss_text, tps=tps, eta=eta)
        elif step % self.every == 0 or step == self.total:
            width = len(str(self.total))
            print(
                f"step {step:>{width}}/{self.total}  loss {loss_text}  {tps} tok/s  ETA {eta}",
                file=self.stream,
                flush=True,
            )

    def steps_per_s(self) -> float | None:
        if len(self.recent) < 2:
            return None
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def clock_text(seconds: float) -> str:
    """``1:02:03``, ``2:03``: hours only when there are some."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
