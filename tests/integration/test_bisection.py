"""Grid-search bisection with real agents: the trial is deterministic across nodes, a defective
node is named within ceil(log2 N) rounds and cordoned, and a job whose anomalies point at hardware
bisects itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, env, job_spec, prepare_data

from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2


def trial(out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.trial", "--out", str(out), "--steps", "6", *extra],
        env=env(),
        cwd=REPO,
    )


def trace(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["ok"], data["error"]
    return data


def test_healthy_hardware_gives_bit_identical_traces_whoever_runs_the_trial(tmp_path: Path) -> None:
    """Proved before relying on it: separate processes, alone or as a 2-process group, agree bit for
    bit; a mercurial core changes the trace."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    defect = tmp_path / "defect.json"
    defect.write_text(json.dumps([{"kind": "compute", "rank": -1, "from_step": 0, "prob": 1.0}]))
    procs = [
        trial(tmp_path / "a.json"),
        trial(tmp_path / "b.json"),
        trial(tmp_path / "bad.json", "--faults", str(defect)),
        *[
            trial(
                tmp_path / f"g{r}.json",
                "--group-rank",
                str(r),
                "--group-size",
                "2",
                "--master-port",
                str(store.port),
                "--key",
                "g",
            )
            for r in range(2)
        ],
    ]
    assert [p.wait(timeout=180) for p in procs] == [0] * len(procs)
    a, b, bad = trace(tmp_path / "a.json"), trace(tmp_path / "b.json"), trace(tmp_path / "bad.json")
    assert (
        a["loss_bits"] == b["loss_bits"]
        and a["fingerprints"] == b["fingerprints"]
        and a["trace"] == b["trace"]
    )
    assert bad["trace"] != a["trace"]
    groups = [trace(tmp_path / f"g{r}.json")["trace"] for r in range(2)]
    assert len(set(groups)) == 1  # both members of the group agree, bit for bit
    assert groups[0] != a["trace"]  # a different world size is a different (but just as fixed) computation


def test_eight_agents_one_defective_is_named_within_three_rounds_and_cordoned(tmp_path: Path) -> None:
    out = tmp_path / "bisect.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diagnostics.cli",
            "diag",
            "bisect",
            "--local-nodes",
            "8",
            "--defect",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env(),
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["faulty"] == ["node-5"] == result["defective"]
    assert result["rounds"] <= 3
    assert result["cordoned"] == ["node-5"]
    assert result["reference"] in ("majority", "known-good") and result["confidence"] >= 0.999
    # Recorded as a benchmark: the commit of the code it ran, for `stanchion bench report`.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    assert result["source"]["commit"] == head and result["finished_at"].startswith("20")


@pytest.mark.timeout(600)
def test_anomalies_at_different_data_make_the_job_bisect_itself(tmp_path: Path) -> None:
    c = LocalCluster(
        tmp_path / "cluster", tls=False, hang_floor_s=5.0, stop_grace_s=10.0, heartbeat_timeout_s=8.0
    )
    prepare_data(c.data_root / "fixture-512")
    try:
        c.start_coordinator()
        for n in ("node-0", "node-1", "node-2"):
            c.start_agent(
                n, extra=["--standby", "0"] + (["--simulate-defect", "persistent"] if n == "node-1" else [])
            )
        c.start_agent("spare-0", spare=True, extra=["--standby", "0"])
        # The defect corrupts node-1's matmuls; the audit is off, so the job only sees NaNs at two
        # different batches: replay first, then "different data: the hardware is suspect".
        spec = job_spec(
            "auto",
            "fixture-512",
            nodes=3,
            steps=60,
            checkpoint_every=5,
            trainer={"integrity": {"audit_every": 0, "snapshot_every": 5, "fingerprint_every": 5}},
            faults=[
                {"kind": "nan", "data_index": 12, "rank": 0},
                {"kind": "nan", "data_index": 20, "rank": 0},
            ],
        )
        job_id = c.submit(spec)
        job = c.wait_job({"succeeded", "failed", "cancelled"}, 500, job_id)
        explain = c.explain(job_id)
        reasons = [d.reason for d in explain.decisions]
        assert job.state == types_pb2.JOB_STATE_SUCCEEDED, reasons
        assert any("hardware is suspect" in r and "bisect" in r for r in reasons), reasons
        (b,) = explain.bisections
        assert list(b.faulty) == ["node-1"] and b.state == "done", (b.state, b.reason, b.rounds_json, reasons)
        assert "node-1" not in job.nodes
        assert {n.node_id for n in c.nodes() if n.state == types_pb2.NODE_STATE_CORDONED} == {"node-1"}
    finally:
        c.stop()
        shutil.rmtree(tmp_path / "cluster" / "runs", ignore_errors=True)
