"""`stanchion bench recovery` and `stanchion bench goodput` end to end, in a bounded form: real local
clusters, real torchrun, real faults, a few dozen steps of the small model. They check that each
command works and that its JSON carries what the issues name, with the claims that do not depend on
the machine's speed: 0 steps lost by Stanchion to a single-rank crash, and a faulted run that ends
bit-identical to the fault-free one. Speed figures are the benchmarks' business (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnostics.commands.bench import app

runner = CliRunner()


def run_bench(args: list[str], out: Path) -> dict:
    result = runner.invoke(app, [*args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_recovery_measures_every_side_of_one_kill(small_data: Path, tmp_path: Path) -> None:
    data = run_bench(
        [
            "recovery",
            "--trials",
            "1",
            "--model",
            "tiny",  # steps slow enough that node-1 has a warm standby again before the kill
            "--steps",
            "60",
            "--checkpoint-every",
            "20",
            "--kill-step",
            "25",
            "--data",
            str(small_data),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        tmp_path / "recovery.json",
    )
    assert data["benchmark"] == "recovery"
    for key in (
        "stanchion_recovery_s",
        "torchrun_recovery_s",
        "ratio",
        "stanchion_lost_steps",
        "torchrun_lost_steps",
        "torchft_recovery_s",
        "ratio_vs_torchft",
        "torchft_lost_steps",
        "trials",
    ):
        assert data[key] == data["results"][key], key
    assert sorted(t["system"] for t in data["trials"]) == ["stanchion", "torchft", "torchrun"]
    # Stanchion and torchrun train the same job through the kill; torchft's survivor trains alone
    # on half the batch for a while, so its final state is another one.
    same_job = [t for t in data["trials"] if t["system"] != "torchft"]
    assert all(t["final_fingerprint"] == same_job[0]["final_fingerprint"] for t in same_job)
    (ft,) = [t for t in data["trials"] if t["system"] == "torchft"]
    # torchft's survivor went on from where it stood: nothing committed was thrown away
    assert ft["lost_steps"] == 0 and ft["resume_source"] == "peer" and ft["final_fingerprint"]
    assert data["torchft_recovery_s"] == ft["recovery_s"] > 0
    assert data["ratio_vs_torchft"] == pytest.approx(
        data["stanchion_recovery_s"] / ft["recovery_s"], rel=0.01
    )
    assert data["stanchion_lost_steps"] == 0  # healed from the live peer
    # torchrun restarts every rank from the checkpoint at step 20: the steps after it are redone
    assert data["torchrun_lost_steps"] >= 25 - 20
    assert data["stanchion_recovery_s"] > 0 and data["torchrun_recovery_s"] > 0
    assert data["ratio"] == pytest.approx(
        data["stanchion_recovery_s"] / data["torchrun_recovery_s"], rel=0.01
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_goodput_runs_a_fault_schedule_and_ends_on_the_golden_state(
    small_data: Path, tmp_path: Path
) -> None:
    # seed 24 at one fault per 20 steps over 80 steps: hang@29, crash@34, bitflip@57, hang@68, crash@69
    data = run_bench(
        [
            "goodput",
            "--schedule",
            "S2",
            "--steps",
            "80",
            "--mean-interval",
            "20",
            "--seed",
            "24",
            "--model",
            "small",
            "--checkpoint-every",
            "20",
            "--hang-floor-s",
            "1",
            "--data",
            str(small_data),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        tmp_path / "goodput.json",
    )
    r = data["results"]
    for key in ("schedule", "steps", "ettr", "lost_steps", "recovery_s", "final_matches_golden"):
        assert data[key] == r[key], key
    assert data["steps"] == 80
    assert r["faults_by_kind"] == {"crash": 2, "hang": 2, "slow": 0, "bitflip": 1}
    fired = [f for f in r["faulted"]["faults"] if f.get("recovery_s") is not None]
    assert sorted(f["kind"] for f in fired) == ["bitflip", "crash", "crash", "hang", "hang"]
    assert sorted(data["recovery_s"]) == sorted(f["recovery_s"] for f in fired)
    # peer healing: a crash or a hang loses no step (the rows say how each recovered if one did)
    lost = [f for f in fired if f["kind"] in ("crash", "hang") and f["lost_steps"] != 0]
    assert not lost, json.dumps(r["faulted"]["faults"], indent=1)
    # the bit flip's rollback to the last agreeing snapshot redid steps; nothing else did
    assert data["lost_steps"] == r["faulted"]["lost_steps"] > 0
    assert [f["lost_steps"] > 0 for f in fired if f["kind"] == "bitflip"] == [True]
    assert data["final_matches_golden"] is True
    assert r["faulted"]["final_fingerprint"] == r["golden_fingerprint"]
    assert data["ettr"] > 0 and 0 < r["ettr_local"] <= 1
    # torchrun ran the same schedule's crashes, and ended on the same state too
    assert [f["kind"] for f in r["torchrun"]["faults"]] == ["crash", "crash"]
    assert r["torchrun"]["final_matches_golden"] is True
    # torchft ran the same crashes and reports them under its own keys (lost steps are not claimed
    # here: in a run this short a restarted replica may come back after the survivor left and
    # train the job again alone)
    ft = r["torchft"]
    assert data["results"]["torchft_ettr"] == ft["ettr"] > 0
    assert r["torchft_lost_steps"] == ft["lost_steps"]
    assert {f["kind"] for f in ft["faults"]} <= {"crash"} and r["torchft_recovery_s"] == ft["recovery_s"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_sdk_runs_a_users_loop_plain_and_guarded(tmp_path: Path) -> None:
    """One round of 6 steps of a tiny model in each mode (~20 s): the JSON's shape, and a headline
    ratio that is exactly the quotient of the two medians recorded in it."""
    data = run_bench(
        [
            "sdk",
            "--steps",
            "6",
            "--rounds",
            "1",
            "--dim",
            "8",
            "--hidden",
            "32",
            "--layers",
            "2",
            "--batch-size",
            "4",
            "--work-dir",
            str(tmp_path / "work"),
        ],
        tmp_path / "sdk.json",
    )
    r = data["results"]
    assert data["benchmark"] == "sdk"
    assert data["command"].startswith("stanchion bench sdk --steps 6 --nproc 2 --rounds 1 --dim 8")
    for key in ("ratio", "plain_median_s", "guarded_median_s", "ratio_per_round", "ratio_median_of_rounds"):
        assert data[key] == r[key], key
    plain, guarded = r["configs"]["plain"], r["configs"]["guarded"]
    assert data["plain_median_s"] == plain["step_time_s"]["median"] > 0
    assert data["guarded_median_s"] == guarded["step_time_s"]["median"] > 0
    assert data["ratio"] == guarded["step_time_s"]["median"] / plain["step_time_s"]["median"]  # exactly
    assert len(data["ratio_per_round"]) == 1 and data["ratio_median_of_rounds"] == data["ratio_per_round"][0]
    assert plain["steps_measured"] == guarded["steps_measured"] == 5  # step 1 dropped as warm-up
    assert plain["protections"] is None and guarded["protections"]["fingerprint_every"] == 1
    assert guarded["counters"] == {
        "nonfinite": 0,
        "spikes": 0,
        "fingerprint_mismatches": 0,
        "audit_mismatches": 0,
        "stragglers": 0,
    }
    assert r["model"]["params"] == 256 * 8 + (32 * 8 * 32 + 32) + (32 * 32 + 32) + (32 * 256 + 256)
    [g] = data["goals"]
    assert g["value"] == data["ratio"] and g["target"] == "<= 1.03" and g["met"] is (data["ratio"] <= 1.03)
    assert data["settings"]["configs"] == ["plain", "guarded"] and data["settings"]["nproc"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_checkpoint_times_both_kinds_of_checkpoint_on_the_same_state(
    small_data: Path, tmp_path: Path
) -> None:
    data = run_bench(
        [
            *("checkpoint", "--preset", "tiny", "--rounds", "2", "--gap", "2", "--window", "1"),
            *("--data", str(small_data), "--work-dir", str(tmp_path / "work")),
        ],
        tmp_path / "checkpoint.json",
    )
    assert data["benchmark"] == "checkpoint"
    r = data["results"]["presets"]["tiny"]
    for kind in ("plain", "stanchion"):
        assert r[kind]["checkpoints"] == 2 and len(r[kind]["blocked_s_each"]) == 2
        assert r[kind]["blocked_s"] > 0
    # the JSON keeps 4 significant digits of each figure
    assert r["blocked_ratio"] == pytest.approx(
        r["stanchion"]["blocked_s"] / r["plain"]["blocked_s"], rel=1e-3
    )
    # Stanchion's side is its real checkpoint: committed with a manifest, the newest two kept
    kept = sorted((tmp_path / "work").glob("checkpoint-*/tiny/stanchion/checkpoints/step-*/manifest.json"))
    assert len(kept) == 2
