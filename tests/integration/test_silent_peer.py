"""A survivor gives a collective up when its generation is superseded, even while the peer it waits
for is alive but silent (its connections open, so the backend itself would wait for its timeout),
and leaves the broken group without waiting for that collective."""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO, env

from stanchion.waiting import wait_until


def test_a_collective_waiting_on_a_silent_peer_is_given_up_on_a_newer_assignment(tmp_path):
    flag, release, waiting = tmp_path / "newer-assignment", tmp_path / "release", tmp_path / "waiting"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [
        "--max-restarts=0",
        str(REPO / "tests" / "programs" / "silent_peer.py"),
        str(flag),
        str(release),
        str(waiting),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        wait_until(waiting.exists, 60, "rank 0 waiting in the all-gather")
        flag.touch()
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            release.touch()  # what rank 0 did (or not) before the deadline, then its output
            out, err = p.communicate(timeout=30)
            why = f"rank 0 did not finish within 60 s of the newer assignment: {out}\n{err[-3000:]}"
            raise AssertionError(why) from None
    finally:
        release.touch()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    # The peer never answered and the group's timeout (120 s) never passed: only the newer
    # assignment could end the wait, inside the failure boundary.
    assert result["raised"] == "step control all-gather: given up: a newer assignment arrived"
    assert result["collective_left"] is True
    # It left the broken group without waiting for the all-gather still blocked in it, and formed
    # a new group, all before the silent peer was released.
    assert result["reformed"] == [1.0, 1.0]
