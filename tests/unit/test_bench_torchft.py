"""The torchft side of the benchmarks: what a kill cost, read from its replicas' committed records,
and the commands it runs."""

from __future__ import annotations

from pathlib import Path

from diagnostics.bench import torchft as tft
from stanchion.vocab import EventKind


def rec(step: int, t_start: float, t: float, replicas: int = 2, rank: int = 0) -> dict:
    return {"step": step, "t_start": t_start, "t": t, "replicas": replicas, "rank": rank, "committed": True}


def test_recovery_starts_at_the_first_step_begun_after_the_kill_not_one_in_flight() -> None:
    kill = 100.0
    progress = [
        rec(24, 99.7, 99.8),
        rec(25, 99.8, 99.95),
        rec(26, 99.96, 100.02),  # in flight at the kill, its all-reduce done: committed, no recovery
        rec(27, 101.04, 101.1, replicas=1),  # the survivor alone, once the lighthouse gave up on 1
        rec(28, 101.1, 101.2, replicas=1),
        rec(29, 103.3, 103.4, replicas=2, rank=1),  # the restarted replica healed: both again
        rec(29, 103.3, 103.4, replicas=2),
    ]
    events = [
        {"event": EventKind.STARTED, "t": 90.0, "rank": 1, "resumed_step": 0},
        {"event": EventKind.STARTED, "t": 103.4, "rank": 1, "resumed_step": 28},
    ]
    r, full = tft.torchft_recovery(progress, events, kill)
    assert r.recovery_s == 101.1 - kill
    assert (r.steps_before, r.resume_step, r.lost_steps) == (25, 26, 0)
    assert r.restarted_t == 103.4 and r.resume_source == "peer"
    assert full == 103.4 - kill


def test_no_step_after_the_kill_is_no_recovery() -> None:
    r, full = tft.torchft_recovery([rec(5, 9.0, 9.5)], [], 10.0)
    assert r.recovery_s is None and r.resume_source == "none" and full is None
    assert r.steps_before == 5


def test_the_commands_name_the_lighthouse_settings_and_the_trainer_settings(tmp_path: Path) -> None:
    lh = tft.lighthouse_command(4321)
    assert lh[0].endswith("torchft_lighthouse") and "--bind=127.0.0.1:4321" in lh
    assert "--min_replicas=1" in lh and "--heartbeat_timeout_ms=1000" in lh
    cmd = tft.worker_command(
        1,
        tmp_path,
        data=tmp_path / "data",
        steps=60,
        lighthouse="http://127.0.0.1:4321",
        sets={"model.n_layer": 2},
        faults=tmp_path / "f.json",
    )
    assert cmd[1:3] == ["-m", "diagnostics.bench.torchft_worker"]
    joined = " ".join(cmd)
    assert "--replica-id 1 --replicas 2" in joined and "--steps 60" in joined
    assert "--set model.n_layer=2" in joined and f"--faults {tmp_path / 'f.json'}" in joined
    assert "--timeout-s=10" in joined


def test_torchft_is_installed_here() -> None:
    """The dev install brings torchft-nightly and its lighthouse (pyproject.toml): the recovery
    and goodput benchmarks run it by default."""
    assert tft.available() is None
