"""`stanchion bench`: the pure helpers (medians, ratios, step classes, FLOP accounting, run plans,
the JSON envelope) and one real `bench integrity --quick` run that checks the JSON's shape.

No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnostics.bench import common, integrity
from diagnostics.bench import trainer as trainer_bench
from diagnostics.bench.common import Cadence, Run
from diagnostics.commands.bench import app, command_line
from stanchion.sdk.protections import Protections
from trainer.config import replace, resolve

runner = CliRunner()


# ---- statistics -----------------------------------------------------------------------------


def test_median_ratio_and_relative_change() -> None:
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        common.median([])
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(1.0, 0.0) is None
    assert common.ratio(None, 2.0) is None
    assert common.relative_change(1.03, 1.0) == pytest.approx(0.03)
    assert common.relative_change(1.0, None) is None


def test_summary_and_p10() -> None:
    assert common.summary([2.0, 9.0, 1.0]) == {
        "median": 2.0,
        "p10": pytest.approx(1.2),
        "min": 1.0,
        "max": 9.0,
        "n": 3,
    }
    assert common.p10([float(x) for x in range(1, 12)]) == pytest.approx(2.0)
    assert common.p10([5.0]) == 5.0


def test_stratified_mean_charges_rare_steps_their_share() -> None:
    # 19 ordinary steps (one a 50x outlier from a noisy neighbour) and 2 steps with an audit.
    by_class = {(): [1.0] * 18 + [50.0], ("audit",): [2.0, 2.2]}
    assert common.stratified_mean(by_class) == pytest.approx((19 * 1.0 + 2 * 2.1) / 21)
    assert common.stratified_mean({(): [1.0, 2.0, 30.0]}) == 2.0  # one class: the median


def test_periodic_overhead_is_relative_to_the_same_runs_ordinary_steps() -> None:
    by_class = {(): [1.0] * 18, ("fingerprint",): [1.5, 1.5]}
    assert common.periodic_overhead(by_class) == pytest.approx(2 * 0.5 / (20 * 1.0))
    assert common.periodic_overhead({(): [1.0, 1.0]}) == 0.0
    assert common.periodic_overhead({("fingerprint",): [1.0]}) is None  # K=1: no ordinary step


def test_sig_rounds_floats_in_nested_json() -> None:
    assert common.sig({"a": [1.234567, 2], "b": {"c": 0.000123456}, "d": "x"}) == {
        "a": [1.235, 2],
        "b": {"c": 0.0001235},
        "d": "x",
    }
    assert math.isnan(common.sig(float("nan")))


def test_interleaved_flips_the_order_every_round() -> None:
    assert common.interleaved(["a", "b", "c"], 3) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
    ]


# ---- step classes ---------------------------------------------------------------------------


def test_cadence_follows_the_trainers_rules() -> None:
    c = Cadence(fingerprint_every=20, audit_every=40, snapshot_every=20)
    assert c.due(19) == ()
    assert c.due(20) == ("fingerprint", "snapshot")
    assert c.due(40) == ("fingerprint", "audit", "snapshot")
    # A snapshot is taken only where a fingerprint check ran.
    assert Cadence(fingerprint_every=0, snapshot_every=20).due(20) == ()
    assert Cadence(fingerprint_every=10, snapshot_every=20).due(10) == ("fingerprint",)


def test_cadence_of_a_config() -> None:
    cfg = resolve("tiny")
    d = Protections()
    assert Cadence.of(cfg, 2) == Cadence(d.fingerprint_every, d.audit_every, d.snapshot_every)
    assert Cadence.of(cfg, 1).audit_every == 0  # the audit needs a neighbour
    assert Cadence.of(replace(cfg, parallel="fsdp"), 2).audit_every == 0  # no whole local gradient


def test_step_time_stats_pool_runs_and_classes() -> None:
    cadence = Cadence(fingerprint_every=4)
    runs = [
        Run("a", 0, ["x"], {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0}, wall_s=10.0),
        Run("a", 1, ["x"], {1: 1.2, 2: 1.2, 3: 1.2, 4: 2.4}, wall_s=11.0),
    ]
    stats = common.step_time_stats(runs, cadence)
    assert stats["steps_measured"] == 8
    assert stats["step_time_s"]["median"] == pytest.approx(1.2)
    assert stats["step_time_s"]["amortized"] == pytest.approx((6 * 1.1 + 2 * 2.2) / 8)
    assert stats["due"] == {"fingerprint": {"steps": 2, "median_s": pytest.approx(2.2)}}
    assert stats["overhead_within_run"] == pytest.approx(0.25)  # each run: 1 of 4 steps twice as long
    assert [r["round"] for r in stats["runs"]] == [0, 1]


def test_paired_ratios_compare_runs_of_the_same_round() -> None:
    base = [Run("b", 0, [], {1: 1.0}, 1.0), Run("b", 1, [], {1: 2.0}, 1.0)]
    runs = [Run("a", 1, [], {1: 3.0}, 1.0), Run("a", 0, [], {1: 1.1}, 1.0), Run("a", 2, [], {1: 1.0}, 1.0)]
    assert common.paired_ratios(runs, base) == [1.5, pytest.approx(1.1), None]


def test_read_step_times_drops_warmup_and_keeps_the_newest_record(tmp_path: Path) -> None:
    progress = tmp_path / "ranks" / "rank-00000" / "progress.jsonl"
    progress.parent.mkdir(parents=True)
    records = [{"step": s, "step_time_s": 0.1 * s} for s in (1, 2, 3, 4)] + [{"step": 4, "step_time_s": 9.0}]
    progress.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert common.read_step_times(tmp_path, warmup=2) == {3: pytest.approx(0.3), 4: 9.0}
    assert common.read_step_times(tmp_path / "missing", warmup=0) == {}


def test_read_step_times_skips_a_torn_last_line_and_a_damaged_record(tmp_path: Path) -> None:
    """A rank killed mid-write leaves an unterminated last line: the kernel's rule, not a crash."""
    progress = tmp_path / "ranks" / "rank-00000" / "progress.jsonl"
    progress.parent.mkdir(parents=True)
    progress.write_text(
        '{"step": 1, "step_time_s": 0.5}\nnot json\n{"step": 2, "step_time_s": 0.25}\n{"step": 3, "st'
    )
    assert common.read_step_times(tmp_path, warmup=0) == {1: 0.5, 2: 0.25}


