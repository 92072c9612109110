"""`stanchion.pause`, the public way for a program to announce a long pause (docs/sdk.md)."""

from __future__ import annotations

from pathlib import Path

import stanchion
from agent import hangs
from stanchion.sdk import liveness


def test_a_pause_announced_through_the_public_name_keeps_the_agent_from_calling_the_rank_hung(
    tmp_path: Path,
) -> None:
    t = liveness.LivenessThread(tmp_path)
    limits = hangs.Limits()
    with stanchion.pause("torch.compile warm-up"):
        t.beat()
        beat = liveness.read(tmp_path)
    assert beat is not None and (beat.doing, beat.what) == (liveness.PAUSED, "torch.compile warm-up")
    assert hangs.not_stepping(beat.pid, beat, beat.t, 60.0, 2.0, limits) == ""
    t.beat()  # the pause is over: the same silence of steps is a hang
    after = liveness.read(tmp_path)
    assert after is not None
    assert "outside any collective" in hangs.not_stepping(after.pid, after, after.t, 60.0, 2.0, limits)
