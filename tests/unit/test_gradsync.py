"""GradSync's buckets overlap the backward pass without changing a bit of the averages."""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO, env


def test_overlapped_buckets_give_the_same_averages_as_buckets_started_after_backward():
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
        + [str(REPO / "tests" / "programs" / "gradsync.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert out["buckets"] >= 2
    # Armed, every bucket started inside the backward pass; unarmed, none did.
    assert out["started_during_backward"] == [0, out["buckets"]]
    assert out["overlap_equals_plain"] is True
    # Gradients changed after their buckets started: those buckets were reduced again, from the
    # final gradients (twice the single pass's, exactly: doubling is exact in floating point).
    assert out["restarted_stale_equal"] is True