# ---- FLOP accounting ------------------------------------------------------------------------


def test_flop_utilization() -> None:
    assert trainer_bench.model_flops_per_s(7e6, 1000.0) == 7e9
    assert trainer_bench.flop_utilization(7e6, 1000.0, 14e9) == pytest.approx(0.5)
    assert trainer_bench.flop_utilization(7e6, 1000.0, 0.0) is None


def test_flops_per_token_is_the_models_own() -> None:
    from trainer.model import GPT

    cfg = resolve("tiny")
    fpt, params = trainer_bench.flops_per_token(cfg, vocab_size=512)  # vocab 0 in the preset: from the data
    model = GPT(replace(cfg.model, vocab_size=512))
    assert fpt == model.flops_per_token(cfg.data.seq_len)
    assert params == model.num_params(non_embedding=False)


def test_matmul_flops_counts_two_n_cubed() -> None:
    mm = trainer_bench.matmul_flops(32, threads=1, repeats=2)
    assert mm["flops_per_s"] == pytest.approx(2 * 32**3 / mm["seconds"])
    assert (mm["n"], mm["threads"], mm["dtype"]) == (32, 1, "float32")


# ---- run plans ------------------------------------------------------------------------------


def test_gpt2_is_reduced_on_a_cpu_and_says_so(tmp_path: Path) -> None:
    plan = trainer_bench.trainer_plan("gpt2-124m", data=tmp_path, steps=None, nproc=2, cuda=False)
    assert plan.sets["data.micro_batch_size"] == 1
    assert plan.sets["data.global_batch_size"] == 2
    assert plan.sets["data.seq_len"] == 256
    assert plan.sets["optim.warmup_steps"] == plan.steps == 20
    assert any("reduced for CPU" in n for n in plan.notes)
    cfg = common.resolve_flags(plan.flags)  # the trainer's own parser accepts the flags
    assert cfg.check_world(2) == 1
    assert cfg.checkpoint_every == 0


