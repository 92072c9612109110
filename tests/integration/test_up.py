"""`stanchion up` (what `make demo` runs) end to end, shortened: a coordinator, two agents and a spare
on 127.0.0.1 with fresh mTLS certificates train the tiny preset on the fixture corpus while the
chaos schedule kills an agent, the coordinator and a rank, hangs a rank, and has the trainer inject a
NaN and a bit flip. Every fault must be detected and answered, and the job must succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_survives_its_chaos_schedule_and_reports_every_fault(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    steps = 200  # long enough that the bit flip meets a fingerprint check before the hang (K = 20)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diagnostics.cli",
            "up",
            "--corpus",
            "fixture",
            "--vocab-size",
            "512",
            "--steps",
            str(steps),
            "--chaos",
            "1",
            "--samples",
            "1",
            "--run-dir",
            str(tmp_path / "up"),
            "--json",
            str(summary_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    s = json.loads(summary_path.read_text())
    assert s["state"] == "succeeded"
    assert s["steps_completed"] == steps and s["steps_computed"] == steps + s["lost_steps"]
    kinds = [f["kind"] for f in s["faults_injected"]]
    assert sorted(kinds) == ["agent", "bitflip", "coordinator", "crash", "hang", "nan"]
    undetected = [f for f in s["faults_detected"] if not f["detected"]]
    assert not undetected, undetected
    assert sorted(f["kind"] for f in s["faults_detected"]) == sorted(kinds)
    assert s["restarts"] and sum(s["restarts"].values()) >= 3  # agent, crash, hang at least
    assert len(s["recovery_seconds"]) >= 3 and all(x > 0 for x in s["recovery_seconds"])
    assert s["final_val_loss"] < s["unigram_entropy_nats"]  # it learned more than word frequencies
    assert len(s["samples"]) == 1 and s["samples"][0].strip()
    assert s["final_fingerprint"]
    # No orphans: nothing `up` started outlives it. The daemons name the run dir on their command
    # line; standbys and ranks (`python -m trainer`) carry their worker dir under it in the environment.
    run_dir = (tmp_path / "up").as_posix().encode()
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile
        if run_dir in seen:
            left.append((proc.name, seen.split(b"\0")[:4]))
    assert not left, left
