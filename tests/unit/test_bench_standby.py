"""`stanchion bench standby`: its memory rule, the configs it gives the standbys, its usage errors,
and one real run on the tiny preset (shape only: no assertion here depends on how fast it ran)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from diagnostics.bench import standby
from diagnostics.commands.bench import app
from stanchion.sdk.protections import Protections

runner = CliRunner()


def test_snapshots_are_kept_only_where_a_rank_with_them_fits_in_memory():
    gib = 1 << 30
    assert standby.fits_with_snapshots(124_000_000, 24 * gib)  # gpt2-124m: 3.5 GB
    assert not standby.fits_with_snapshots(1_100_000_000, 24 * gib)  # llama-1b: 31 GB
    assert standby.fits_with_snapshots(1_100_000_000, 64 * gib)


def test_the_standbys_config_is_the_preset_with_one_micro_batch_and_two_steps(tmp_path):
    cfg = standby.preset_config("llama-1b", tmp_path, 64, snapshots=False)
    assert cfg["model"]["d_model"] == 2048 and cfg["steps"] == 2 and cfg["checkpoint_every"] == 0
    assert (cfg["data"]["seq_len"], cfg["data"]["micro_batch_size"], cfg["data"]["global_batch_size"]) == (
        64,
        1,
        1,
    )
    assert cfg["integrity"]["snapshot_every"] == 0
    default = Protections().snapshot_every
    assert standby.preset_config("llama-1b", tmp_path, 64)["integrity"]["snapshot_every"] == default


def test_an_unknown_preset_is_a_usage_error():
    r = runner.invoke(app, ["standby", "--preset", "gpt5"])
    assert r.exit_code == 2
    assert "--preset gpt5: unknown preset" in r.output and "tiny, gpt2-124m, llama-1b" in r.output


def test_a_tiny_run_reports_both_kinds_of_standby(tmp_path: Path):
    out = tmp_path / "standby.json"
    r = runner.invoke(
        app, ["standby", "--preset", "tiny", "--json", "--out", str(out), "--work-dir", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["command"] == f"stanchion bench standby --preset tiny --json --out {out}"
    tiny = d["results"]["presets"]["tiny"]
    assert tiny["snapshots"] is True and tiny["params"] > 0
    for mode in ("cold", "warm"):
        m = tiny[mode]
        assert set(m) == {
            "ready_s",
            "assignment_to_started_s",
            "assignment_to_first_step_s",
            "first_step_s",
            "second_step_s",
        }
        assert 0 < m["assignment_to_started_s"] < m["assignment_to_first_step_s"]
    # The warm standby really used the model it built while it waited.
    (warm_log,) = list(tmp_path.glob("standby-*/tiny-warm-*/output.log"))
    assert "using the model built before the assignment" in warm_log.read_text()