def test_tiny_keeps_its_batch_unless_it_cannot_divide(tmp_path: Path) -> None:
    plan = trainer_bench.trainer_plan("tiny", data=tmp_path, steps=None, nproc=2, cuda=False)
    assert "data.global_batch_size" not in plan.sets and plan.steps == 100 and plan.warmup == 5
    plan3 = trainer_bench.trainer_plan("tiny", data=tmp_path, steps=30, nproc=3, cuda=False)
    assert plan3.sets["data.global_batch_size"] == 24
    assert common.resolve_flags(plan3.flags).check_world(3) == 1


def test_the_sharded_layouts_are_set_on_both_sides_and_said(tmp_path: Path) -> None:
    fsdp = trainer_bench.trainer_plan(
        "gpt2-124m", data=tmp_path, steps=None, nproc=2, cuda=False, parallel="fsdp"
    )
    cfg = common.resolve_flags(fsdp.flags)
    assert (cfg.parallel, cfg.hsdp_replicate) == ("fsdp", 1)
    assert any("the baseline is plain FSDP2" in n for n in fsdp.notes)
    hsdp = trainer_bench.trainer_plan(
        "gpt2-124m", data=tmp_path, steps=None, nproc=4, cuda=False, parallel="hsdp"
    )
    cfg = common.resolve_flags(hsdp.flags)
    assert (cfg.parallel, cfg.hsdp_replicate) == ("fsdp", 2)
    cfg.check_world(4)  # 2 replica groups of 2 shards
    ddp = trainer_bench.trainer_plan("gpt2-124m", data=tmp_path, steps=None, nproc=2, cuda=False)
    assert "parallel" not in ddp.sets and not any("baseline is plain" in n for n in ddp.notes)
    with pytest.raises(ValueError, match="--parallel hsdp needs an even --nproc"):
        trainer_bench.trainer_plan("tiny", data=tmp_path, steps=None, nproc=3, cuda=False, parallel="hsdp")
    with pytest.raises(ValueError, match="choose one of ddp, fsdp, hsdp"):
        trainer_bench.trainer_plan("tiny", data=tmp_path, steps=None, nproc=2, cuda=False, parallel="tp")


def test_a_gpu_runs_the_preset_in_bf16(tmp_path: Path) -> None:
    plan = trainer_bench.trainer_plan("gpt2-124m", data=tmp_path, steps=None, nproc=8, cuda=True)
    assert plan.sets["precision"] == "bf16"
    assert "data.micro_batch_size" not in plan.sets and "data.seq_len" not in plan.sets
    assert common.resolve_flags(plan.flags).precision == "bf16"


def test_protection_settings_use_the_integrity_defaults() -> None:
    d = Protections()
    s = integrity.protection_settings()
    assert s["all_defaults"] == {
        "integrity.fingerprint_every": d.fingerprint_every,
        "integrity.audit_every": d.audit_every,
        "integrity.snapshot_every": d.snapshot_every,
        "integrity.startup_check": d.startup_check,
    }
    assert s["baseline"]["integrity.startup_check"] is False
    assert not any(v for k, v in s["baseline"].items() if k != "integrity.startup_check")
    assert s["fingerprint_k1"]["integrity.fingerprint_every"] == 1
    # Snapshots are only taken after a fingerprint check, so they are measured with one.
    assert s["snapshots_default"]["integrity.fingerprint_every"] == d.fingerprint_every


def test_cadence_advice_names_the_dominant_protection() -> None:
    assert integrity.cadence_advice({"audit": 0.02}, 0.03) is None
    advice = integrity.cadence_advice({"fingerprint": 0.005, "audit": 0.07, "snapshot": 0.005}, 0.08)
    assert advice is not None and advice["dominant"] == "audit"
    # 0.07 at the default M = 80 must fit in 0.05 - 0.01: M = ceil(80 * 0.07 / 0.04) = 140.
    assert Protections().audit_every == 80
    assert advice["suggested"] == {"integrity.audit_every": 140}
    snap = integrity.cadence_advice({"fingerprint": 0.0, "audit": 0.0, "snapshot": 0.08}, 0.08)
    assert snap["suggested"]["integrity.snapshot_every"] % Protections().fingerprint_every == 0


