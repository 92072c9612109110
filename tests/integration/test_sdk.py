"""The public SDK under plain torchrun: a user's own loop (examples/own_loop.py, and a test program
with its protections chosen by flags) trains to the end, skips a poisoned step on every rank, rolls
back in place past a flipped bit, and resumes from a checkpoint after a crash, each ending on the
fault-free run's exact state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, env, events, final_fingerprint

from stanchion.files import read_jsonl
from stanchion.sdk.protections import Protections
from stanchion.vocab import EventKind

PROGRAM = REPO / "tests" / "programs" / "guarded.py"


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 180, **env_extra: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--max-restarts=0", str(script), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env(**env_extra), cwd=REPO
    )


def result(p: subprocess.CompletedProcess[str]) -> dict:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def guarded(run_dir: Path, *extra: str, faults: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra_env = {"STANCHION_FAULTS": str(faults)} if faults else {}
    return torchrun(PROGRAM, "--run-dir", str(run_dir), "--steps", "30", *extra, **extra_env)


def schedule(tmp_path: Path, *faults: dict) -> Path:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(list(faults)))
    return path


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return result(guarded(tmp_path_factory.mktemp("sdk") / "golden", "--checkpoint-every", "10"))


def test_the_example_trains_to_the_end_under_plain_torchrun(tmp_path):
    run = tmp_path / "run"
    p = torchrun(REPO / "examples" / "own_loop.py", "--run-dir", str(run), timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "finished at step 300: validation loss" in p.stdout
    # Both replicas end on the same state, which the final checkpoint holds.
    assert final_fingerprint(run, 0) == final_fingerprint(run, 1)
    steps = [r["step"] for r in read_jsonl(run / "ranks" / "rank-00001" / "progress.jsonl")]
    assert steps == list(range(1, 301))
    committed = events(run, 0, EventKind.CHECKPOINT_COMMITTED)
    assert [e["step"] for e in committed] == [50, 100, 150, 200, 250, 300]
    assert committed[-1]["fingerprint"] == final_fingerprint(run, 0)


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, fault_free):
    faults = schedule(tmp_path, {"kind": "nan", "step": 5, "rank": 1})
    out = result(guarded(tmp_path / "run", faults=faults))
    assert out["outcome"] == "finished" and out["step"] == 30
    assert out["committed"]["5"] is False
    assert all(out["committed"][str(s)] for s in range(1, 31) if s != 5)
    assert out["last_epoch"] == 30  # the schedule steps on a skipped step too
    for rank in (0, 1):
        (nonfinite,) = events(tmp_path / "run", rank, EventKind.NONFINITE)
        assert nonfinite["step"] == 5 and nonfinite["suspect_ranks"] == [1]
    assert out["fingerprint"] != fault_free["fingerprint"]  # a skipped step is a different run


def test_a_flipped_bit_rolls_back_in_place_and_ends_on_the_fault_free_state(tmp_path, fault_free):
    faults = schedule(tmp_path, {"kind": "bitflip", "step": 10, "rank": 1, "target": "param", "bit": 24})
    out = result(guarded(tmp_path / "run", "--protections", '{"on_mismatch": "rollback"}', faults=faults))
    for rank in (0, 1):
        (mismatch,) = events(tmp_path / "run", rank, EventKind.FINGERPRINT_MISMATCH)
        (rollback,) = events(tmp_path / "run", rank, EventKind.ROLLBACK)
        # Step 10's fingerprints travel in step 11's agreement: step 11 is not applied, and the run
        # returns to the newest agreed snapshot before step 10 (the one taken at step 10 beside its
        # check was never verified): step 8's, snapshots being taken every second step.
        assert Protections().snapshot_every == 2
        assert mismatch["step"] == 10 and rollback["from_step"] == 11 and rollback["step"] == 8
    # The replay restored the scheduler and the optimizer's learning rate with the weights.
    assert (out["lr"], out["last_epoch"]) == (fault_free["lr"], fault_free["last_epoch"])
    assert out["fingerprint"] == fault_free["fingerprint"]


def test_a_crash_under_torchrun_resumes_from_the_checkpoint_bit_exactly(tmp_path, fault_free):
    run = tmp_path / "run"
    faults = schedule(tmp_path, {"kind": "crash", "step": 15, "rank": 1})
    # Checkpoints committed before the next step: the one of step 10 exists when step 15 crashes.
    crashed = guarded(run, "--checkpoint-every", "10", "--sync-checkpoints", faults=faults)
    assert crashed.returncode != 0
    assert not events(run, 0, EventKind.FINISHED)
    # The same command again (the crash is one-shot): it resumes from step 10's checkpoint.
    out = result(guarded(run, "--checkpoint-every", "10", "--sync-checkpoints", faults=faults))
    (restored,) = [e for e in events(run, 1, EventKind.RESTORED)]
    assert restored["step"] == 10
    assert not events(run, 1, EventKind.NUMERICS_CHANGED)  # the same settings: the same run
    assert out["last_epoch"] == fault_free["last_epoch"] and out["fingerprint"] == fault_free["fingerprint"]


def test_a_resume_under_other_numerics_trains_on_and_names_what_changed(tmp_path):
    run = tmp_path / "run"
    result(torchrun(PROGRAM, "--run-dir", str(run), "--steps", "10", "--checkpoint-every", "10"))
    resumed = torchrun(
        PROGRAM, "--run-dir", str(run), "--steps", "20", "--checkpoint-every", "10", "--threads", "2"
    )
    assert result(resumed)["step"] == 20
    for rank in (0, 1):
        (changed,) = events(run, rank, EventKind.NUMERICS_CHANGED)
        assert changed["step"] == 10 and changed["changed"] == ["threads: 1 -> 2"]
    assert "under other numerics (threads: 1 -> 2)" in resumed.stderr


def test_the_docs_show_the_nanogpt_diff_as_it_is():
    import difflib

    plain = (REPO / "examples" / "nanogpt_plain.py").read_text().splitlines(keepends=True)
    guarded_ = (REPO / "examples" / "nanogpt.py").read_text().splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(plain, guarded_, "examples/nanogpt_plain.py", "examples/nanogpt.py"))
    doc = (REPO / "docs" / "sdk.md").read_text()
    shown = doc.split("<!-- nanogpt-diff:start -->\n```diff\n", 1)[1].split("```\n<!-- nanogpt-diff:end -->")[
        0
    ]
    assert shown == diff


@pytest.mark.parametrize("script", ["nanogpt_plain.py", "nanogpt.py"])
def test_the_nanogpt_scripts_train_to_the_end_under_plain_torchrun(tmp_path, script):
    p = torchrun(REPO / "examples" / script, "--out-dir", str(tmp_path / "out"), "--max-iters", "60")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "finished 60 iterations: val loss" in p.stdout
    assert (tmp_path / "out" / "ckpt.pt").is_file()
    if script == "nanogpt.py":  # the guarded one: both replicas agree, the last checkpoint holds them
        assert final_fingerprint(tmp_path / "out", 0) == final_fingerprint(tmp_path / "out", 1)


def test_the_fsdp2_example_trains_and_resumes_bit_exactly(tmp_path):
    """HSDP (2 replicas of 1 shard): a crash ends the torchrun job; the same command resumes from
    the newest sharded checkpoint and ends on the uninterrupted run's state. (Plain FSDP runs under agents
    in test_up.py.)"""
    script = REPO / "examples" / "fsdp2.py"
    common = ("--replicate", "2", "--steps", "30", "--checkpoint-every", "10")
    golden = torchrun(script, *common, "--run-dir", str(tmp_path / "golden"))
    assert golden.returncode == 0, golden.stderr[-4000:]
    assert "finished at step 30" in golden.stdout
    faults = schedule(tmp_path, {"kind": "crash", "step": 25, "rank": 1})
    run = tmp_path / "run"
    assert torchrun(script, *common, "--run-dir", str(run), STANCHION_FAULTS=str(faults)).returncode != 0
    # Checkpoints are asynchronous: step 10's has had 15 steps to commit, step 20's 5.
    committed = [e["step"] for e in events(run, 0, EventKind.CHECKPOINT_COMMITTED)]
    assert committed in ([10], [10, 20]), committed
    resumed = torchrun(script, *common, "--run-dir", str(run), STANCHION_FAULTS=str(faults))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [e["step"] for e in events(run, 0, EventKind.RESTORED)] == committed[-1:]
    assert final_fingerprint(run, 0) == final_fingerprint(run, 1) == final_fingerprint(tmp_path / "golden", 0)
