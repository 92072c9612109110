"""The trainer as users run it: real processes, gloo, the tiny model family on CPU."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import (
    committed_steps,
    events,
    final_fingerprint,
    kill_group,
    losses_by_step,
    rank_dir,
    run_trainer,
    start_trainer,
    trainer_cmd,
)

from stanchion.sdk import manifest as mf
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until


def test_exact_resume_after_sigkill_of_the_whole_group(small_data: Path, tmp_path: Path) -> None:
    """2 ranks, 40 steps: a run SIGKILLed after a checkpoint and rerun with the same command ends
    bit-identical to an uninterrupted run, with identical per-step losses after the resume point."""
    clean = tmp_path / "clean"
    args = dict(nproc=2, steps=40, extra=["--checkpoint-every", "10"])
    r = run_trainer(trainer_cmd(small_data, clean, **args))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    broken = tmp_path / "broken"
    p = start_trainer(trainer_cmd(small_data, broken, **args))
    wait_until(
        lambda: any(s >= 20 for s in committed_steps(broken)), 180, "a committed checkpoint at step 20"
    )
    kill_group(p)
    resume_from = max(committed_steps(broken))
    assert resume_from < 40
    r = run_trainer(trainer_cmd(small_data, broken, **args))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    restored = events(broken, 0, EventKind.RESTORED)
    assert restored and restored[-1]["step"] == resume_from
    assert final_fingerprint(broken, 0) == final_fingerprint(clean, 0) == final_fingerprint(clean, 1)
    clean_losses, resumed_losses = losses_by_step(clean), losses_by_step(broken)
    after = [s for s in range(resume_from + 1, 41)]
    assert [resumed_losses[s] for s in after] == [clean_losses[s] for s in after]


def test_damaged_checkpoints_are_detected_and_skipped_on_resume(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = trainer_cmd(small_data, run, steps=12, extra=["--checkpoint-every", "4"])
    assert run_trainer(cmd).returncode == 0
    steps = committed_steps(run)
    assert steps == [4, 8, 12]
    ck8, ck12 = run / "checkpoints/step-00000008", run / "checkpoints/step-00000012"
    data_file = next(p for p in sorted(ck12.iterdir()) if p.suffix == ".distcp")
    # Truncate the newest; flip one bit in the one before.
    data_file.write_bytes(data_file.read_bytes()[:-100])
    f8 = next(p for p in sorted(ck8.iterdir()) if p.suffix == ".distcp")
    raw = bytearray(f8.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f8.write_bytes(bytes(raw))

    for path, word in ((ck12, "truncated"), (ck8, "CRC-32")):
        v = subprocess.run(
            [sys.executable, "-m", "diagnostics.cli", "ckpt", "verify", str(path)],
            capture_output=True,
            text=True,
        )
        assert v.returncode == 1 and word in v.stderr, v.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "diagnostics.cli", "ckpt", "verify", str(run / "checkpoints/step-00000004")]
    )
    assert ok.returncode == 0

    # Resume with more steps: both damaged checkpoints are reported and skipped; step 4 is loaded.
    r = run_trainer(trainer_cmd(small_data, run, steps=14, extra=["--checkpoint-every", "0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = {Path(e["path"]).name for e in events(run, 0, EventKind.CHECKPOINT_SKIPPED)}
    assert skipped == {"step-00000008", "step-00000012"}
    assert events(run, 0, EventKind.RESTORED)[-1]["step"] == 4


def test_fsdp_resumes_exactly_and_its_checkpoint_loads_into_one_rank(
    small_data: Path, tmp_path: Path
) -> None:
    fsdp = ["--set", "parallel=fsdp", "--checkpoint-every", "5"]
    clean = tmp_path / "clean"
    r = run_trainer(trainer_cmd(small_data, clean, nproc=2, steps=10, extra=fsdp))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # Resume from step 5 exactly: copy the run, drop the step-10 checkpoint, continue to 10.
    resumed = tmp_path / "resumed"
    shutil.copytree(clean / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints/step-00000010")
    r = run_trainer(trainer_cmd(small_data, resumed, nproc=2, steps=10, extra=fsdp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert events(resumed, 0, EventKind.RESTORED)[-1]["step"] == 5
    assert final_fingerprint(resumed) == final_fingerprint(clean)
    assert [losses_by_step(resumed)[s] for s in range(6, 11)] == [
        losses_by_step(clean)[s] for s in range(6, 11)
    ]

    # The 2-rank FSDP checkpoint loads into a single rank (DCP reshards); the loaded state's
    # fingerprint must equal the manifest's or the trainer refuses to continue.
    single = tmp_path / "single"
    shutil.copytree(clean / "checkpoints", single / "checkpoints")
    r = run_trainer(trainer_cmd(small_data, single, nproc=1, steps=12, extra=["--checkpoint-every", "0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    restored = events(single, 0, EventKind.RESTORED)[-1]
    assert restored["step"] == 10
    assert restored["fingerprint"] == mf.read_manifest(clean / "checkpoints/step-00000010")["fingerprint"]
    assert sorted(losses_by_step(single)) == [11, 12]


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["--set", "model.n_layerz=3"], "model.n_layerz"),
        (["--set", "optim.lr=fast"], "optim.lr"),
        (["--set", "data.global_batch_size=10"], "data.global_batch_size"),
    ],
)
def test_bad_config_fails_before_any_process_group(
    small_data: Path, tmp_path: Path, extra: list[str], key: str
) -> None:
    t0 = time.monotonic()
    r = run_trainer(trainer_cmd(small_data, tmp_path / "run", nproc=2, extra=extra), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert key in r.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a rejected config"
    assert time.monotonic() - t0 < 60


def test_json_summary_and_samples(small_data: Path, tmp_path: Path) -> None:
    r = run_trainer(trainer_cmd(small_data, tmp_path / "run", steps=6, extra=["--sample", "2", "--json"]))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert sum(1 for line in lines if line.startswith("sample: ")) == 2
    summary = json.loads(lines[-1])
    assert summary["steps_completed"] == 6 and summary["final_val_loss"] > 0


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(small_data: Path, tmp_path: Path) -> None:
    import os
    import signal

    run = tmp_path / "run"
    p = start_trainer(trainer_cmd(small_data, run, nproc=2, steps=400, extra=["--checkpoint-every", "0"]))
    wait_until(lambda: max(losses_by_step(run), default=0) >= 5, 120, "step 5")
    os.killpg(p.pid, signal.SIGTERM)  # as a scheduler or systemd would: every process gets it
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    stopped = events(run, 0, EventKind.STOPPED)
    assert stopped and stopped[-1]["step"] < 400
    step = stopped[-1]["step"]
    assert events(run, 1, EventKind.STOPPED)[-1]["step"] == step  # both ranks stopped at the same step
    assert committed_steps(run) == [step]
    assert mf.verify(run / "checkpoints" / f"step-{step:08d}").ok


def test_fsdp_in_bf16_computes_in_bf16_and_resumes_exactly(small_data: Path, tmp_path: Path) -> None:
    """precision=bf16 under FSDP is FSDP2's mixed precision, on a CPU too: a different run from
    fp32 (from the first step's loss on), deterministic, resumable to the last bit, and recorded."""
    fsdp = ["--set", "parallel=fsdp", "--checkpoint-every", "5"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    for run, extra in ((fp32, fsdp), (bf16, [*fsdp, "--set", "precision=bf16"])):
        r = run_trainer(trainer_cmd(small_data, run, nproc=2, steps=10, extra=extra))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses_by_step(bf16)[1] != losses_by_step(fp32)[1]
    assert all(math.isfinite(v) for v in losses_by_step(bf16).values())
    manifest = mf.read_manifest(bf16 / "checkpoints/step-00000010")
    assert manifest["numerics"]["precision"] == "bf16"
    assert manifest["numerics"]["param_dtypes"] == ["float32"]  # fp32 master weights

    resumed = tmp_path / "resumed"
    shutil.copytree(bf16 / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints/step-00000010")
    r = run_trainer(
        trainer_cmd(small_data, resumed, nproc=2, steps=10, extra=[*fsdp, "--set", "precision=bf16"])
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not events(resumed, 0, EventKind.NUMERICS_CHANGED)
    assert final_fingerprint(resumed) == final_fingerprint(bf16)


def test_torch_compile_trains_the_same_model(small_data: Path, tmp_path: Path) -> None:
    r = run_trainer(
        trainer_cmd(small_data, tmp_path / "run", steps=6, extra=["--set", "compile=true", "--json"])
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps_completed"] == 6


# Rollback in place, checked against the fault-free run: 2 ranks, 12 steps, a fingerprint check and
# a snapshot every 4 steps (all snapshots kept), a checkpoint every 4 steps, so a rollback to step S
# is followed by a checkpoint of step S, which is what once broke a rollback to step 0.
ROLLBACK_ARGS = [
    "--checkpoint-every",
    "4",
    "--set",
    "integrity.fingerprint_every=4",
    "--set",
    "integrity.snapshot_every=4",
    "--set",
    "integrity.snapshots_kept=10",
    "--set",
    "integrity.on_mismatch=rollback",
    "--set",
    "integrity.audit_every=0",
    "--set",
    "integrity.spike_loss_z=1000",
    "--set",
    "integrity.spike_grad_z=1000",
]
ROLLBACK_STEPS = 12


@pytest.fixture(scope="module")
def fault_free(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fault-free") / "run"
    r = run_trainer(trainer_cmd(small_data, run, nproc=2, steps=ROLLBACK_STEPS, extra=ROLLBACK_ARGS))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_activation_checkpointing_trains_the_same_run_to_the_last_bit(
    small_data: Path, tmp_path: Path, fault_free: Path
) -> None:
    """Blocks recomputed in the backward pass give the same gradients, so the same run: every
    step's loss and the final state equal the run that kept its activations."""
    run = tmp_path / "run"
    extra = [*ROLLBACK_ARGS, "--set", "activation_checkpointing=true"]
    r = run_trainer(trainer_cmd(small_data, run, nproc=2, steps=ROLLBACK_STEPS, extra=extra))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses_by_step(run) == losses_by_step(fault_free)
    assert final_fingerprint(run) == final_fingerprint(fault_free)
    assert not events(run, 0, EventKind.NONDETERMINISTIC)


def assert_replayed_exactly(run: Path, clean: Path, to_step: int) -> None:
    for rank in range(2):
        rollbacks = events(run, rank, EventKind.ROLLBACK)
        assert [e["step"] for e in rollbacks] == [to_step], rollbacks
    # the checkpoint taken right after the rollback, of the restored state itself
    assert to_step in [e["step"] for e in events(run, 0, EventKind.CHECKPOINT_COMMITTED)]
    clean_losses, losses = losses_by_step(clean), losses_by_step(run)
    assert sorted(losses) == list(range(1, ROLLBACK_STEPS + 1))
    assert losses == clean_losses  # every step, replayed or not, to the last bit
    assert final_fingerprint(run, 0) == final_fingerprint(run, 1) == final_fingerprint(clean, 0)


@pytest.mark.parametrize("flip_step", [2, 6], ids=["to-step-0", "to-step-4"])
def test_fingerprint_mismatch_rollback_replays_the_fault_free_run_exactly(
    small_data: Path, tmp_path: Path, fault_free: Path, flip_step: int
) -> None:
    """A bit flip in rank 1's parameters; the next fingerprint check (step 4 or 8) disagrees and both
    ranks roll back in place to the newest agreed snapshot: step 0 (the initial state) or step 4."""
    faults = tmp_path / "faults.json"
    faults.write_text(
        json.dumps([{"kind": "bitflip", "step": flip_step, "rank": 1, "target": "param", "bit": 24}])
    )
    run = tmp_path / "run"
    extra = [*ROLLBACK_ARGS, "--faults", str(faults)]
    r = run_trainer(trainer_cmd(small_data, run, nproc=2, steps=ROLLBACK_STEPS, extra=extra))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (mismatch,) = events(run, 0, EventKind.FINGERPRINT_MISMATCH)
    assert mismatch["step"] == flip_step // 4 * 4 + 4
    # The event names the step every rank goes back to, so a coordinator need not ask again.
    assert mismatch["rolls_back_to"] == flip_step // 4 * 4 == events(run, 0, EventKind.ROLLBACK)[0]["step"]
    assert_replayed_exactly(run, fault_free, to_step=flip_step // 4 * 4)


@pytest.mark.parametrize("nan_step", [3, 7], ids=["to-step-0", "to-step-4"])
def test_nan_replay_rollback_replays_the_fault_free_run_exactly(
    small_data: Path, tmp_path: Path, fault_free: Path, nan_step: int
) -> None:
    """A NaN loss on rank 0 (the step is skipped everywhere); as the coordinator's replay-first
    policy does, a rollback request to the step before it replays from the newest snapshot at or
    before that step: step 0 (the initial state) or step 4. The one-shot NaN does not recur."""
    from stanchion.files import write_json_atomic

    faults = tmp_path / "faults.json"
    faults.write_text(
        json.dumps(
            [
                {"kind": "nan", "step": nan_step, "rank": 0},
                # slower steps after the NaN, so the request lands well before the run ends
                {
                    "kind": "slow",
                    "rank": -1,
                    "from_step": nan_step,
                    "until_step": nan_step + 4,
                    "delay_s": 0.5,
                },
            ]
        )
    )
    run = tmp_path / "run"
    extra = [*ROLLBACK_ARGS, "--faults", str(faults)]
    p = start_trainer(trainer_cmd(small_data, run, nproc=2, steps=ROLLBACK_STEPS, extra=extra))
    try:
        wait_until(lambda: events(run, 0, EventKind.NONFINITE), 120, "the nonfinite event")
        request = {"id": 1, "kind": "rollback", "to_step": nan_step - 1, "skip": [], "reason": "nan replay"}
        for rank in range(2):
            write_json_atomic(rank_dir(run, rank) / "control" / "request-00000001.json", request)
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            kill_group(p)
    assert p.returncode == 0, out[-3000:]
    assert [e["step"] for e in events(run, 0, EventKind.NONFINITE)] == [nan_step]
    assert_replayed_exactly(run, fault_free, to_step=(nan_step - 1) // 4 * 4)