# ---- output ---------------------------------------------------------------------------------


def test_command_line_renders_what_was_given() -> None:
    assert command_line(
        "bench trainer",
        [
            ("--preset", ["tiny", "gpt2-124m"]),
            ("--steps", None),
            ("--json", True),
            ("--quick", False),
            ("--out", Path("a b.json")),
        ],
    ) == ("stanchion bench trainer --preset tiny --preset gpt2-124m --json --out 'a b.json'")


def test_envelope_shape() -> None:
    env = common.envelope(
        "x",
        "stanchion bench x",
        {"k": 1},
        {"v": 1.23456789},
        goals=[common.goal("g", 0.5, "<= 1", True, "how")],
        notes=["n"],
    )
    assert set(env) == {
        "benchmark",
        "command",
        "machine",
        "source",
        "finished_at",
        "settings",
        "results",
        "goals",
        "notes",
    }
    assert env["results"] == {"v": 1.235}
    assert {"cpu_model", "logical_cores", "torch", "load_average_1_5_15"} <= set(env["machine"])
    assert set(env["machine"]["load_average_1_5_15"]) == {"at_start", "at_end"}
    assert env["goals"][0] == {"goal": "g", "value": 0.5, "target": "<= 1", "met": True, "how": "how"}
    json.dumps(env)


def test_envelope_copies_the_headline_results_to_the_top_level() -> None:
    env = common.envelope(
        "x", "c", {}, {"ettr": 0.912345, "steps": 200, "other": 1}, headline=("ettr", "steps")
    )
    assert (env["ettr"], env["steps"]) == (0.9123, 200) == (env["results"]["ettr"], env["results"]["steps"])
    assert "other" not in env
    with pytest.raises(KeyError, match="headline keys missing from the x results: lost_steps"):
        common.envelope("x", "c", {}, {"ettr": 1.0}, headline=("ettr", "lost_steps"))


