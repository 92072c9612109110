"""`stanchion bench coordinator`: the pure helpers (percentiles, slices, stall episodes, metrics
parsing, goals, the simulated agent's messages) and one real run with 50 agents over mTLS that
checks the JSON's shape.

No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnostics.bench import coordinator as bc
from diagnostics.commands.bench import app
from diagnostics.errors import CliError

CpuTimes = namedtuple("CpuTimes", "user system idle iowait")


# ---- pure helpers -----------------------------------------------------------------------------


def test_node_ids_and_split() -> None:
    assert bc.node_ids(3) == ["sim-00000", "sim-00001", "sim-00002"]
    assert bc.node_ids(2, start=1000) == ["sim-01000", "sim-01001"]
    parts = bc.split(1001, 3)
    assert [len(p) for p in parts] == [334, 334, 333]
    assert [i for p in parts for i in p] == list(range(1001))  # contiguous, nothing lost or repeated
    assert [len(p) for p in bc.split(2, 4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        bc.split(5, 0)


def test_percentile_interpolates_like_numpy() -> None:
    vals = [float(x) for x in range(1, 101)]  # 1..100
    assert bc.percentile(vals, 50) == pytest.approx(50.5)
    assert bc.percentile(vals, 99) == pytest.approx(99.01)
    assert bc.percentile(vals, 0) == 1.0
    assert bc.percentile(vals, 100) == 100.0
    assert bc.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bc.percentile([], 50)
    with pytest.raises(ValueError):
        bc.percentile([1.0], 101)


def test_distribution() -> None:
    d = bc.distribution([3.0, 1.0, 2.0, 10.0])
    assert d["n"] == 4 and d["p50"] == 2.5 and d["max"] == 10.0 and d["mean"] == 4.0
    empty = bc.distribution([])
    assert empty["n"] == 0 and empty["p99"] is None and empty["max"] is None


def test_merge_counts() -> None:
    assert bc.merge_counts([{"CANCELLED": 2}, {}, {"CANCELLED": 1, "UNAVAILABLE": 4}]) == {
        "CANCELLED": 3,
        "UNAVAILABLE": 4,
    }


def test_stall_episodes_group_slow_heartbeats_sent_close_together() -> None:
    origin = 1000.0
    slow = [(1001.0, 60.0), (1001.1, 300.0), (1001.3, 80.0), (1005.0, 55.0)]
    eps = bc.stall_episodes(slow, origin, gap_s=0.25)
    assert eps == [
        {"at_s": 1.0, "heartbeats": 3, "max_ms": 300.0, "span_s": pytest.approx(0.3)},
        {"at_s": 5.0, "heartbeats": 1, "max_ms": 55.0, "span_s": 0.0},
    ]
    assert bc.stall_episodes([], origin) == []


def test_slice_table_splits_latency_and_cpu_by_slice() -> None:
    origin = 100.0
    # (sent at - origin, latency ms, lateness ms)
    # The first and last slices are open-ended: every sample lands in exactly one slice.
    samples = [(-0.001, 2.0, 0.1), (1.5, 4.0, 0.2), (5.5, 100.0, 30.0), (10.2, 6.0, 0.0)]
    cpu = [
        (100.0, 10.0, 20.0, CpuTimes(0.0, 0.0, 0.0, 0.0)),
        (105.0, 12.5, 22.5, CpuTimes(6.0, 2.0, 2.0, 0.0)),  # 10 s of CPU time in 5 s: 2 cores, 8 s busy
        (110.0, 13.0, 23.0, CpuTimes(8.0, 2.5, 9.5, 0.0)),
    ]
    rows = bc.slice_table(samples, cpu, origin)
    assert [(r["from_s"], r["to_s"], r["heartbeats"]) for r in rows] == [(0.0, 5.0, 2), (5.0, 10.0, 2)]
    first, second = rows
    assert first["p50_ms"] == 3.0 and first["max_ms"] == 4.0
    assert first["coordinator_cores"] == pytest.approx(0.5) and first["client_cores"] == pytest.approx(0.5)
    assert first["machine_busy_cores"] == pytest.approx(1.6)
    assert first["other_cores"] == pytest.approx(0.6)
    assert second["max_ms"] == 100.0 and second["client_lateness_p99_ms"] == pytest.approx(29.7)
    assert second["machine_busy_cores"] == pytest.approx(0.5)


def test_parse_metrics_reads_ages_counter_and_node_states() -> None:
    text = "\n".join(
        [
            "# HELP stanchion_node_heartbeat_age_seconds Seconds since the node's last heartbeat.",
            "# TYPE stanchion_node_heartbeat_age_seconds gauge",
            'stanchion_node_heartbeat_age_seconds{node="sim-00000"} 0.25',
            'stanchion_node_heartbeat_age_seconds{node="sim-00001"} 0.75',
            "# HELP stanchion_nodes Registered nodes by state.",
            "# TYPE stanchion_nodes gauge",
            'stanchion_nodes{state="ready"} 2.0',
            'stanchion_nodes{state="lost"} 0.0',
            "# HELP stanchion_heartbeats_total Agent heartbeats handled.",
            "# TYPE stanchion_heartbeats_total counter",
            "stanchion_heartbeats_total 1234.0",
            "",
        ]
    )
    m = bc.parse_metrics(text)
    assert m["heartbeat_age_s"] == {"sim-00000": 0.25, "sim-00001": 0.75}
    assert m["heartbeats_total"] == 1234.0
    assert m["nodes"] == {"ready": 2.0, "lost": 0.0}
    assert bc.parse_metrics("")["heartbeats_total"] is None


def test_parse_metrics_of_the_real_collector() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from coordinator.config import CoordinatorConfig
    from coordinator.controller import Controller
    from coordinator.metrics import CoordinatorCollector
    from coordinator.store import Store
    from protos.stanchion.v1 import agent_pb2

    clock = [1000.0]
    c = Controller(CoordinatorConfig(insecure=True), Store(":memory:"), clock=lambda: clock[0])
    for i in range(3):
        c._do_register(agent_pb2.RegisterRequest(node_id=f"sim-{i:05d}", inventory=bc.inventory(i, 8)))
    agent = bc.SimAgent(0, 8, 0.0, random.Random(0))
    c._do_heartbeat(agent.request(clock[0]))
    reg = CollectorRegistry(auto_describe=True)
    reg.register(CoordinatorCollector(c, clock=lambda: clock[0] + 2.0))
    m = bc.parse_metrics(generate_latest(reg).decode())
    assert m["heartbeat_age_s"] == {"sim-00000": 2.0, "sim-00001": 2.0, "sim-00002": 2.0}
    assert m["heartbeats_total"] == 1.0
    assert m["nodes"]["ready"] == 3.0 and m["nodes"]["lost"] == 0.0


def test_goals() -> None:
    kw = dict(interval_s=1.0, failures=0, achieved=1000.0, offered=1000.0, lost=0, max_age_s=1.1)
    goals = {g["goal"]: g for g in bc.coordinator_goals(agents=1000, p99_ms=20.0, **kw)}
    assert all(g["met"] for g in goals.values())
    assert goals["heartbeat p99 latency (ms)"]["target"].startswith("< 100 ms")
    bad = {
        g["goal"]: g["met"]
        for g in bc.coordinator_goals(
            agents=500,
            interval_s=1.0,
            p99_ms=150.0,
            failures=3,
            achieved=980.0,
            offered=1000.0,
            lost=1,
            max_age_s=12.0,
        )
    }
    assert not any(bad.values())
    unknown = bc.coordinator_goals(agents=1000, p99_ms=None, **{**kw, "lost": None, "max_age_s": None})
    assert [g["met"] for g in unknown][1:] == [None, True, True, None, None]


def test_plan_points_puts_the_headline_first() -> None:
    assert bc.plan_points([1000, 2000], True, True) == [
        (1000, True),
        (1000, False),
        (2000, True),
        (2000, False),
    ]
    assert bc.plan_points([1000, 2000], True, False) == [(1000, True), (2000, True)]
    assert bc.plan_points([1000], False, True) == [(1000, False)]  # plaintext already


def test_job_spec_is_a_valid_job_over_every_agent() -> None:
    from coordinator import jobspec

    spec = jobspec.parse(bc.job_spec(1000, 8))
    assert spec.nodes == spec.min_nodes == 1000 and spec.workers_per_node == 8
    cfg = spec.train_config()
    assert cfg.check_world(spec.world_size(1000)) == 1  # one micro-step: the global batch divides


def test_the_controllers_lazy_cluster_view_equals_the_eager_one() -> None:
    """coordinator/controller.py builds node views on demand (the benchmark's fix): the view must
    read exactly what building every view up front did."""
    from coordinator.config import CoordinatorConfig
    from coordinator.controller import Controller
    from coordinator.store import Store
    from protos.stanchion.v1 import agent_pb2

    clock = [1000.0]
    c = Controller(CoordinatorConfig(insecure=True), Store(":memory:"), clock=lambda: clock[0])
    for i in range(4):
        c._do_register(agent_pb2.RegisterRequest(node_id=f"sim-{i:05d}", inventory=bc.inventory(i, 1)))
    job = c._do_submit((bc.job_spec(3, 1), ""))
    c._do_cordon(("sim-00003", "test"))
    clock[0] += 2.5
    view = c.cluster(job.job_id)
    busy = {n: job.job_id for n in job.members}
    eager = {nid: rec.view(busy.get(nid, ""), clock[0]) for nid, rec in c.nodes.items()}
    assert len(view) == 4 and list(view) == list(eager)
    assert "sim-00000" in view and "nope" not in view and view.get("nope") is None
    with pytest.raises(KeyError):
        view["nope"]
    assert dict(view) == eager
    assert view["sim-00000"].busy_with == job.job_id and view["sim-00003"].cordoned
    assert view["sim-00001"].heartbeat_age_s == 2.5


# ---- the simulated agent ----------------------------------------------------------------------


def test_sim_agent_messages_pass_the_coordinators_validation() -> None:
    from coordinator.service import validate_heartbeat, validate_inventory
    from protos.stanchion.v1 import agent_pb2, types_pb2

    validate_inventory(bc.inventory(12345, 8))
    agent = bc.SimAgent(7, 8, 1.0, random.Random(1))  # an event on every heartbeat
    first = agent.request(1.0)
    validate_heartbeat(first)
    assert first.node_id == "sim-00007" and len(first.workers) == 8
    assert {w.state for w in first.workers} == {types_pb2.WORKER_STATE_TRAINING}
    assert [w.rank for w in first.workers] == list(range(56, 64))
    assert [e.seq for e in first.events] == [1] and json.loads(first.events[0].detail_json)
    # Unacknowledged events are sent again; delivered ones are not.
    second = agent.request(2.0)
    assert [e.seq for e in second.events] == [1, 2] and second.last_step == first.last_step + 1
    assert agent.replied(agent_pb2.HeartbeatResponse(directives=[agent_pb2.Directive(seq=41)])) == 1
    third = agent.request(3.0)
    assert [e.seq for e in third.events] == [3] and third.acked_directive_seq == 41
    quiet = bc.SimAgent(8, 1, 0.0, random.Random(2)).request(1.0)
    assert not quiet.events and len(quiet.workers) == 1


# ---- waiting for a child's ready file -----------------------------------------------------------


def _child(tmp_path: Path, code: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT), log


def test_wait_for_returns_once_the_file_exists_and_fails_at_once_when_the_child_exits(tmp_path: Path) -> None:
    ready = tmp_path / "client-0.ready"
    proc, log = _child(tmp_path, f"open({str(ready)!r}, 'w').close(); raise SystemExit(0)")
    proc.wait()
    bc._wait_for(ready, proc, log, "client 0", 60.0)  # the file wins over the exit
    proc, log = _child(tmp_path, "print('no such flag'); raise SystemExit(2)")
    proc.wait()
    with pytest.raises(CliError, match=r"^client 1 exited with code 2: no such flag") as e:
        bc._wait_for(tmp_path / "client-1.ready", proc, log, "client 1", 600.0)
    assert e.value.hint == f"see {log}"


def test_wait_for_times_out_naming_what_it_waited_for(tmp_path: Path) -> None:
    proc, log = _child(tmp_path, "import time; time.sleep(120)")
    try:
        with pytest.raises(
            CliError, match=r"^the coordinator: not ready \(timed out after 0s waiting for the"
        ):
            bc._wait_for(tmp_path / "coordinator.json", proc, log, "the coordinator", 0.1)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# ---- one real run -----------------------------------------------------------------------------


def test_a_short_real_run_over_mtls_and_plaintext(tmp_path: Path) -> None:
    out = tmp_path / "coordinator.json"
    result = CliRunner().invoke(
        app,
        [
            "coordinator",
            "--agents", "50",
            "--seconds", "2",
            "--warmup-s", "1",
            "--client-procs", "2",
            "--compare-insecure",
            "--work-dir", str(tmp_path / "work"),
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "coordinator"
    assert data["command"].startswith("stanchion bench coordinator --agents 50 --seconds 2")
    assert data["settings"]["tls"] is True and data["settings"]["agents_per_client"] == [25, 25]
    r = data["results"]
    assert r["agents"] == 50 and r["tls"] is True
    for key in ("p50_ms", "p99_ms", "max_ms"):
        assert r[key] is not None and r[key] > 0
    assert r["failures"] == 0 and r["failures_by_code"] == {}
    assert r["job"]["state"] == "JOB_STATE_RUNNING" and r["job"]["members"] == 50
    hb = r["heartbeats"]
    assert hb["offered_per_s"] == 50.0 and hb["sent"] == hb["ok"] > 0
    assert hb["directives_received_including_warmup"] >= 50  # every member got its StartWorkers
    c = r["coordinator"]
    assert c["established_connections"] == 50  # one connection per simulated agent
    assert c["rss_mb_peak"] > 0 and c["cpu_s_window"] > 0 and c["scrapes"] >= 2
    assert c["nodes_by_state"]["ready"] == 50 and c["nodes_by_state"]["lost"] == 0
    assert c["heartbeat_age_s_last_scrape"]["n"] == 50
    assert sum(s["heartbeats"] for s in r["slices"]) == hb["ok"]
    assert [(p["agents"], p["tls"]) for p in r["points"]] == [(50, True), (50, False)]
    assert all(p["failures"] == 0 and p["nodes_lost"] == 0 for p in r["points"])
    assert {g["goal"] for g in data["goals"]} >= {"failed heartbeats", "heartbeat p99 latency (ms)"}
    assert set(r["points"][1]["goals_met"]) == {g["goal"] for g in data["goals"]}
