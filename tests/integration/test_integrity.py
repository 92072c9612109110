"""Integrity detectors inside real 2- and 3-rank gloo jobs, driven by seeded fault schedules."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import (
    events,
    final_fingerprint,
    losses_by_step,
    rank_dir,
    read_jsonl,
    run_trainer,
    start_trainer,
    trainer_cmd,
)

from stanchion.sdk import manifest as mf
from stanchion.vocab import EventKind
from stanchion.waiting import wait_until


def write_faults(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_every_state_bitflip_is_caught_at_once_and_the_right_rank_named(
    small_data: Path, tmp_path: Path, seed: int
) -> None:
    """3 ranks, 200 seeded single-bit flips (bits 0-31) in parameters and optimizer state, one every
    4 steps, fingerprints every step (K=1). Each flip is named at its step; each rank rolls back in
    place to the last agreed snapshot and carries on. Every other check is clean."""
    rng = random.Random(seed)
    flips = [
        {
            "kind": "bitflip",
            "step": s,
            "rank": rng.randrange(3),
            "target": rng.choice(["param", "optim"]),
            "bit": rng.randrange(32),
        }
        for s in range(4, 804, 4)
    ]
    faults = write_faults(tmp_path / "faults.json", flips)
    run = tmp_path / "run"
    extra = [
        "--faults",
        str(faults),
        "--checkpoint-every",
        "0",
        "--set",
        "integrity.fingerprint_every=1",
        "--set",
        "integrity.snapshot_every=1",
        "--set",
        "integrity.on_mismatch=rollback",
        "--set",
        "integrity.audit_every=0",
        "--set",
        "integrity.spike_loss_z=1000",
        "--set",
        "integrity.spike_grad_z=1000",
    ]
    r = run_trainer(trainer_cmd(small_data, run, nproc=3, steps=900, extra=extra), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    fired = {}  # step -> (rank, target)
    for rank in range(3):
        for e in events(run, rank, EventKind.FAULT_INJECTED):
            fired[e["step"]] = rank
    assert len(fired) == 200, f"{len(fired)} flips fired"
    mismatches = events(run, 0, EventKind.FINGERPRINT_MISMATCH)
    named = {e["step"]: e["suspect_ranks"] for e in mismatches}
    assert sorted(named) == sorted(fired), "a flip was missed, or a clean check raised an alarm"
    assert all(named[s] == [fired[s]] for s in fired), {
        s: (named[s], fired[s]) for s in fired if named[s] != [fired[s]]
    }
    assert len(events(run, 0, EventKind.ROLLBACK)) == 200

    # Clean checks: every other fingerprint check on every rank agreed (>= 2,000 rank-step checks).
    checks = sum(1 for rec in read_jsonl(rank_dir(run, 0) / "progress.jsonl"))
    clean_rank_checks = (checks - len(mismatches)) * 3
    assert clean_rank_checks >= 2000, clean_rank_checks
    # All replicas end identical.
    assert len({final_fingerprint(run, rank) for rank in range(3)}) == 1


@pytest.mark.parametrize("faulty_rank", [0, 1, 2])
def test_persistent_compute_fault_is_named_by_the_audit(
    small_data: Path, tmp_path: Path, faulty_rank: int
) -> None:
    """A mercurial core on one of 3 ranks corrupts matmuls from step 3; replica fingerprints cannot
    see it (every replica applies the same averaged update); the ring audit names it within M=5."""
    faults = write_faults(
        tmp_path / "f.json", [{"kind": "compute", "rank": faulty_rank, "from_step": 3, "prob": 1.0}]
    )
    run = tmp_path / "run"
    extra = [
        "--faults",
        str(faults),
        "--checkpoint-every",
        "0",
        "--set",
        "integrity.audit_every=5",
        "--set",
        "integrity.fingerprint_every=1",
    ]
    r = run_trainer(trainer_cmd(small_data, run, nproc=3, steps=8, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    audits = events(run, 0, EventKind.AUDIT_MISMATCH)
    assert audits, "the audit did not see the compute fault"
    first = audits[0]
    assert first["step"] <= 3 + 5 - 1
    assert first["suspect_ranks"] == [faulty_rank]
    assert (
        events(run, 0, EventKind.FINGERPRINT_MISMATCH) == []
    )  # replicas stay identical: the fault is invisible to them


@pytest.mark.parametrize("hsdp_replicate", [1, 2], ids=["fsdp-3-shards", "hsdp-2x2"])
def test_a_compute_fault_under_fsdp_is_named_by_the_audit(
    small_data: Path, tmp_path: Path, hsdp_replicate: int
) -> None:
    """Sharded, a rank's local gradient exists only as the input of FSDP's reduce-scatters; the
    audit fingerprints those, in its own pass and in its recomputation of the next rank's
    micro-batch, so the rank whose matmuls go wrong is named as under data parallelism."""
    nproc = 3 if hsdp_replicate == 1 else 4
    faults = write_faults(tmp_path / "f.json", [{"kind": "compute", "rank": 1, "from_step": 3, "prob": 1.0}])
    run = tmp_path / "run"
    extra = ["--faults", str(faults), "--checkpoint-every", "0"]
    for setting in (
        "parallel=fsdp",
        f"hsdp_replicate={hsdp_replicate}",
        "data.global_batch_size=24",
        "data.micro_batch_size=2",
        "integrity.audit_every=2",
        "integrity.fingerprint_every=1",
        "optim.warmup_steps=1",
    ):
        extra += ["--set", setting]
    r = run_trainer(trainer_cmd(small_data, run, nproc=nproc, steps=4, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    audits = events(run, 0, EventKind.AUDIT_MISMATCH)
    # The audit of step 2 (before the fault) is clean; that of step 4 names the faulty rank.
    assert [(a["step"], a["suspect_ranks"]) for a in audits] == [(4, [1])], audits


def test_nan_on_one_rank_is_agreed_and_the_step_is_skipped_everywhere(
    small_data: Path, tmp_path: Path
) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    faults = write_faults(tmp_path / "f.json", [{"kind": "nan", "step": 5, "rank": 1}])
    run = tmp_path / "run"
    r = run_trainer(
        trainer_cmd(
            small_data, run, nproc=2, steps=6, extra=["--faults", str(faults), "--checkpoint-every", "1"]
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        nonfinite = events(run, rank, EventKind.NONFINITE)
        assert [(e["step"], e["suspect_ranks"]) for e in nonfinite] == [(5, [1])]
        rec = {x["step"]: x for x in read_jsonl(rank_dir(run, rank) / "progress.jsonl")}
        assert rec[5].get("skipped") is True and rec[4].get("skipped") is None
    m4 = mf.read_manifest(run / "checkpoints/step-00000004")
    m5 = mf.read_manifest(run / "checkpoints/step-00000005")
    assert m4["fingerprint"] == m5["fingerprint"], "the poisoned step changed parameters or optimizer state"
    state: dict = {}
    meta = dcp.FileSystemReader(str(run / "checkpoints/step-00000005")).read_metadata()
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load(state, checkpoint_id=str(run / "checkpoints/step-00000005"), no_dist=True)
    assert state and all(bool(torch.isfinite(t).all()) for t in state.values())


def test_in_place_rollback_with_empty_window_reproduces_the_clean_run(
    small_data: Path, tmp_path: Path
) -> None:
    args = dict(
        nproc=2,
        steps=40,
        extra=[
            "--checkpoint-every",
            "0",
            "--set",
            "integrity.snapshot_every=5",
            "--set",
            "integrity.fingerprint_every=5",
        ],
    )
    clean = tmp_path / "clean"
    assert run_trainer(trainer_cmd(small_data, clean, **args)).returncode == 0

    run = tmp_path / "run"
    p = start_trainer(trainer_cmd(small_data, run, **args))
    wait_until(lambda: max(losses_by_step(run), default=0) >= 17, 120, "step 17")
    request = {"id": 1, "kind": "rollback", "to_step": -1, "skip": [], "reason": "test"}
    for rank in range(2):
        from stanchion.files import write_json_atomic

        write_json_atomic(rank_dir(run, rank) / "control" / "request-00000001.json", request)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
    rollbacks = events(run, 0, EventKind.ROLLBACK)
    # to_step -1 is the newest snapshot: an earlier step, or this very step when the request lands
    # just after a snapshot (every 5 steps here), which the trainer restores all the same
    assert len(rollbacks) == 1 and rollbacks[0]["from_step"] >= rollbacks[0]["step"]
    assert rollbacks[0]["step"] % 5 == 0
    # Both ranks acted at the same step.
    assert events(run, 1, EventKind.ROLLBACK)[0]["step"] == rollbacks[0]["step"]
    assert final_fingerprint(run) == final_fingerprint(clean)
