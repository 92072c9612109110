"""`stanchion bench recovery|goodput|report`: the pure helpers (what a kill cost, ETTR, lost steps,
schedules, the markdown and figures), and one end-to-end run of `bench report` on synthetic JSON.

No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from diagnostics.bench import goodput as gp
from diagnostics.bench import recovery as rc
from diagnostics.bench import report as rp
from diagnostics.commands.bench import app
from stanchion.vocab import EventKind

runner = CliRunner()


# ---- recovery: what a kill cost ---------------------------------------------------------------


def rec(t: float, step: int, rank: int = 0, gen: int = 1, **kw: object) -> dict:
    return {"t": t, "step": step, "rank": rank, "generation": gen, "step_time_s": 0.1, **kw}


def ev(name: str, t: float, rank: int = 0, gen: int = 1, **kw: object) -> dict:
    return {"event": name, "t": t, "rank": rank, "generation": gen, **kw}


def test_newest_step_before_counts_any_rank_up_to_the_time() -> None:
    records = [rec(1.0, 1), rec(1.1, 1, rank=1), rec(2.0, 2), rec(3.0, 3, rank=1)]
    assert rc.newest_step_before(records, 2.5) == 2
    assert rc.newest_step_before(records, 3.0) == 3
    assert rc.newest_step_before(records, 0.5) == 0


def test_newest_step_before_is_where_the_run_stood_after_a_rollback() -> None:
    # Both ranks reached step 30, were sent back to 20 and are at 24 again: a fault now can lose
    # at most the 4 steps since, never the 10 computed before the rollback.
    records = [rec(1.0, 30), rec(1.01, 30, rank=1)]
    records += [rec(2.0 + i, 21 + i) for i in range(4)] + [rec(2.01 + i, 21 + i, rank=1) for i in range(4)]
    assert rc.newest_step_before(records, 1.5) == 30
    assert rc.newest_step_before(records, 5.5) == 24
    assert rc.newest_step_before(records, 5.005) == 24  # rank 0 is one record ahead of rank 1


def test_stanchion_recovery_is_the_first_record_of_a_newer_generation() -> None:
    progress = [rec(1.0, 24), rec(1.01, 24, rank=1), rec(2.0, 25), rec(2.01, 25, rank=1)]
    # Kill at 2.5; rank 0 of the old generation never finishes step 26; generation 2 heals at 25.
    progress += [rec(3.2, 26, gen=2), rec(3.21, 26, rank=1, gen=2), rec(3.5, 27, gen=2)]
    events = [
        ev(EventKind.COLLECTIVE_FAILED, 2.9),
        ev(EventKind.HEALED, 3.0, gen=2, step=25),
        ev(EventKind.HEALED, 3.0, rank=1, gen=2, step=25),
        ev(EventKind.STARTED, 3.05, gen=2, resumed_step=25),
        ev(EventKind.STARTED, 3.06, rank=1, gen=2, resumed_step=25),
    ]
    r = rc.measure_recovery(progress, events, 2.5, old_generation=1)
    assert r.recovery_s == pytest.approx(0.7)
    assert r.lost_steps == 0 and r.steps_before == 25 and r.resume_step == 25
    assert r.resume_source == "peer" and r.generation == 2
    d = r.as_dict(system="stanchion")
    assert d["restarted_s"] == pytest.approx(0.55) and d["first_step_s"] == pytest.approx(0.7)
    assert d["system"] == "stanchion"


def test_stanchion_recovery_follows_the_generation_that_trained_after_an_abandoned_one() -> None:
    progress = [rec(1.0, 10), rec(5.0, 11, gen=3)]
    events = [
        ev(EventKind.STARTED, 2.0, gen=2, resumed_step=10),
        ev(EventKind.STARTED, 4.0, gen=3, resumed_step=10),
    ]
    r = rc.measure_recovery(progress, events, 1.5, old_generation=1)
    assert r.generation == 3 and r.restarted_t == 4.0 and r.first_step_t == 5.0


def test_torchrun_recovery_skips_a_straggler_and_later_restarts() -> None:
    # Kill at 10.0 after step 25; the survivor still logs step 26 at 10.05 before torchrun stops it.
    progress = [rec(9.9, 25), rec(9.91, 25, rank=1), rec(10.05, 26)]
    events = [
        ev(EventKind.RESTORED, 13.9, gen=0, step=20, reason="resume: checkpoint"),
        ev(EventKind.STARTED, 14.0, gen=0, resumed_step=20),
        ev(EventKind.STARTED, 14.01, rank=1, gen=0, resumed_step=20),
        # a second kill's restart, later: not part of this recovery
        ev(EventKind.STARTED, 30.0, gen=0, resumed_step=40),
        ev(EventKind.STARTED, 30.0, rank=1, gen=0, resumed_step=40),
    ]
    progress += [rec(14.5, 21, gen=0), rec(14.51, 21, rank=1, gen=0)]
    r = rc.measure_recovery(progress, events, 10.0)
    assert r.first_step_t == 14.5 and r.restarted_t == 14.0
    assert r.resume_step == 20 and r.resume_source == "checkpoint"
    assert r.resume_reason == "resume: checkpoint"  # the ranks' own words, carried into the row
    # Steps completed before the kill minus the checkpoint step: the straggler step 26 came after it.
    assert r.steps_before == 25 and r.lost_steps == 5


def test_no_recovery_seen_is_reported_as_none() -> None:
    r = rc.measure_recovery([rec(1.0, 5)], [], 2.0, old_generation=1)
    assert r.recovery_s is None and r.lost_steps is None and r.resume_source == "none"


def test_summarize_trials_takes_medians_of_the_measured_trials() -> None:
    trials = [
        {"system": "a", "recovery_s": 1.0, "lost_steps": 0, "detected_s": 0.1, "restarted_s": 0.5},
        {"system": "a", "recovery_s": 3.0, "lost_steps": 2, "detected_s": 0.3, "restarted_s": 0.7},
        {"system": "a", "recovery_s": 2.0, "lost_steps": 0, "detected_s": None, "restarted_s": 0.6},
        {"system": "a", "recovery_s": None, "lost_steps": None},
        {"system": "b", "recovery_s": 9.0, "lost_steps": 5},
    ]
    s = rc.summarize_trials(trials, "a")
    assert (s["trials"], s["measured"]) == (4, 3)
    assert s["recovery_s"] == 2.0 and s["recovery_s_min"] == 1.0 and s["recovery_s_max"] == 3.0
    assert s["lost_steps"] == 0 and s["lost_steps_max"] == 2
    assert s["first_step_s_phases"] == {"detected_s": pytest.approx(0.2), "restarted_s": 0.6}
    assert rc.summarize_trials(trials, "c")["recovery_s"] is None


def test_first_decision_after_matches_words_after_the_time() -> None:
    ds = [
        SimpleNamespace(time=1.0, reason="rank 1 crashed: signal SIGKILL"),
        SimpleNamespace(time=3.0, reason="checkpoint at step 20 is good"),
        SimpleNamespace(time=4.0, reason="rank 0 on node-0 hung: killed by the agent"),
        SimpleNamespace(time=2.5, reason="rank 1 crashed: exit 1"),
    ]
    assert rc.first_decision_after(ds, 2.0, ("crashed",)).time == 2.5
    assert rc.first_decision_after(ds, 2.0, ("hung",)).time == 4.0
    assert rc.first_decision_after(ds, 5.0, ("crashed",)) is None


def test_torchrun_detection_is_read_from_its_log() -> None:
    import datetime

    kill = datetime.datetime(2026, 11, 27, 13, 24, 28).timestamp()
    log = (
        "I1127 13:20:00.000000 1 api.py:1] starting\n"
        "W1127 13:24:28.243000 20394 api.py:1028] Sending process 20411 closing signal SIGTERM\n"
        "E1127 13:24:28.277000 20394 api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 20412) of binary\n"
    )
    assert rc.torchrun_detected_t(log, kill) - kill == pytest.approx(0.277, abs=1e-3)
    assert rc.torchrun_detected_t(log, kill + 60) is None
    assert rc.torchrun_detected_t("nothing here", kill) is None


def test_both_sides_train_the_same_configuration() -> None:
    """The Stanchion job spec and the torchrun flags resolve to the same trainer config."""
    from coordinator.jobspec import parse as load_spec
    from diagnostics.bench.common import resolve_flags
    from trainer.config import replace

    for model in rc.MODELS:
        sets = rc.model_sets(model)
        flags = rc.trainer_args(Path("/data/x"), steps=60, checkpoint_every=20, sets=sets)
        spec = load_spec(rc.job_spec("j", "x", steps=60, checkpoint_every=20, sets=sets))
        from_spec = spec.train_config()
        from_flags = resolve_flags(flags)
        assert replace(from_spec, data=replace(from_spec.data, path="")) == replace(
            from_flags, data=replace(from_flags.data, path="")
        ), model
    assert rc.model_sets("tiny") == {}
    small = rc.nested(rc.model_sets("small"))
    assert small["model"]["n_layer"] == 2 and small["integrity"]["spike_loss_z"] == 1e9
    medium = rc.nested(rc.model_sets("medium"))
    assert medium["data"] == {"micro_batch_size": 2, "global_batch_size": 4} and "model" not in medium
    with pytest.raises(ValueError):
        rc.model_sets("huge")


def test_torchrun_command_sets_restarts_and_keeps_the_trainer_flags() -> None:
    cmd = rc.torchrun_command(["--steps", "5"], Path("R"), max_restarts=7)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[cmd.index("--max-restarts") + 1] == "7"
    assert cmd[-4:] == ["--run-dir", "R", "--steps", "5"]
    assert rc.TORCHRUN_ENV == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_tail_reads_new_records_of_files_that_appear(tmp_path: Path) -> None:
    a = tmp_path / "workers" / "n0" / "w0" / "progress.jsonl"
    a.parent.mkdir(parents=True)
    a.write_text(json.dumps({"t": 2.0, "step": 1}) + "\n")
    tail = rc.Tail(tmp_path, "workers/*/w*/progress.jsonl")
    assert [r["step"] for r in tail.poll()] == [1]
    b = tmp_path / "workers" / "n1" / "w0" / "progress.jsonl"
    b.parent.mkdir(parents=True)
    b.write_text(json.dumps({"t": 1.5, "step": 1}) + "\n")
    with a.open("a") as f:
        f.write(json.dumps({"t": 3.0, "step": 2}) + "\n")
    assert [r["t"] for r in tail.poll()] == [1.5, 3.0]
    assert tail.poll() == [] and len(tail.records) == 3


# ---- goodput ----------------------------------------------------------------------------------


def test_schedules_are_seeded_poisson_with_the_benchmark_mix() -> None:
    s2 = gp.goodput_schedule("S2", 1, 2000)
    assert s2 == gp.goodput_schedule("S2", 1, 2000)
    assert s2 != gp.goodput_schedule("S2", 2, 2000)
    assert {f["kind"] for f in s2} <= set(gp.MIX)
    assert all(0 < gp.fault_step(f) < 1999 for f in s2)
    # Over many seeds the mean count is steps / mean interval and the mix is the one asked for.
    many = [f for seed in range(200) for f in gp.goodput_schedule("S2", seed, 2000)]
    assert len(many) / 200 == pytest.approx(2000 / 200, rel=0.1)
    crash = sum(f["kind"] == "crash" for f in many) / len(many)
    assert crash == pytest.approx(0.70, abs=0.05)
    s1 = gp.goodput_schedule("S1", 1, 6000)
    assert len(s1) < len(gp.goodput_schedule("S2", 1, 6000))
    custom = gp.goodput_schedule("x", 1, 2000, mean_interval=50)
    assert len(custom) > len(s2)


class _FakeCluster:
    """Answers GetJob from a script: an exception is a coordinator that did not answer."""

    agents: dict[str, object] = {}  # no standbys to wait for

    def __init__(self, answers: list[object]):
        self.answers = answers
        self.polls = 0

    def submit(self, spec: str) -> str:
        return "job-1"

    def job(self, job_id: str) -> object:
        assert job_id == "job-1"
        answer = self.answers[min(self.polls, len(self.answers) - 1)]
        self.polls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def _job(state: int, step: int, generation: int = 1) -> SimpleNamespace:
    return SimpleNamespace(state=state, step=step, generation=generation)


def test_a_goodput_job_is_awaited_to_its_end_reporting_every_500_steps() -> None:
    from protos.stanchion.v1 import types_pb2

    running, done = types_pb2.JOB_STATE_RUNNING, types_pb2.JOB_STATE_SUCCEEDED
    end = _job(done, 1300, 2)
    cluster = _FakeCluster(
        [ConnectionError("busy"), _job(running, 600), _job(running, 700), _job(running, 1200, 2), end]
    )
    said: list[str] = []
    job_id, job = gp.run_stanchion_job(cluster, "spec", timeout_s=600, progress=said.append, label="faulted")  # type: ignore[arg-type]
    assert (job_id, job) == ("job-1", end)
    assert said == ["  faulted: step 600, generation 1", "  faulted: step 1200, generation 2"]
    assert cluster.polls == 5


def test_a_goodput_job_that_does_not_end_in_time_is_a_bench_error_naming_it() -> None:
    from protos.stanchion.v1 import types_pb2

    cluster = _FakeCluster([_job(types_pb2.JOB_STATE_RUNNING, 10)])
    with pytest.raises(gp.BenchError, match=r"^clean: timed out after 0s waiting for job job-1 to finish"):
        gp.run_stanchion_job(cluster, "spec", timeout_s=0, progress=lambda _: None, label="clean")  # type: ignore[arg-type]


def test_the_whole_schedule_fires_in_the_trainer_and_a_hang_is_a_stopped_process() -> None:
    faults = [
        {"kind": "crash", "step": 50, "rank": 1},
        {"kind": "slow", "rank": 0, "from_step": 10, "until_step": 30, "delay_s": 0.05},
        {"kind": "hang", "step": 20, "rank": 0},
        {"kind": "bitflip", "step": 40, "rank": 1, "target": "param", "bit": 24},
    ]
    spec = gp.trainer_faults(faults)
    assert spec[2] == {"kind": "freeze", "at": "step", "step": 20, "rank": 0}
    assert spec[:2] == faults[:2] and spec[3] == faults[3]  # positions are the ids in the events
    from stanchion.sdk.faults import parse

    parse(spec)  # the trainer accepts them as a schedule


def test_fired_faults_come_from_the_ranks_events_in_the_order_they_fired() -> None:
    faults = [
        {"kind": "crash", "step": 50, "rank": 1},
        {"kind": "hang", "step": 20, "rank": 0},
        {"kind": "bitflip", "step": 40, "rank": 1, "target": "param", "bit": 24},
        {"kind": "crash", "step": 70, "rank": 0},  # never fired: the job ended first
    ]
    events = [
        ev(EventKind.FAULT_INJECTED, 9.0, rank=1, gen=3, id=0, step=50, fault="crash"),
        ev(EventKind.FAULT_INJECTED, 4.0, rank=0, gen=1, id=1, step=20, fault="freeze"),
        ev(EventKind.FAULT_INJECTED, 6.0, rank=1, gen=2, id=2, step=40, fault="bitflip"),
        ev(EventKind.STARTED, 5.0, gen=2),
    ]
    fired = gp.fired_faults(faults, events)
    assert [(i.fault["kind"], i.step, i.t, i.generation) for i in fired] == [
        ("hang", 19, 4.0, 1),
        ("crash", 49, 9.0, 3),
    ]
    assert fired[0].detail == "rank 0 SIGSTOPped itself in step 20"
    assert fired[1].detail == "rank 1 SIGKILLed itself as step 50 began"


def faulted_run() -> list[dict]:
    """Rank 0 computes steps 1-5, is rolled back to 3 and redoes 4-5 (2 lost); rank 1 likewise."""
    out = []
    t = 10.0
    for step in (1, 2, 3, 4, 5, 4, 5, 6):
        t += 1.0
        for rank in (0, 1):
            out.append(
                {"t": t + rank * 0.01, "step": step, "rank": rank, "step_time_s": 0.5, "loss": float(step)}
            )
    out[-2]["step_time_s"] = 2.0  # a slow last step of rank 0
    return out


def test_final_trajectory_window_lost_steps_and_ettr() -> None:
    recs = faulted_run()
    traj = gp.final_trajectory(recs)
    assert sorted(traj) == [1, 2, 3, 4, 5, 6] and traj[4]["t"] == 16.0
    start, end = gp.training_window(recs, 6)
    assert (start, end) == (10.5, 18.0)
    assert gp.lost_steps(recs, 6) == 2
    assert gp.ettr(6, 0.5, 7.5) == pytest.approx(0.4)
    assert gp.ettr(6, 0.5, 0.0) is None
    assert gp.step_median(recs, 6) == 0.5
    with pytest.raises(ValueError):
        gp.training_window(recs, 7)


def test_effective_time_charges_slow_windows_at_the_median() -> None:
    recs = faulted_run()
    assert gp.effective_time(recs) == pytest.approx(5 * 0.5 + 2.0)
    slow = [{"kind": "slow", "from_step": 5, "until_step": 6, "rank": 0, "delay_s": 1.5}]
    assert gp.effective_time(recs, slow) == pytest.approx(6 * 0.5)
    cost = gp.slow_cost(recs, slow[0], 0.5)
    assert cost["steps"] == 1 and cost["extra_s"] == pytest.approx(1.5)


def test_series_keep_the_final_losses_and_the_shape_of_progress() -> None:
    recs = faulted_run()
    s = gp.loss_series(recs, 10.0)
    assert s["first_step"] == 1 and s["loss"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert s["t_s"][3] == 6.0
    p = gp.progress_series(recs, 10.0, every=100)
    # first, the records around the rollback (5 -> 4), and the last
    assert p["step"] == [1, 5, 4, 6]
    assert p["t_s"][0] == 1.0


def test_a_bit_flip_caught_in_its_own_step_counts_from_that_step() -> None:
    """The trainer records the flip at the end of step S, after S's fingerprint check caught it."""
    recs = [{"t": 10.0 + s, "step": s, "rank": 0, "step_time_s": 0.5} for s in range(18, 21)]
    recs += [{"t": 13.0 + s, "step": s, "rank": 0, "step_time_s": 0.5} for s in range(19, 22)]  # redone
    evs = [
        {"event": EventKind.FINGERPRINT_MISMATCH, "t": 29.9, "step": 20, "rank": 0},
        {
            "event": EventKind.FAULT_INJECTED,
            "fault": "bitflip",
            "t": 29.95,
            "step": 20,
            "rank": 1,
            "tensor": "w",
        },
        {"event": EventKind.ROLLBACK, "t": 30.5, "step": 18, "from_step": 20, "rank": 0},
    ]
    fault = {"kind": "bitflip", "step": 20, "rank": 1, "target": "param", "bit": 24}
    (row,) = gp.internal_recoveries([fault], recs, evs, [], 0.5)
    assert row["detected_by"] == EventKind.FINGERPRINT_MISMATCH and row["detected_step"] == 20
    assert row["detected_s"] == 0.0 and row["injected_t"] == 29.9
    assert row["restarted_s"] == pytest.approx(0.6) and row["recovery_s"] == pytest.approx(2.1)
    assert row["lost_steps"] == 2 and row["resume_step"] == 18
    unfired = dict(fault, step=99)
    (row,) = gp.internal_recoveries([unfired], recs, evs, [], 0.5)
    assert "did not fire" in row["detail"]


