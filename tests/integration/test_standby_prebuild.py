"""A warm standby of the built-in trainer builds the model of the job its agent hints at before any
assignment, uses it when the assignment names that config, builds anew when it names another, and
trains the same run either way (started and assigned as `stanchion bench standby` does it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import SMALL

from diagnostics.bench.standby import event, run_standby
from stanchion.files import write_json_atomic
from stanchion.vocab import EventKind
from trainer.cli import parser, resolve_config
from trainer.config import to_dict


def resolved_config(path: Path, data: Path, *sets: str) -> Path:
    """A resolved trainer config as an agent writes it for a job."""
    args = parser("trainer").parse_args(["--data", str(data), *SMALL, *sets])
    write_json_atomic(path, to_dict(resolve_config(args, env={})))
    return path


def standby(root: Path, config: Path, hint: Path | None) -> tuple[dict, str]:
    root.mkdir(parents=True)
    run_standby(root, config, hint, timeout_s=240)
    return event(root / "worker", EventKind.FINISHED), (root / "output.log").read_text()


@pytest.fixture(scope="module")
def configs(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("configs")
    return {
        "job": resolved_config(d / "job.json", small_data, "--steps", "6", "--checkpoint-every", "0"),
        "other": resolved_config(d / "other.json", small_data, "--steps", "6", "--set", "seed=9"),
    }


def test_a_standby_builds_the_hinted_model_before_its_assignment_and_trains_the_same_run(tmp_path, configs):
    cold, cold_out = standby(tmp_path / "cold", configs["job"], None)
    warm, warm_out = standby(tmp_path / "warm", configs["job"], configs["job"])
    assert "before any assignment" not in cold_out
    assert (
        "built the hinted job's model" in warm_out
        and "using the model built before the assignment" in warm_out
    )
    assert warm["step"] == cold["step"] == 6 and warm["fingerprint"] == cold["fingerprint"]


def test_a_standby_hinted_at_another_config_builds_the_assigned_one(tmp_path, configs):
    finished, out = standby(tmp_path / "w", configs["job"], configs["other"])
    assert "the assignment's config differs from the one prepared: building it now" in out
    assert finished["step"] == 6
