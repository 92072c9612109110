"""`stanchion bench sdk`: its pure helpers (configurations, the worker's command line, the results
and the exact ratio) and its usage errors. No assertion here depends on how fast anything ran; the
real 2-rank run is tests/integration/test_bench_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnostics.bench import sdk
from diagnostics.bench.common import Cadence, Run, envelope, goal
from diagnostics.commands.bench import app
from diagnostics.errors import UsageError
from stanchion.sdk.protections import Protections

runner = CliRunner()


def test_parse_variant_names_a_guarded_configuration() -> None:
    c = sdk.parse_variant("fingerprint_every=10")
    assert c == sdk.Config("guarded fingerprint_every=10", "guarded", (("fingerprint_every", 10),))
    assert c.flags() == ["--mode", "guarded", "--fingerprint-every=10"]
    assert c.slug == "guarded-fingerprint_every=10"
    d = Protections()
    assert c.protections() == {
        "fingerprint_every": 10,
        "audit_every": d.audit_every,
        "snapshot_every": d.snapshot_every,
    }
    off = sdk.parse_variant("fingerprint-every=0, audit_every=0,snapshot_every=0")
    assert off.name == "guarded fingerprint_every=0,audit_every=0,snapshot_every=0"
    assert off.cadence() == Cadence(0, 0, 0)


@pytest.mark.parametrize(
    "text",
    ["", "fingerprint_every", "lr=3", "fingerprint_every=x", "audit_every=-1", "audit_every=1,audit_every=2"],
)
def test_parse_variant_refuses_anything_else(text: str) -> None:
    with pytest.raises(UsageError):
        sdk.parse_variant(text)


def test_configurations_and_their_cadences_follow_the_protections_defaults() -> None:
    configs = sdk.configurations(["fingerprint_every=10"])
    assert [c.name for c in configs] == ["plain", "guarded", "guarded fingerprint_every=10"]
    p = Protections()
    assert sdk.PLAIN.protections() is None and sdk.PLAIN.cadence() == Cadence()
    assert sdk.GUARDED.cadence() == Cadence(p.fingerprint_every, p.audit_every, p.snapshot_every)
    assert sdk.GUARDED.flags() == ["--mode", "guarded"]
    with pytest.raises(UsageError, match="given twice"):
        sdk.configurations(["audit_every=0", "audit_every=0"])


def test_model_size_flags_and_parameter_count() -> None:
    torch = pytest.importorskip("torch")
    from diagnostics.bench.sdk_worker import MlpLM

    size = sdk.ModelSize(dim=8, hidden=16, layers=3, batch_size=4, accum=1)
    assert size.flags() == ["--dim=8", "--hidden=16", "--layers=3", "--batch-size=4", "--accum=1"]
    for s in (size, sdk.ModelSize()):
        with torch.device("meta"):
            model = MlpLM(s.dim, s.hidden, s.layers)
        assert s.params() == sum(p.numel() for p in model.parameters())


def test_sdk_command_runs_the_worker_under_torchrun(tmp_path: Path) -> None:
    cmd = sdk.sdk_command(
        sdk.parse_variant("audit_every=0"), tmp_path, nproc=2, steps=7, size=sdk.ModelSize(), threads=1
    )
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert cmd[7:12] == ["diagnostics.bench", "sdk-worker", "--mode", "guarded", "--audit-every=0"]
    assert cmd[cmd.index("--run-dir") + 1] == str(tmp_path)
    assert "--steps=7" in cmd and "--checkpoint-every=0" in cmd and "--hidden=512" in cmd


def test_worker_batches_are_a_pure_function_of_index_rank_and_micro() -> None:
    pytest.importorskip("torch")
    from diagnostics.bench.sdk_worker import CONTEXT, batch_at

    x, y = batch_at(1, 4, 3, 1, 0)
    assert x.shape == (4, CONTEXT) and y.shape == (4,)
    x2, y2 = batch_at(1, 4, 3, 1, 0)
    assert x.equal(x2) and y.equal(y2)
    assert not batch_at(1, 4, 3, 0, 0)[0].equal(x)  # another rank reads other data


def fake_run(label: str, round_: int, times: list[float]) -> Run:
    return Run(label, round_, ["python", label], {i + 2: t for i, t in enumerate(times)}, 1.0)


def test_summarize_and_the_exact_ratio() -> None:
    configs = sdk.configurations(["fingerprint_every=10"])
    runs = {
        "plain": [fake_run("plain", 0, [0.1, 0.12, 0.11]), fake_run("plain", 1, [0.13, 0.1, 0.1])],
        "guarded": [fake_run("guarded", 0, [0.2, 0.12, 0.125]), fake_run("guarded", 1, [0.11, 0.11, 0.3])],
        "guarded fingerprint_every=10": [
            fake_run("f", 0, [0.105, 0.1, 0.1]),
            fake_run("f", 1, [0.1, 0.101, 0.1]),
        ],
    }
    workers = {"guarded": {"counters": {"fingerprint_mismatches": 0}}}
    results = sdk.summarize(configs, runs, workers)
    assert results["plain_median_s"] == pytest.approx(0.105)
    assert results["guarded_median_s"] == pytest.approx(0.1225)
    assert results["ratio"] == pytest.approx(0.1225 / 0.105)
    assert results["ratio_per_round"] == pytest.approx([0.125 / 0.11, 0.11 / 0.1])
    assert results["ratio_median_of_rounds"] == pytest.approx((0.125 / 0.11 + 1.1) / 2)
    g = results["configs"]["guarded"]
    assert g["counters"] == {"fingerprint_mismatches": 0} and g["mode"] == "guarded"
    assert g["protections"]["fingerprint_every"] == Protections().fingerprint_every
    assert results["configs"]["plain"]["protections"] is None
    assert "vs_plain" not in results["configs"]["plain"]
    assert results["configs"]["guarded fingerprint_every=10"]["vs_plain"]["ratio_median"] == pytest.approx(
        0.1 / 0.105
    )
    goals = [goal(sdk.GOAL_NAME, results["ratio"], "<= 1.03", False, "how")]
    result = sdk.with_exact_ratio(envelope("sdk", "cmd", {}, results, goals, headline=sdk.HEADLINE))
    data = json.loads(json.dumps(result))  # what a reader of the file sees
    assert data["ratio"] == data["guarded_median_s"] / data["plain_median_s"]  # exactly
    assert data["guarded_median_s"] == data["results"]["configs"]["guarded"]["step_time_s"]["median"]
    assert data["plain_median_s"] == data["results"]["configs"]["plain"]["step_time_s"]["median"]
    assert data["results"]["ratio"] == data["ratio"] == data["goals"][0]["value"]
    assert data["goals"][0]["met"] is (data["ratio"] <= sdk.SDK_BUDGET)


def test_the_goal_is_judged_on_the_exact_ratio() -> None:
    results = {
        "plain_median_s": 1.0,
        "guarded_median_s": 1.0301,
        "ratio": 1.0301,
        "configs": {"guarded": {"vs_plain": {"ratio_median": 1.0301}}},
    }
    result = {
        "ratio": 1.0301,
        "results": results,
        "goals": [{"goal": sdk.GOAL_NAME, "value": 1.03, "met": True}],
    }
    sdk.with_exact_ratio(result)
    assert result["goals"][0] == {"goal": sdk.GOAL_NAME, "value": 1.0301, "met": False}


def test_bench_sdk_usage_errors() -> None:
    result = runner.invoke(app, ["sdk", "--variant", "lr=1"])
    assert result.exit_code == 2 and "--variant 'lr=1'" in result.stderr
    result = runner.invoke(app, ["sdk", "--nproc", "1"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["sdk", "--help"])
    assert result.exit_code == 0 and "--variant" in result.stdout and "ratio" in result.stdout


def test_the_worker_the_bench_and_the_command_share_one_default_size() -> None:
    pytest.importorskip("torch")
    import inspect

    from diagnostics.bench.sdk_worker import parser
    from diagnostics.commands.bench import sdk as sdk_command

    args = parser().parse_args(["--mode", "plain", "--run-dir", "x"])
    cli = inspect.signature(sdk_command).parameters
    for key, value in vars(sdk.ModelSize()).items():
        assert getattr(args, key) == value == cli[key].default, key
    assert args.steps == cli["steps"].default


def test_the_report_renders_both_recorded_sdk_runs_with_their_exact_ratio(tmp_path):
    """docs/benchmarks.md's SDK section comes from docs/bench/sdk*.json: each run's table and its
    ratio line, the quotient of the medians the JSON records."""
    import json
    from pathlib import Path

    from diagnostics.bench import report

    bench = Path(__file__).resolve().parents[2] / "docs" / "bench"
    text, _ = report.render(bench, tmp_path / "benchmarks.md")
    section = text.split("## SDK: a user's own loop, guarded beside plain DDP", 1)[1].split("\n## ", 1)[0]
    for name in report.SDK_RUNS:
        d = json.loads((bench / name).read_text())
        r = d["results"]
        assert d["command"] in section
        assert (
            f"= {report.fmt(r['guarded_median_s'], '.4g')} / {report.fmt(r['plain_median_s'], '.4g')} "
            f"= {d['ratio']:.4f}**" in section
        )
        assert d["ratio"] == r["guarded_median_s"] / r["plain_median_s"]
    assert section.count("| plain (DDP) |") == 2