def test_confidence_note_scales_with_the_count() -> None:
    assert "low" in gp.confidence_note("S1", 3, 3.0)
    assert "58%" in gp.confidence_note("S1", 3, 3.0)
    assert "none occurred" in gp.confidence_note("S1", 0, 1.5)
    assert "moderate" in gp.confidence_note("S2", 16, 10.0)


# ---- report -----------------------------------------------------------------------------------


def test_figures_are_rounded_half_up_with_trailing_zeros() -> None:
    assert rp.sig_text(0.19, 3) == "0.190"
    assert rp.sig_text(7.085, 3) == "7.09"
    assert rp.sig_text(9.996, 3) == "10.0"
    assert rp.sig_text(123.7, 3) == "124"
    assert rp.fmt(None) == "–" and rp.fmt(True) == "yes"
    assert rp.fmt(-0.5, ".2f") == "−0.50"
    assert rp.pct(0.0494, digits=1) == "+4.9%" and rp.pct(-0.42, digits=0) == "−42%"
    assert rp.params_text(1049728) == "1.05M" and rp.params_text(123689472) == "123.7M"
    assert rp.table(["a", "b"], [[1, 2]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_commentary_says_when_it_was_written_for_another_run() -> None:
    c = rp.Commentary("2026-01-01T00:00:00+0000", "Text.")
    assert c.render({"finished_at": "2026-01-01T00:00:00+0000"}) == ["Text.", ""]
    stale = c.render({"finished_at": "2026-02-02T00:00:00+0000"})
    assert "written for the run" in stale[0] and stale[-2] == "Text."


def test_the_reports_prose_is_its_markdown_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime

    text_dir = Path(rp.__file__).parent / "text"
    assert (text_dir / "intro.md").read_text(encoding="utf-8") == rp.INTRO
    assert rp.INTRO.startswith("# Benchmarks\n")
    assert rp.MODEL_TEXT["tiny"].startswith("the `tiny` preset") and "\n" not in rp.MODEL_TEXT["tiny"]
    commentaries = [p.stem for p in text_dir.glob("*.md") if p.read_text().startswith("<!-- written for:")]
    assert len(commentaries) >= 5
    for name in commentaries:  # the first line names the run: a finished_at stamp
        c = rp.Commentary.load(name)
        datetime.strptime(c.written_for, "%Y-%m-%dT%H:%M:%S%z")
        assert not c.text.startswith("<!--") and c.text.strip()
    monkeypatch.setattr(rp, "prose", lambda name: "No header.\n")
    with pytest.raises(ValueError, match="written for"):
        rp.Commentary.load("anything")


def envelope(benchmark: str, results: dict, settings: dict | None = None, **kw: object) -> dict:
    return {
        "benchmark": benchmark,
        "command": f"stanchion bench {benchmark} --json",
        "finished_at": "2026-11-27T13:00:00+0000",
        "machine": {
            "cpu_model": "X",
            "logical_cores": 2,
            "usable_cores": 2,
            "torch": "t",
            "python": "p",
            "platform": "L",
            "load_average_1_5_15": {"at_start": [1.0, 1, 1], "at_end": [2.0, 2, 2]},
        },
        "source": {"commit": "abcdef1234", "modified_files": 0},
        "settings": settings or {},
        "results": results,
        "goals": kw.get("goals", []),
        "notes": [],
    }


def synthetic_goodput(schedule: str, interval: float) -> dict:
    run = {
        "wall_s": 10.0,
        "ettr": 0.9,
        "ettr_local": 0.92,
        "median_step_s": 0.03,
        "lost_steps": 3,
        "series": {"first_step": 1, "loss": [3.0, 2.0, 1.5], "t_s": [0.1, 0.2, 0.4]},
        "progress": {"t_s": [0.1, 0.2, 0.4], "step": [1, 2, 3]},
    }
    fault = {
        "kind": "crash",
        "rank": 1,
        "scheduled_step": 2,
        "injected_step": 2,
        "at_s": 0.2,
        "detected_s": 0.05,
        "restarted_s": 0.1,
        "first_step_s": 0.2,
        "recovery_s": 0.2,
        "lost_steps": 0,
        "resume_source": "peer",
    }
    results = {
        "schedule": schedule,
        "steps": 3,
        "ettr": 0.9,
        "ettr_fault_free": 0.95,
        "ettr_normalized": 0.95,
        "ettr_local": 0.92,
        "lost_steps": 0,
        "recovery_s": [0.2],
        "crash_recovery_s_median": 0.2,
        "final_matches_golden": True,
        "median_step_s_fault_free": 0.03,
        "faults_scheduled": 1,
        "faults_by_kind": {"crash": 1, "hang": 0},
        "confidence": f"{schedule}: 1 fault",
        "fault_free": dict(run),
        "faulted": {**run, "faults": [fault]},
        "torchrun": {
            **run,
            "faults": [dict(fault, resume_step=0, resume_source="fresh")],
            "recovery_s": [5.0],
            "final_matches_golden": True,
            "command": "torchrun ...",
        },
        "torchrun_ettr": 0.5,
        "torchrun_lost_steps": 2,
    }
    return envelope(
        "goodput",
        results,
        {"mean_interval_steps": interval},
        goals=[{"goal": "g", "value": 0.9, "target": ">= 0.8", "met": True, "how": ""}],
    )


def test_report_end_to_end_on_synthetic_json(tmp_path: Path) -> None:
    """`stanchion bench report`: every section, commands above tables, figures written."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "goodput-S2.json").write_text(json.dumps(synthetic_goodput("S2", 200.0)))
    (bench / "goodput-S1.json").write_text(json.dumps(synthetic_goodput("S1", 2000.0)))
    trial = {
        "round": 0,
        "steps_before": 25,
        "resume_step": 25,
        "resume_source": "peer",
        "lost_steps": 0,
        "detected_s": 0.1,
        "restarted_s": 0.2,
        "first_step_s": 0.3,
        "recovery_s": 0.3,
        "standby_wait_s": 0.0,
        "load_1min": 3.0,
    }
    side = {
        "recovery_s": 0.3,
        "recovery_s_min": 0.3,
        "recovery_s_max": 0.3,
        "lost_steps": 0,
        "lost_steps_max": 0,
        "measured": 1,
        "trials": 1,
        "first_step_s_phases": {"restarted_s": 0.2},
    }
    (bench / "recovery.json").write_text(
        json.dumps(
            envelope(
                "recovery",
                {
                    "stanchion": side,
                    "torchrun": {**side, "recovery_s": 4.0},
                    "ratio": 0.075,
                    "ratio_per_round": [0.075],
                    "final_fingerprints_equal": True,
                    "final_fingerprints": ["f"],
                    "trials": [
                        dict(trial, system="stanchion"),
                        dict(trial, system="torchrun", recovery_s=4.0, first_step_s=4.0),
                    ],
                },
                {
                    "model": "tiny",
                    "data": "/d",
                    "steps": 60,
                    "checkpoint_every": 20,
                    "kill_step": 25,
                    "trials": 1,
                    "torchrun": {"command": "torchrun ..."},
                },
            )
        )
    )
    (bench / "bisect.json").write_text(
        json.dumps(
            {
                "state": "done",
                "suspects": [f"node-{i}" for i in range(8)],
                "faulty": ["node-5"],
                "defective": ["node-5"],
                "cordoned": ["node-5"],
                "rounds": 1,
                "reference": "majority",
                "confidence": 1.0,
                "wall_s": 30.0,
                "reason": "Named node-5.",
                "history": [{"round": 1, "groups": [["node-0"], ["node-5"]], "summary": "s"}],
            }
        )
    )
    (bench / "coordinator.json").write_text(
        json.dumps(
            envelope("coordinator", {"rows": [{"agents": 1000, "p50_ms": 1.5, "p99_ms": 9.0, "failures": 0}]})
        )
    )
    side = {"trials": 3, "time_lost_s_max": 0.2, "lost_steps_max": 0, "agent_served_s": 3.1}
    (bench / "agent-restart.json").write_text(
        json.dumps(
            envelope(
                "agent-restart",
                {
                    "adopted": {**side, "time_lost_s": 0.125, "new_generations": 0, "adopted_s": 3.2},
                    "ranks_die": {**side, "time_lost_s": 4.5, "new_generations": 3, "adopted_s": None},
                    "ratio": 0.125 / 4.5,
                },
                {"steps": 150},
                goals=[{"goal": "no new generation", "value": 0, "target": "== 0", "met": True, "how": ""}],
            )
        )
    )
    out = tmp_path / "docs" / "benchmarks.md"
    result = runner.invoke(app, ["report", "--bench-dir", str(bench), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| adopted (default) | **0.125** | 0.200 | 0 | 0 | 3.10 | 3.20 | 3 |" in text
    assert "| die with the agent | **4.500** | 0.200 | 0 | 3 | 3.10 | – | 3 |" in text
    assert "Adopted / die with the agent: **0.0278** (medians)." in text and "no new generation" in text
    for heading in ("## Recovery", "## Goodput", "## Coordinator", "## Bisection", "## Trainer", "## GPU"):
        assert heading in text
    assert text.index("stanchion bench recovery --json") < text.index("| system | recovery s (median)")
    assert "Not measured yet." in text  # trainer, integrity and GPU have no JSON here
    assert "| 1000 | 1.5 | 9.0 | 0 |" in text
    assert "recovery time = 0.075**" in text and "node-5" in text and "⌈log₂ N⌉" in text
    assert text.index("S1 (1 per 2000)") < text.index("S2 (1 per 200)")
    for png in (
        "recovery-timeline.png",
        "goodput-ettr.png",
        "goodput-loss-S1.png",
        "goodput-timeline-S2.png",
    ):
        assert (bench / png).stat().st_size > 1000, png
        assert f"](../bench/{png})" in text
    assert "\n\n\n" not in text


def test_report_renders_the_recorded_trainer_and_integrity_json(tmp_path: Path) -> None:
    repo_bench = Path(__file__).resolve().parents[2] / "docs" / "bench"
    if not (repo_bench / "trainer.json").exists():
        pytest.skip("no recorded trainer.json")
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("trainer.json", "integrity.json"):
        (bench / name).write_text((repo_bench / name).read_text())
    text, figures = rp.render(bench, tmp_path / "benchmarks.md")
    d = json.loads((bench / "trainer.json").read_text())
    assert f"```\n{d['command']}\n```" in text
    assert "Stanchion ÷ DDP step time" in text and "Checksum throughput" in text
    assert "## Coordinator\n\nNot measured yet." in text
    assert figures == []
    # The protections' rows are labelled with the cadences the run set, read from its JSON.
    configs = json.loads((bench / "integrity.json").read_text())["results"]["protections"]["configs"]
    sets = {name: c["sets"] for name, c in configs.items()}
    for label in (
        f"| fingerprints K = {sets['fingerprint_default']['integrity.fingerprint_every']} |",
        f"| audit M = {sets['audit_default']['integrity.audit_every']} |",
        f"| fingerprints + snapshots every {sets['snapshots_default']['integrity.snapshot_every']} |",
        "| baseline (all off) |",
        "| all defaults (+ start-up check) |",
    ):
        assert label in text, label


def test_bench_group_lists_the_new_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("recovery", "goodput", "agent-restart", "report"):
        assert name in result.output
    bad = runner.invoke(app, ["goodput", "--schedule", "S9"])
    assert bad.exit_code == 2 and "S1 or S2" in bad.output


def test_report_renders_a_chaos_drill_with_its_invariants(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    drill = {
        "command": "stanchion up --chaos 7 --fault-every 8 --steps 2500",
        "finished_at": "2026-12-06T06:00:00+0000",
        "source": {"commit": "abcdef0123", "modified_files": 0},
        "faults_scheduled": 4,
        "faults_fired": 3,
        "faults_by_kind": {"crash": {"scheduled": 3, "fired": 3}, "bitflip": {"scheduled": 1, "fired": 0}},
        "faults_detected": [
            {"kind": "crash", "detected": True},
            {"kind": "crash", "detected": True},
            {"kind": "crash", "detected": False},
            {"kind": "bitflip", "detected": True},
        ],
        "second_faults": {"scheduled": 1, "landed_in_recovery": 1, "landed_after_recovery": 0},
        "steps_completed": 2500,
        "steps_computed": 2510,
        "lost_steps": 10,
        "generations": 9,
        "recovery_seconds": [3.0, 1.0, 2.0],
        "wall_seconds": 100.0,
        "ettr": 0.8,
        "invariants": {
            "job_succeeded": {"ok": True, "detail": "succeeded"},
            "final_state_matches_fault_free": {"ok": False, "detail": "abc != def"},
        },
    }
    (bench / "chaos-drill.json").write_text(json.dumps(drill))
    text, _ = rp.render(bench, tmp_path / "benchmarks.md")
    section = text[text.index("## A long chaos drill") :]
    assert f"```\n{drill['command']}\n```" in section and "commit `abcdef0`" in section
    assert "| crash | 3 | 3 | 2/3 |" in section and "| bitflip | 1 | 0 | 1/1 |" in section
    assert "median 2.00, p90 2.00, max 3.00 over 3" in section
    assert "| job succeeded | **held**: succeeded |" in section
    assert "| final state matches fault free | **broken**: abc != def |" in section


def test_a_figure_whose_code_changed_after_its_commit_is_marked_stale(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    doc = {
        "benchmark": "standby",
        "finished_at": "2026-12-07T03:56:00+0000",
        "source": {"commit": "b42eb6bc196cfc847d5a7fbe9c85867e96d3c8d6", "modified_files": 0},
        "goals": [{"goal": "warm beats cold", "value": 0.5, "target": "< 1", "met": True}],
    }
    (bench / "standby.json").write_text(json.dumps(doc))
    asked = []

    def changes(commit: str, paths) -> list[str] | None:
        asked.append((commit, tuple(paths)))
        return ["stanchion/sdk/guard.py", "trainer/loop.py", "agent/workers.py", "trainer/model.py"]

    rep = rp.Report(bench, tmp_path / "benchmarks.md", changes=changes)
    d = rep.load("standby.json")
    # The benchmark's own code, the code it runs, and the benchmarks' shared helpers, from its commit.
    assert asked == [(doc["source"]["commit"], (*rp.MEASURED_CODE["standby"], "diagnostics/bench/common.py"))]
    assert d["_stale"] == (
        "code it measures changed after commit `b42eb6b`: `stanchion/sdk/guard.py`, `trainer/loop.py`, "
        "`agent/workers.py` and 1 more"
    )
    assert rp.finished_line(d).endswith(f". **Stale:** {d['_stale']}.")
    assert rp.goals_section(rep, {"standby": d})[4].startswith("| standby (stale) | warm beats cold |")

    fresh = rp.Report(bench, tmp_path / "benchmarks.md", changes=lambda c, p: [])
    d = fresh.load("standby.json")
    assert d["_stale"] is None and "Stale" not in rp.finished_line(d)
    assert rp.goals_section(fresh, {"standby": d})[4].startswith("| standby | warm beats cold |")

    unknown = rp.Report(bench, tmp_path / "benchmarks.md", changes=lambda c, p: None)
    assert unknown.load("standby.json")["_stale"] == "git cannot compare commit `b42eb6b` with this tree"
    del doc["source"]
    (bench / "standby.json").write_text(json.dumps(doc))
    assert fresh.load("standby.json")["_stale"] == "the commit it measured is not recorded"


def test_the_code_each_benchmark_measures_exists_and_git_compares_against_it() -> None:
    repo = Path(__file__).resolve().parents[2]
    for kind, paths in rp.MEASURED_CODE.items():
        for path in paths:
            assert (repo / path).exists(), (kind, path)
    head = rp.changed_since("HEAD", ["stanchion"])
    assert isinstance(head, list)  # what the working tree changed since HEAD (nothing on a clean tree)
    assert rp.changed_since("0" * 40, ["stanchion"]) is None  # a commit this clone does not have


def test_goodput_goals_follow_the_faults_that_occurred() -> None:
    def row(kind: str, recovery_s: float | None, lost: int | None) -> dict:
        return {"kind": kind, "recovery_s": recovery_s, "lost_steps": lost}

    faults = [
        row("crash", 0.26, 0),
        row("crash", 0.30, 0),
        row("hang", 0.55, 0),
        row("hang", 0.51, 1),
        row("hang", 0.53, 0),
        row("bitflip", 0.2, 22),
        row("bitflip", 0.2, 2),
        row("bitflip", 0.2, 3),
        row("slow", None, None),
    ]
    results = {
        "schedule": "S2",
        "faulted": {"faults": faults},
        "ettr_normalized": 0.96,
        "ettr_local": 0.94,
        "crash_recovery_s_median": 0.28,
        "torchrun_recovery_s": [3.0, 2.8, 3.2],
        "final_matches_golden": True,
    }
    got = {g["goal"]: (g["value"], g["met"]) for g in gp.goodput_goals(results)}
    assert got == {
        "normalized ETTR >= 0.95 on S2": (0.96, True),
        "time-local ETTR >= 0.95 on S2": (0.94, False),
        "hang recovery <= 1 s (median)": (0.53, True),
        "steps redone per bit flip <= 3 (median)": (3, True),
        "steps lost to crashes and hangs == 0": (1.0, False),
        "crash recovery <= 0.05 x torchrun's (medians, same invocation)": (gp.ratio(0.28, 3.0), False),
        "final state bit-identical to the fault-free run": (1.0, True),
    }
    # no hang, no flip, no torchrun, a schedule without an ETTR goal: those goals are left out
    quiet = {**results, "schedule": "S9", "faulted": {"faults": faults[:2]}, "torchrun_recovery_s": None}
    assert [g["goal"] for g in gp.goodput_goals(quiet)] == [
        "steps lost to crashes and hangs == 0",
        "final state bit-identical to the fault-free run",
    ]


def test_time_lost_to_an_agent_restart_is_the_window_beyond_its_steps_at_the_median_interval() -> None:
    from diagnostics.bench.agent_restart import time_lost

    # rank 0 steps every 0.1 s until the kill at 1.05; then a 0.7 s stall before step 11, then on
    times = [0.1 * i for i in range(11)] + [1.7, 1.8, 1.9, 2.0]
    recs = [{"rank": 0, "step": i, "t": t} for i, t in enumerate(times)]
    recs += [{"rank": 1, "step": i, "t": t + 0.05} for i, t in enumerate(times)]  # ignored: rank 0's
    lost, steps = time_lost(recs, killed_t=1.05, settled_t=1.85)
    # from step 10 (t 1.0) to step 13 (t 1.9): 0.9 s for 3 steps of 0.1 s
    assert steps == 3 and abs(lost - 0.6) < 1e-9
    # no stall: nothing lost
    even = [{"rank": 0, "step": i, "t": 0.1 * i} for i in range(20)]
    lost, steps = time_lost(even, 1.05, 1.5)
    assert steps == 5 and lost < 1e-9  # floating-point sums of 0.1
    # the job ended before the window closed, or too few steps before the kill to know the pace
    assert time_lost(recs, 1.05, 5.0) is None and time_lost(recs, 0.15, 1.0) is None


@pytest.mark.parametrize(
    ("benchmark", "module"),
    [
        ("recovery", "diagnostics/bench/recovery.py"),
        ("goodput", "diagnostics/bench/goodput.py"),
        ("agent-restart", "diagnostics/bench/agent_restart.py"),
    ],
)
def test_a_benchmark_watches_every_module_of_this_repository_it_imports(benchmark: str, module: str) -> None:
    """Its figures go stale when any code they ran changes: the diagnostics modules it imports (the
    local cluster, another benchmark's helpers) must be among the paths the report watches."""
    import ast

    repo = Path(__file__).resolve().parents[2]
    watched = (*rp.MEASURED_CODE[benchmark], *rp.BENCH_COMMON)
    used = set()
    for node in ast.walk(ast.parse((repo / module).read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("diagnostics")
        ):
            base = node.module.replace(".", "/")
            for alias in node.names:  # `from diagnostics.bench import torchft` names a module
                sub = f"{base}/{alias.name}.py"
                used.add(sub if (repo / sub).is_file() else f"{base}.py")
    unwatched = [p for p in sorted(used) if not any(p == w or p.startswith(f"{w}/") for w in watched)]
    assert used and not unwatched, unwatched
