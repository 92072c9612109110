"""What `stanchion train` shows: plain lines off a terminal, a bar on one, and a rate and time
left that follow the wall clock (including a rollback) without averaging across it."""

from __future__ import annotations

import io

from trainer.progress import ProgressDisplay, clock_text


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_off_a_terminal_a_plain_line_every_n_steps_and_at_the_last():
    out, clock = io.StringIO(), Clock()
    d = ProgressDisplay(40, tokens_per_step=1000, stream=out, terminal=False, every=10, clock=clock)
    for step in range(1, 41):
        clock.t += 0.5  # 2 steps/s: 2,000 tokens/s
        d.update(step, 5.0 - step / 100)
    d.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 10/40  loss 4.9000  2,000 tok/s  ETA 0:15",
        "step 20/40  loss 4.8000  2,000 tok/s  ETA 0:10",
        "step 30/40  loss 4.7000  2,000 tok/s  ETA 0:05",
        "step 40/40  loss 4.6000  2,000 tok/s  ETA 0:00",
    ]


def test_the_rate_starts_again_after_a_rollback_and_is_unknown_at_first():
    out, clock = io.StringIO(), Clock()
    d = ProgressDisplay(100, tokens_per_step=10, stream=out, terminal=False, every=1, clock=clock)
    d.update(1, 3.0)
    assert out.getvalue() == "step   1/100  loss 3.0000  – tok/s  ETA –\n"
    for step in (2, 3, 4):
        clock.t += 1.0
        d.update(step, 3.0)
    clock.t += 30.0  # the rollback and its replay took a while: not a slow step of the old window
    d.update(2, 3.0)
    assert out.getvalue().splitlines()[-1] == "step   2/100  loss 3.0000  – tok/s  ETA –"
    clock.t += 0.25
    d.update(3, 3.0)
    assert out.getvalue().splitlines()[-1] == "step   3/100  loss 3.0000  40 tok/s  ETA 0:24"


def test_on_a_terminal_a_bar_with_the_step_loss_rate_and_time_left():
    out, clock = io.StringIO(), Clock()
    d = ProgressDisplay(10, tokens_per_step=100, stream=out, terminal=True, clock=clock)
    for step in range(1, 6):
        clock.t += 1.0
        d.update(step, 2.5)
    d.close()
    text = out.getvalue()
    assert "\x1b[" in text  # drawn in place with terminal control sequences
    assert "step 5/10" in text and "loss 2.5000" in text and "100 tok/s" in text and "ETA 0:05" in text


def test_time_left_reads_as_a_clock():
    assert clock_text(5) == "0:05" and clock_text(125.4) == "2:05" and clock_text(3723) == "1:02:03"
    assert clock_text(-3) == "0:00"
