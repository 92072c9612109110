"""A warm standby of the built-in trainer builds the model of the job its agent hints at before any
assignment, uses it when the assignment names that config, builds anew when it names another, and
trains the same run either way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from support import REPO, SMALL, env

from stanchion.files import write_json_atomic
from stanchion.sdk import contract
from stanchion.vocab import EventKind, Resume
from stanchion.waiting import wait_until
from trainer.cli import parser, resolve_config
from trainer.config import to_dict


def resolved_config(path: Path, data: Path, *sets: str) -> Path:
    """A resolved trainer config as an agent writes it for a job."""
    args = parser("trainer").parse_args(["--data", str(data), *SMALL, *sets])
    write_json_atomic(path, to_dict(resolve_config(args, env={})))
    return path


def run_standby(tmp: Path, hint: Path | None, config: Path) -> tuple[Path, str]:
    """Start a standby (as an agent does), wait until it is ready, assign it as rank 0 of 1 and let
    it train to the end; returns its run dir and output."""
    worker, run_dir = tmp / "worker", tmp / "run"
    (worker / "control").mkdir(parents=True)
    extra = {contract.ENV_STANDBY: "1", contract.ENV_WORKER_DIR: str(worker)}
    if hint is not None:
        extra[contract.ENV_STANDBY_CONFIG] = str(hint)
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    with open(tmp / "output.log", "w") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "trainer"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(**extra),
            cwd=REPO,
        )
    try:
        wait_until(lambda: _standby_ready(worker), 120, "the standby to be ready")
        assignment = contract.Assignment(
            generation=1,
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            master_addr="127.0.0.1",
            master_port=store.port,
            resume=Resume.FRESH,
            job_id="prebuild",
            run_dir=str(run_dir),
            config=str(config),
        )
        write_json_atomic(contract.WorkerPaths(worker).assignment_path(1), assignment.to_json())
        assert p.wait(timeout=240) == 0, (tmp / "output.log").read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return worker, (tmp / "output.log").read_text()


def _standby_ready(worker: Path) -> bool:
    path = worker / "events.jsonl"
    return path.exists() and any(e["event"] == EventKind.STANDBY for e in _events(worker))


@pytest.fixture(scope="module")
def configs(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("configs")
    return {
        "job": resolved_config(d / "job.json", small_data, "--steps", "6", "--checkpoint-every", "0"),
        "other": resolved_config(d / "other.json", small_data, "--steps", "6", "--set", "seed=9"),
    }


def test_a_standby_builds_the_hinted_model_before_its_assignment_and_trains_the_same_run(tmp_path, configs):
    cold, cold_out = run_standby(tmp_path / "cold", None, configs["job"])
    warm, warm_out = run_standby(tmp_path / "warm", configs["job"], configs["job"])
    assert "before any assignment" not in cold_out
    assert (
        "built the hinted job's model" in warm_out
        and "using the model built before the assignment" in warm_out
    )
    assert finished(warm)["fingerprint"] == finished(cold)["fingerprint"]


def test_a_standby_hinted_at_another_config_builds_the_assigned_one(tmp_path, configs):
    worker, out = run_standby(tmp_path / "w", configs["other"], configs["job"])
    assert "the assignment's config differs from the one prepared: building it now" in out
    assert finished(worker)["step"] == 6


def _events(worker: Path) -> list[dict]:
    return [json.loads(line) for line in (worker / "events.jsonl").read_text().splitlines() if line.strip()]


def finished(worker: Path) -> dict:
    (event,) = [e for e in _events(worker) if e["event"] == EventKind.FINISHED]
    return event
