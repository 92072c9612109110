"""`stanchion up` (what `make demo` runs) end to end, shortened: a coordinator, two agents and a spare
on 127.0.0.1 with fresh mTLS certificates train the tiny preset on the fixture corpus while the
chaos schedule kills an agent, the coordinator and a rank, hangs a rank, and has the trainer inject a
NaN and a bit flip. Every fault must be detected and answered, the job must succeed, and its final
state must equal the fault-free run's. A second run keeps only crashes (`--chaos-kinds crash`, with a
second crash during a recovery) and sets a recovery bound nothing can meet, to prove that the filter
holds and that a broken invariant is reported and exits 5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def up(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    summary_path = tmp_path / "summary.json"
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
            "--run-dir",
            str(tmp_path / "up"),
            "--json",
            str(summary_path),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert summary_path.exists(), (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    return r, json.loads(summary_path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_up_with_one_fault_kind_keeps_to_it_and_checks_its_invariants(tmp_path: Path) -> None:
    steps = 60
    r, s = up(
        tmp_path,
        *("--steps", str(steps), "--chaos", "3", "--chaos-kinds", "crash", "--fault-every", "15"),
        *("--recovery-bound-s", "0.05", "--samples", "0", "--insecure"),
        timeout=220,
    )
    out = (r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 5, out  # the job succeeded; an invariant (the bound) did not hold
    assert s["state"] == "succeeded" and s["steps_completed"] == steps, out
    # the filter: a schedule of crashes only (one of them during the first one's recovery), and nothing else
    assert s["schedule_source"]["kinds"] == ["crash"] and s["schedule_source"]["fault_every"] == 15
    assert {f["kind"] for f in s["schedule"]} == {"crash"} and len(s["schedule"]) == 4
    assert [f["during_recovery"] for f in s["faults_injected"]] == [False, True, False, False], s[
        "faults_injected"
    ]
    assert all(f["fired"] and f["kind"] == "crash" for f in s["faults_injected"]), s["faults_injected"]
    assert s["faults_by_kind"] == {"crash": {"scheduled": 4, "fired": 4}}
    assert s["second_faults"]["landed_in_recovery"] + s["second_faults"]["landed_after_recovery"] == 1
    assert set(s["restarts"]) == {"crash"} and s["restarts"]["crash"] >= 3, s["restarts"]
    assert all(f["detected"] for f in s["faults_detected"]), s["faults_detected"]
    # the invariants: checked, reported, and the one that cannot hold says why
    inv = s["invariants"]
    assert inv["job_succeeded"]["ok"] is True
    bound = inv["recoveries_within_bound"]
    assert bound["ok"] is False and bound["bound_s"] == 0.05 and bound["measured"] >= 3, bound
    assert bound["over"] and all(o["recovery_s"] > 0.05 and o["kind"] == "crash" for o in bound["over"])
    golden = inv["final_state_matches_fault_free"]
    assert golden["ok"] is True, golden
    assert golden["fault_free_fingerprint"] == s["final_fingerprint"] and golden["fault_free_job_id"]
    assert s["invariants_ok"] is False
    assert "invariant: recoveries within bound" in r.stdout and "NO" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
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
        timeout=580,  # the chaos run, then the fault-free run it is compared with
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    s = json.loads(summary_path.read_text())
    assert s["state"] == "succeeded"
    assert s["invariants_ok"] is True, s["invariants"]
    inv = s["invariants"]
    assert inv["final_state_matches_fault_free"]["fault_free_fingerprint"] == s["final_fingerprint"]
    # crash, hang and coordinator: the killed agent's ranks are adopted by its successor, no recovery
    assert inv["recoveries_within_bound"]["bound_s"] == 60 and inv["recoveries_within_bound"]["measured"] >= 3
    assert s["steps_completed"] == steps and s["steps_computed"] == steps + s["lost_steps"]
    kinds = [f["kind"] for f in s["faults_injected"]]
    assert sorted(kinds) == ["agent", "bitflip", "coordinator", "crash", "hang", "nan"]
    undetected = [f for f in s["faults_detected"] if not f["detected"]]
    assert not undetected, undetected
    assert sorted(f["kind"] for f in s["faults_detected"]) == sorted(kinds)
    assert s["restarts"] and sum(s["restarts"].values()) >= 2  # crash, hang at least
    assert len(s["recovery_seconds"]) >= 2 and all(x > 0 for x in s["recovery_seconds"])
    agent = [f for f in s["faults_detected"] if f["kind"] == "agent"]
    assert "adopted its ranks" in agent[0]["decision"], agent
    # The live log says so as it happens, not only the summary (lines wrap at the console's width).
    live = " ".join((r.stdout + r.stderr).split())
    assert live.index("chaos: SIGKILL the agent") < live.index("adopted its ranks"), live[-3000:]
    assert s["final_val_loss"] < s["unigram_entropy_nats"]  # it learned more than word frequencies
    assert len(s["samples"]) == 1 and s["samples"][0].strip()
    assert s["final_fingerprint"]
    # No orphans: nothing `up` started outlives it. The daemons name the run dir on their command
    # line; standbys and ranks (`python -m trainer`) carry their worker dir under it in the environment.
    assert not leftovers(tmp_path / "up")


def leftovers(run_dir: Path) -> list[tuple[str, list[bytes]]]:
    """Processes that name ``run_dir`` on their command line or in their environment."""
    needle = run_dir.as_posix().encode()
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile
        if needle in seen:
            left.append((proc.name, seen.split(b"\0")[:4]))
    return left


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_up_runs_a_users_own_program_through_its_chaos_schedule(tmp_path: Path) -> None:
    """The SDK's example under agents: every fault detected, no step lost to a crash or a hang while
    a replica lives (the replacement heals from it) nor to a killed agent (its successor adopts the
    ranks), and the final state equals the fault-free run's."""
    steps = 200
    r = subprocess.run(
        [sys.executable, "-m", "diagnostics.cli", "up", "--entrypoint", "examples/own_loop.py"]
        + ["--nodes", "2", "--spares", "1", "--steps", str(steps), "--chaos", "3"]
        + ["--run-dir", str(tmp_path / "up"), "--json", str(tmp_path / "summary.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=580,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["state"] == "succeeded" and s["steps_completed"] == steps
    assert s["invariants_ok"] is True, s["invariants"]
    assert (
        s["invariants"]["final_state_matches_fault_free"]["fault_free_fingerprint"] == s["final_fingerprint"]
    )
    assert sorted(f["kind"] for f in s["faults_injected"]) == sorted(
        ["agent", "bitflip", "coordinator", "crash", "hang", "nan"]
    )
    undetected = [f for f in s["faults_detected"] if not f["detected"]]
    assert not undetected, undetected
    agent = [f for f in s["faults_detected"] if f["kind"] == "agent"]
    assert "adopted its ranks" in agent[0]["decision"], agent
    assert s["final_val_loss"] is not None and s["samples"] == []
    # Rank 0's records, generation by generation: each new generation starts at the step after the
    # last one its predecessor completed (healed from a live replica, nothing redone); only the
    # in-place rollbacks of the NaN and the bit flip redo steps.
    records = [
        json.loads(line)
        for f in (tmp_path / "up" / "runs" / "workers").glob("*/w*/progress.jsonl")
        for line in f.read_text().splitlines()
    ]
    rank0 = sorted(
        (r for r in records if r["job_id"] == s["job_id"] and r["rank"] == 0),
        key=lambda r: (r["generation"], r["t"]),
    )
    firsts = {}
    lasts = {}
    for rec in rank0:
        firsts.setdefault(rec["generation"], rec["step"])
        lasts[rec["generation"]] = max(lasts.get(rec["generation"], 0), rec["step"])
    generations = sorted(firsts)
    assert len(generations) >= 3  # the crash and the hang each made one (the agent's ranks were adopted)
    for before, after in zip(generations, generations[1:], strict=False):
        assert firsts[after] > lasts[before], (before, lasts[before], after, firsts[after])
    assert not leftovers(tmp_path / "up")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("program", "kinds"),
    [
        # bounded: two kinds each, 60 steps (the own loop above runs every kind)
        (["examples/nanogpt.py"], "crash,bitflip"),
        (["examples/fsdp2.py", "--replicate", "1"], "crash,nan"),
    ],
)
def test_up_runs_the_other_examples_through_their_faults(tmp_path: Path, program, kinds) -> None:
    """nanoGPT-shaped and plain FSDP2 (whose survivors re-form in place but, with no replica of the
    lost rank's shard, restore a checkpoint): faults detected, final state equal to the fault-free
    run's."""
    r = subprocess.run(
        [sys.executable, "-m", "diagnostics.cli", "up", "--entrypoint", *program]
        + ["--steps", "60", "--chaos", "5", "--chaos-kinds", kinds, "--insecure"]
        + ["--run-dir", str(tmp_path / "up"), "--json", str(tmp_path / "summary.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=380,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["state"] == "succeeded" and s["steps_completed"] == 60 and s["invariants_ok"] is True, s
    assert sorted(f["kind"] for f in s["faults_injected"]) == sorted(kinds.split(","))
    assert all(f["detected"] for f in s["faults_detected"]), s["faults_detected"]
    assert not leftovers(tmp_path / "up")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_up_heals_a_sharded_model_in_place_from_the_replica_of_the_lost_shard(tmp_path: Path) -> None:
    """HSDP, 2 replicas x 2 shards on 4 ranks: a crashed rank and a hung one are each replaced by a
    standby that heals its shard from the rank holding the same shard in the other replica, while
    the survivors keep theirs: no step lost, final state equal to the fault-free run's. Bounded
    form of `stanchion up --nodes 2 --workers-per-node 2 --spares 1 --set parallel=fsdp
    --set hsdp_replicate=2 --chaos SEED` (every kind: see docs/sdk.md)."""
    r, s = up(
        tmp_path,
        *("--nodes", "2", "--workers-per-node", "2", "--spares", "1", "--steps", "40"),
        *("--set", "parallel=fsdp", "--set", "hsdp_replicate=2", "--set", "data.micro_batch_size=4"),
        *("--chaos", "3", "--chaos-kinds", "crash,hang", "--samples", "0", "--insecure"),
        timeout=380,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert s["state"] == "succeeded" and s["steps_completed"] == 40 and s["invariants_ok"] is True, s
    assert sorted(f["kind"] for f in s["faults_injected"]) == ["crash", "hang"]
    assert all(f["detected"] for f in s["faults_detected"]), s["faults_detected"]
    assert all("heal the replacement from a live peer" in f["decision"] for f in s["faults_detected"]), s[
        "faults_detected"
    ]
    assert s["lost_steps"] == 0, s
    workers = tmp_path / "up" / "runs" / "workers"
    healed = [
        json.loads(line)
        for f in workers.glob("*/*/events.jsonl")
        for line in f.read_text().splitlines()
        if '"healed"' in line and s["job_id"] in line
    ]
    # The mesh is [[0, 1], [2, 3]]: ranks 0 and 2 hold one shard, 1 and 3 the other.
    assert healed and all(h["source_rank"] % 2 == h["rank"] % 2 for h in healed), healed
    assert not leftovers(tmp_path / "up")