def test_unknown_protection_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("{}")  # checked for before anything runs
    result = runner.invoke(
        app,
        [
            "integrity",
            "--quick",
            "--protection",
            "nope",
            "--data",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "w"),
            "--tensor-mb",
            "1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "unknown protection configuration(s): nope" in result.stderr


def test_bad_data_and_a_single_rank_are_usage_errors(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["integrity", "--quick", "--data", str(tmp_path), "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 2 and "not a prepared data directory" in result.stderr
    result = runner.invoke(app, ["integrity", "--quick", "--nproc", "1", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "--nproc must be at least 2" in result.stderr


def test_a_layout_the_trainer_bench_cannot_run_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["trainer", "--parallel", "tp", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "--parallel 'tp': expected one of ddp, fsdp, hsdp" in result.stderr
    result = runner.invoke(app, ["trainer", "--parallel", "hsdp", "--nproc", "3", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "--parallel hsdp: --nproc 3 is odd" in result.stderr


@pytest.mark.slow
def test_bench_trainer_beside_plain_fsdp2_trains_the_same_model_on_the_same_batches(
    small_data: Path, tmp_path: Path
) -> None:
    """One round of tiny, 6 steps, both sides sharded with FSDP2, and Stanchion with its
    protections off (--attribute; ~60 s): the JSON names the baseline and carries its ratio and goal
    and the attribution, and the plain loop's first loss (the mean of its ranks' losses, as the
    trainer records it) is the trainer's, to the bit: the same weights, batches and sharding, before
    any update."""
    out = tmp_path / "trainer-fsdp.json"
    work = tmp_path / "work"
    args = [
        "trainer",
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--rounds",
        "1",
        "--parallel",
        "fsdp",
        "--attribute",
    ]
    args += ["--data", str(small_data), "--work-dir", str(work), "--json", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["settings"]["parallel"] == "fsdp" and "--parallel fsdp" in data["command"]
    entry = data["results"]["presets"]["tiny"]
    assert entry["config"]["sets"]["parallel"] == "fsdp"
    assert entry["fsdp"]["steps_measured"] == entry["stanchion"]["steps_measured"] > 0
    vs = entry["stanchion_vs_fsdp"]
    assert vs["step_time_ratio_median"] > 0 and len(vs["step_time_ratio_per_round"]) == 1
    [g] = data["goals"]
    assert (
        g["goal"].startswith("tiny: Stanchion ÷ plain FSDP2")
        and g["value"] == vs["step_time_ratio_median_of_rounds"]
    )

    def first_loss(system: str, rank: int) -> float:
        [path] = work.glob(f"trainer-*/tiny/{system}-r0/ranks/rank-{rank:05d}/progress.jsonl")
        record = json.loads(path.read_text().splitlines()[0])
        assert record["step"] == 1
        return record["loss"]

    assert sum([first_loss("fsdp", 0), first_loss("fsdp", 1)]) / 2 == first_loss("stanchion", 0)
    # the third system: the same trainer with the protections off, in the same round
    assert first_loss("stanchion-off", 0) == first_loss("stanchion", 0)
    off = entry["stanchion-off"]
    assert off["due"] == {} and entry["stanchion"]["due"] != {}  # nothing due with them off
    a = entry["attribution"]
    assert a["protections_off"]["integrity.fingerprint_every"] == 0
    s, f, o = (entry[x]["runs"][0]["median_step_time_s"] for x in ("stanchion", "fsdp", "stanchion-off"))
    assert a["off_vs_fsdp_per_round"] == [pytest.approx(o / f, rel=1e-3)]  # the JSON keeps 4 digits
    assert a["defaults_vs_off_per_round"] == [pytest.approx(s / o, rel=1e-3)]
    assert data["settings"]["attribute"] is True and "--attribute" in data["command"]


@pytest.mark.slow
def test_integrity_quick_writes_the_documented_json(small_data: Path, tmp_path: Path) -> None:
    """Two real 2-rank trainer runs of a small model and an 8 MiB checksum pass (~20 s)."""
    out = tmp_path / "integrity.json"
    result = runner.invoke(
        app,
        [
            "integrity",
            "--quick",
            "--json",
            "--data",
            str(small_data),
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    assert data["benchmark"] == "integrity"
    assert data["command"].startswith("stanchion bench integrity --quick")
    rates = data["results"]["throughput"]["gb_per_s"]
    assert set(rates) == {
        "fingerprint_1_thread",
        "fingerprint_2_threads",
        "memcpy_1_thread",
        "memcpy_2_threads",
        "zlib_crc32_1_thread",
        "sha256_1_thread",
    }
    assert all(v["gb_per_s"] > 0 for v in rates.values())
    configs = data["results"]["protections"]["configs"]
    assert set(configs) == {"baseline", "all_defaults"}
    for c in configs.values():
        assert {"median", "p10", "amortized", "min", "max", "n"} <= set(c["step_time_s"])
        assert {
            "overhead_median",
            "overhead_amortized",
            "overhead_p10",
            "overhead_within_run",
            "overhead_per_round",
            "overhead_median_of_rounds",
            "runs",
            "sets",
        } <= set(c)
        assert c["steps_measured"] == 5  # 6 steps, the first dropped as warm-up
    assert [g["met"] for g in data["goals"]] == [None, None]  # --quick measures nothing
    assert "running baseline round 0" in result.stderr


def test_the_baseline_worker_runs_through_the_bench_packages_main() -> None:
    """torchrun starts the baseline as `-m diagnostics.bench baseline-worker` (diagnostics/bench/__main__.py),
    the command line the recorded JSON shows; without a worker name the entry point prints its usage."""
    cmd = trainer_bench.baseline_command(["--steps", "5"], Path("RUN"), 2)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    i = cmd.index("-m", 3)
    assert cmd[i + 1 : i + 5] == ["diagnostics.bench", "baseline-worker", "--run-dir", "RUN"]
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "diagnostics.bench"], capture_output=True, text=True, cwd=repo
    )
    assert out.returncode == 2
    assert "baseline-worker" in out.stderr and "coordinator-client" in out.stderr
