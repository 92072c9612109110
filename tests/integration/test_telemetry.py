"""Telemetry end to end: a real coordinator and two agents with running trainer ranks, their /metrics
checked by promtool, scraped by a real Prometheus server, and compared with what the ranks logged.

One cluster, one short job with injected faults (a NaN loss and a parameter bit flip), so the
detector counters move. What is proved:

- `promtool check metrics` accepts the agent's and the coordinator's exposition without a word;
- every metric docs/metrics.md names is exported (trainer metrics by the agent, job and
  node metrics by the coordinator, GPU metrics by the agent's health collector over a fake NVML, since
  this machine has no GPU), with `job_id` (not `job`, which Prometheus reserves: see docs/metrics.md) and `rank`;
- `stanchion_nvml_up` is 0 here;
- Prometheus's answer for `stanchion_train_loss{rank="0"}` equals, exactly, the loss the rank wrote in
  its progress record of the step Prometheus reports;
- every metric the Grafana dashboard and the alert rules query is in these real scrapes, the
  alert rules load and evaluate in that Prometheus, and docs/metrics.md lists exactly the exported
  families;
- the detector counters were 0 before the faults and moved after them; the job ends with
  `stanchion_job_state{state="succeeded"} 1` and a 0 restart counter for every known reason.

Needs Debian's `prometheus` package (server and promtool); a missing binary fails, never skips.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import yaml
from conftest import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import REPO, job_spec, prepare_data

from diagnostics.localcluster import LocalCluster
from protos.stanchion.v1 import types_pb2
from stanchion.vocab import RestartReason

sys.path.insert(0, str(REPO / "tests" / "deploy"))
from dashboard import dashboard_metric_names, documented_metric_names  # noqa: E402

INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus  (or run `make system-deps`)"
DASHBOARD = REPO / "deploy" / "grafana" / "stanchion-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "stanchion.rules.yml"
DOCS_METRICS = REPO / "docs" / "metrics.md"

DATA = "fixture-512"
STEPS = 24
NAN_STEP = 8  # rank 1's loss becomes NaN: the non-finite guard skips the step, the job replays it
FLIP_STEP = 13  # a parameter bit of rank 0 flips: the next fingerprint check (every 2 steps) disagrees
NODES = ("node-0", "node-1")

# The metrics docs/metrics.md documents (the `job_id` label: docs/metrics.md says why).
DOCUMENTED_TRAINER = {
    "stanchion_train_step": {"job_id", "rank"},
    "stanchion_train_loss": {"job_id", "rank"},
    "stanchion_train_grad_norm": {"job_id", "rank"},
    "stanchion_train_activation_norm": {"job_id", "rank", "layer"},
    "stanchion_train_step_seconds": {"job_id", "rank"},  # histogram
    "stanchion_train_tokens_total": {"job_id", "rank"},
    "stanchion_train_tokens_per_second": {"job_id", "rank"},
    "stanchion_train_nonfinite_total": {"job_id", "rank"},
    "stanchion_fingerprint_mismatches_total": {"job_id", "rank"},
    "stanchion_audit_mismatches_total": {"job_id", "rank"},
    "stanchion_checkpoint_stall_seconds": {"job_id", "rank"},
    "stanchion_straggler_compute_seconds": {"job_id", "rank"},
    "stanchion_straggler_ratio": {"job_id", "rank"},
    "stanchion_straggler_events_total": {"job_id", "rank"},
}
DOCUMENTED_GPU = {
    "stanchion_gpu_temperature_celsius": {"gpu", "UUID"},
    "stanchion_gpu_power_watts": {"gpu", "UUID"},
    "stanchion_gpu_utilization_ratio": {"gpu", "UUID"},
    "stanchion_gpu_memory_used_bytes": {"gpu", "UUID"},
    "stanchion_gpu_xid_errors_total": {"gpu", "UUID", "xid"},
    "stanchion_gpu_ecc_errors_total": {"gpu", "UUID", "bit", "scope"},
    "stanchion_gpu_remapped_rows_total": {"gpu", "UUID"},
    "stanchion_gpu_info": {"gpu", "UUID"},
}
DOCUMENTED_COORDINATOR = {
    "stanchion_job_state": {"job_id", "state"},
    "stanchion_job_restarts_total": {"job_id", "reason"},
    "stanchion_recovery_seconds": {"job_id"},  # histogram
    "stanchion_goodput_ratio": {"job_id"},
    "stanchion_node_heartbeat_age_seconds": {"node"},
    "stanchion_nodes": {"state"},
}
HISTOGRAMS = {"stanchion_train_step_seconds", "stanchion_recovery_seconds"}
_SUFFIXES = ("_bucket", "_sum", "_count")


# -- expositions --------------------------------------------------------------------------------
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """{sample name: [(labels, value)]} of an exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    hits = [v for lv, v in samples.get(name, []) if all(lv.get(k) == x for k, x in labels.items())]
    assert len(hits) <= 1, f"{name}{labels} matches {len(hits)} series"
    return hits[0] if hits else None


def exported_names(*texts: str) -> set[str]:
    """Sample names with at least one sample, plus the family names of histograms that have samples
    (a dashboard writes `x_bucket`, which dashboard.py reduces to the family `x`)."""
    names: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.samples:
                names |= {s.name for s in family.samples}
                if family.type in ("histogram", "summary"):
                    names.add(family.name)
    return names


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def scrape(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: {INSTALL_HINT}", pytrace=False)
    return path


# -- a fake NVML for the GPU families (this machine has no GPU) ---------------------------------
class _FakeNvml:
    """Two GPUs answering every query the backend makes, with pynvml's real constants and errors."""

    def __init__(self) -> None:
        for name in dir(pynvml):
            if name.startswith(("NVML", "nvmlClocks")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = [f"GPU-00000000-0000-0000-0000-00000000000{i}" for i in range(2)]

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h]

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:{0x19 + h:02X}:00.0".encode())

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 45

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 350_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return 123_456_789

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=20 * 2**30, total=80 * 2**30, free=60 * 2**30)

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return pynvml.nvmlClocksEventReasonSwPowerCap

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter_type: int) -> int:
        return 1

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        return (2, 1, 0, 0)

    def nvmlDeviceGetPcieReplayCounter(self, h: int) -> int:
        return 7


class _XidCounts:
    """Stands in for the Xid watcher's thread: one Xid 79 seen on GPU 0."""

    def __init__(self, uuid: str):
        self.uuid = uuid

    def counts(self) -> dict[tuple[int, str, int], int]:
        return {(0, self.uuid, 79): 1}


def fake_gpu_exposition(tmp: Path) -> str:
    """The agent's health collector over a fake NVML, in its own registry, as the agent builds it."""
    from agent.health import NvmlBackend
    from agent.health_collector import HealthCollector

    fake = _FakeNvml()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HealthCollector(NvmlBackend(fake), _XidCounts(fake.gpus[0]), [tmp]))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# -- a real Prometheus server ------------------------------------------------------------------
@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        """The single value of an instant vector (None when it is empty)."""
        result = self.query(promql, at)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_prometheus(root: Path, agents: list[int], coordinator: int) -> Prometheus:
    binary = require("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "stanchion-agent",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in agents]}],
            },
            {
                "job_name": "stanchion-coordinator",
                "static_configs": [{"targets": [f"127.0.0.1:{coordinator}"]}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = root / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        with log.open("ab") as f:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        prom = Prometheus(proc, port, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                # Ready, and ours (not another server that holds this port).
                if http_get(f"http://127.0.0.1:{port}/-/ready", timeout=1).strip() and prom.api(
                    "status/flags"
                )["storage.tsdb.path"] == str(root / "tsdb"):
                    return prom
            time.sleep(0.1)
        stop_prometheus(prom)
        if "address already in use" not in prom.tail():
            break
    raise RuntimeError(f"prometheus did not become ready (exit {proc.returncode}): {prom.tail()}")


def stop_prometheus(prom: Prometheus) -> None:
    """By pid: SIGTERM, then SIGKILL if it lingers."""
    if prom.proc.poll() is None:
        prom.proc.send_signal(signal.SIGTERM)
        try:
            prom.proc.wait(15)
        except subprocess.TimeoutExpired:
            prom.proc.kill()
            prom.proc.wait()


# -- the scenario, run once -----------------------------------------------------------------------
@dataclass
class Telemetry:
    cluster: LocalCluster
    prom: Prometheus
    job_id: str
    job: Any
    agent_ports: dict[str, int]
    early: dict[str, Samples]  # a scrape of each agent before the first injected fault
    agents: dict[str, str] = field(default_factory=dict)  # final expositions
    coordinator: str = ""
    gpu: str = ""

    def rank_node(self, rank: int) -> str:
        return self.job.nodes[rank]


def _early_scrapes(c: LocalCluster, ports: dict[str, int], job_id: str) -> dict[str, Samples]:
    """Each agent's first exposition that has its rank's series (the slow first steps leave time)."""
    out: dict[str, Samples] = {}
    deadline = time.monotonic() + 90
    while len(out) < len(ports) and time.monotonic() < deadline:
        for node, port in ports.items():
            if node not in out:
                s = parse(scrape(port))
                if any(lv["job_id"] == job_id for lv, _ in s.get("stanchion_train_step", [])):
                    out[node] = s
        time.sleep(0.05)
    assert len(out) == len(ports), f"no training series on {sorted(set(ports) - set(out))}"
    return out


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require("promtool")
    require("prometheus")
    root = tmp_path_factory.mktemp("telemetry")
    data = prepare_data(tmp_path_factory.mktemp("teldata") / DATA)
    c = LocalCluster(
        root / "cluster", tls=False, hang_floor_s=5.0, stop_grace_s=10.0, heartbeat_timeout_s=8.0
    )
    shutil.copytree(data, c.data_root / DATA)
    prom: Prometheus | None = None
    try:
        c.start_coordinator()
        for n in NODES:
            c.start_agent(n)
        ports = {n: json.loads((c.root / f"agent-{n}.json").read_text())["metrics_port"] for n in NODES}
        prom = start_prometheus(root, list(ports.values()), c.metrics_port)
        job_id = c.submit(
            job_spec(
                "telemetry",
                DATA,
                nodes=2,
                steps=STEPS,
                checkpoint_every=10,
                faults=[
                    # Slow first steps: a scrape sees the series before any fault fired.
                    {"kind": "slow", "rank": -1, "from_step": 1, "until_step": 4, "delay_s": 0.3},
                    {"kind": "nan", "step": NAN_STEP, "rank": 1},
                    {"kind": "bitflip", "step": FLIP_STEP, "rank": 0, "target": "param", "bit": 20},
                ],
                # a short straggler window, so that its ratio is exported within the run (after
                # its warm-up and one window); a ratio no one reaches on these shared cores
                trainer={
                    "integrity": {
                        "fingerprint_every": 2,
                        "snapshot_every": 4,
                        "straggler_window": 4,
                        "straggler_ratio": 50.0,
                    }
                },
            )
        )
        early = _early_scrapes(c, ports, job_id)
        job = c.wait_job({"succeeded", "failed", "cancelled"}, 120, job_id)
        t = Telemetry(c, prom, job_id, job, ports, early)
        t.agents = {n: scrape(p) for n, p in ports.items()}
        t.coordinator = scrape(c.metrics_port)
        t.gpu = fake_gpu_exposition(root)
        yield t
    finally:
        if prom is not None:
            stop_prometheus(prom)
        c.stop()


# -- the tests ------------------------------------------------------------------------------------
def test_the_job_succeeded_through_its_faults(telemetry: Telemetry) -> None:
    t = telemetry
    reasons = [d.reason for d in t.cluster.explain(t.job_id).decisions]
    assert t.job.state == types_pb2.JOB_STATE_SUCCEEDED, (
        f"job ended in state {types_pb2.JobState.Name(t.job.state)}: {reasons}"
    )
    coordinator = parse(t.coordinator)
    assert value(coordinator, "stanchion_job_state", job_id=t.job_id, state="succeeded") == 1
    for state in ("pending", "running", "recovering", "bisecting", "failed", "cancelled"):
        assert value(coordinator, "stanchion_job_state", job_id=t.job_id, state=state) == 0, state
    assert value(coordinator, "stanchion_job_step", job_id=t.job_id) == STEPS
    # Two replicas cannot name the flipped one: both rolled back in place at their verdict, and the
    # coordinator recorded it rather than asking for the same rollback again.
    assert any(
        f"replica fingerprints disagree at step {FLIP_STEP + 1}" in r
        and "the ranks rolled back in place" in r
        for r in reasons
    ), reasons


def test_promtool_accepts_both_expositions_without_a_word(telemetry: Telemetry) -> None:
    promtool = require("promtool")
    expositions = {f"agent {n}": text for n, text in sorted(telemetry.agents.items())}
    expositions.update(
        coordinator=telemetry.coordinator, **{"health collector over a fake NVML": telemetry.gpu}
    )
    for name, text in expositions.items():
        r = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert (r.returncode, r.stdout + r.stderr) == (0, ""), f"{name}: {r.stdout}{r.stderr}"


def test_both_daemons_export_their_build_info(telemetry: Telemetry) -> None:
    from stanchion import __version__

    for component, text in [
        *(("agent", a) for a in telemetry.agents.values()),
        ("coordinator", telemetry.coordinator),
    ]:
        (labels, v), *rest = parse(text)["stanchion_build_info"]
        assert not rest and v == 1
        assert (labels["component"], labels["version"]) == (component, __version__)


def _assert_documented(samples: Samples, documented: dict[str, set[str]], where: str, **match: str) -> None:
    for name, labels in documented.items():
        names = [name + s for s in _SUFFIXES] if name in HISTOGRAMS else [name]
        for n in names:
            series = [lv for lv, _ in samples.get(n, []) if all(lv.get(k) == v for k, v in match.items())]
            assert series, f"{n} is not exported by the {where} (with {match})"
            for lv in series:
                missing = labels - set(lv)
                assert not missing, f"{n}{lv} on the {where} lacks the labels {sorted(missing)}"


def test_every_documented_metric_is_exported(telemetry: Telemetry) -> None:
    t = telemetry
    for rank in (0, 1):
        node = t.rank_node(rank)
        agent = parse(t.agents[node])
        _assert_documented(agent, DOCUMENTED_TRAINER, f"agent {node}", job_id=t.job_id, rank=str(rank))
        # The small model has two blocks: one activation norm per layer.
        layers = {
            lv["layer"] for lv, _ in agent["stanchion_train_activation_norm"] if lv["rank"] == str(rank)
        }
        assert layers == {"0", "1"}
    _assert_documented(parse(t.coordinator), DOCUMENTED_COORDINATOR, "coordinator")
    coordinator = parse(t.coordinator)
    for name in ("stanchion_job_state", "stanchion_job_restarts_total", "stanchion_goodput_ratio"):
        assert any(lv.get("job_id") == t.job_id for lv, _ in coordinator[name]), name
    assert {lv["node"] for lv, _ in coordinator["stanchion_node_heartbeat_age_seconds"]} == set(NODES)
    assert value(coordinator, "stanchion_nodes", state="ready") == len(NODES)
    assert 0 < value(coordinator, "stanchion_goodput_ratio", job_id=t.job_id) <= 1
    _assert_documented(parse(t.gpu), DOCUMENTED_GPU, "health collector over a fake NVML")


def test_nvml_is_down_on_this_machine_and_up_over_the_fake(telemetry: Telemetry) -> None:
    for node, text in telemetry.agents.items():
        assert value(parse(text), "stanchion_nvml_up") == 0, node
    assert value(parse(telemetry.gpu), "stanchion_nvml_up") == 1


def test_detector_counters_moved_after_the_injected_faults(telemetry: Telemetry) -> None:
    t = telemetry

    def total(samples: Samples, name: str, rank: int) -> float:
        v = value(samples, name, job_id=t.job_id, rank=str(rank))
        assert v is not None, f"{name} rank {rank} missing"
        return v

    for rank in (0, 1):
        node = t.rank_node(rank)
        early, final = t.early[node], parse(t.agents[node])
        assert total(early, "stanchion_train_step", rank) < NAN_STEP, "the early scrape came too late"
        for name in ("stanchion_train_nonfinite_total", "stanchion_fingerprint_mismatches_total"):
            assert total(early, name, rank) == 0, (node, name)
        assert total(final, "stanchion_train_step", rank) == STEPS
        assert total(final, "stanchion_train_tokens_total", rank) > total(
            early, "stanchion_train_tokens_total", rank
        )
        assert total(final, "stanchion_train_step_seconds_count", rank) >= STEPS
    finals = {rank: parse(t.agents[t.rank_node(rank)]) for rank in (0, 1)}
    nonfinite = sum(total(finals[r], "stanchion_train_nonfinite_total", r) for r in (0, 1))
    mismatches = sum(total(finals[r], "stanchion_fingerprint_mismatches_total", r) for r in (0, 1))
    assert nonfinite >= 1, "the injected NaN did not move stanchion_train_nonfinite_total"
    assert mismatches >= 1, "the bit flip did not move stanchion_fingerprint_mismatches_total"


def test_restart_counters_start_at_zero_for_every_known_reason(telemetry: Telemetry) -> None:
    t = telemetry
    coordinator = parse(t.coordinator)
    restarts = {
        lv["reason"]: v for lv, v in coordinator["stanchion_job_restarts_total"] if lv["job_id"] == t.job_id
    }
    # Every restart reason (docs/metrics.md lists them) is a series from the job's start.
    missing = {r.value for r in RestartReason} - set(restarts)
    assert not missing, sorted(missing)
    assert sum(restarts.values()) == t.job.restarts
    if t.job.restarts == 0:  # both faults are healed in place: nothing restarted
        assert set(restarts.values()) == {0.0}


def test_prometheus_reports_the_loss_the_rank_logged(telemetry: Telemetry) -> None:
    t = telemetry
    prom = t.prom
    sel = f'{{job="stanchion-agent",job_id="{t.job_id}",rank="0"}}'
    # The job finished, so the gauges are frozen; wait until Prometheus has scraped the final state.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = prom.scalar(f'stanchion_job_state{{job_id="{t.job_id}",state="succeeded"}}')
        if done == 1 and prom.scalar(f"stanchion_train_step{sel}") == STEPS:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"Prometheus never saw the finished job: {prom.tail()}")
    at = time.time()
    step = prom.scalar(f"stanchion_train_step{sel}", at)
    loss = prom.scalar(f"stanchion_train_loss{sel}", at)
    # Both samples come from one scrape of one target.
    assert prom.scalar(f"timestamp(stanchion_train_step{sel})", at) == prom.scalar(
        f"timestamp(stanchion_train_loss{sel})", at
    )
    assert step is not None and loss is not None
    node = t.rank_node(0)
    logged = [
        r
        for r in t.cluster.progress(node)
        if r["rank"] == 0 and r["step"] == int(step) and r.get("generation") == t.job.generation
    ]
    assert logged, f"no progress record of rank 0 for step {step} on {node}"
    expected = logged[-1]["loss"]
    assert math.isfinite(expected)
    assert loss == expected, f"Prometheus says {loss!r}, rank 0 logged {expected!r} at step {step}"
    # The series carries the scrape job and instance next to ours: `job_id` did not collide with `job`.
    (series,) = prom.query(f"stanchion_train_loss{sel}", at)
    assert series["metric"]["instance"] == f"127.0.0.1:{t.agent_ports[node]}"
    assert "exported_job" not in series["metric"]


def test_prometheus_scraped_every_target_and_loaded_the_alert_rules(telemetry: Telemetry) -> None:
    prom = telemetry.prom
    targets = prom.api("targets")["activeTargets"]
    deadline = time.monotonic() + 15  # "unknown": not scraped yet (its first interval has not come)
    while any(t["health"] == "unknown" for t in targets) and time.monotonic() < deadline:
        time.sleep(0.5)
        targets = prom.api("targets")["activeTargets"]
    assert len(targets) == len(NODES) + 1
    for target in targets:
        assert target["health"] == "up", target
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert len(rules) == expected
    deadline = time.monotonic() + 10
    while any(r["health"] == "unknown" for r in rules) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


def _missing(used: set[str], exported: set[str]) -> list[str]:
    def known(name: str) -> bool:
        return name in exported or any(name.endswith(s) and name[: -len(s)] in exported for s in _SUFFIXES)

    return sorted(n for n in used if not known(n))


def test_every_dashboard_metric_is_in_a_real_scrape(telemetry: Telemetry) -> None:
    t = telemetry
    exported = exported_names(*t.agents.values(), t.coordinator, t.gpu)
    used = dashboard_metric_names(DASHBOARD)
    assert len(used) > 20
    assert not _missing(used, exported), (
        f"dashboard queries metrics nobody exports: {_missing(used, exported)}"
    )
    # The template variables' label_values(metric, label) name an exported metric and one of its labels.
    samples = {**parse(t.coordinator), **parse(t.gpu)}
    for text in t.agents.values():
        samples.update(parse(text))
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert m, variable["definition"]
            metric, label = m.groups()
            if label == "instance":  # Prometheus adds it at scrape time
                assert metric in samples, variable["definition"]
            else:
                assert any(label in lv for lv, _ in samples.get(metric, [])), variable["definition"]


def test_the_metric_catalog_is_exactly_what_the_daemons_export(telemetry: Telemetry) -> None:
    """docs/metrics.md lists every family with samples in these scrapes, and nothing else."""
    t = telemetry
    exported: set[str] = set()
    for text in (*t.agents.values(), t.coordinator, t.gpu):
        for family in text_string_to_metric_families(text):
            if family.samples:
                exported.add(family.name + "_total" if family.type == "counter" else family.name)
    documented = documented_metric_names(DOCS_METRICS)
    # Exported only where a rank records it, on a GPU whose peak is known (tests/unit/test_agent_metrics.py).
    gpu_only = {"stanchion_train_mfu_ratio"}
    assert gpu_only <= documented
    assert sorted(documented - gpu_only - exported) == [], "documented but not exported"
    assert sorted(exported - documented) == [], "exported but not documented"


def test_every_alert_rule_metric_is_in_a_real_scrape(telemetry: Telemetry) -> None:
    t = telemetry
    exported = exported_names(*t.agents.values(), t.coordinator, t.gpu)
    used: set[str] = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"(?<![\w:])stanchion_[a-z0-9_]+(?![\w:])", str(rule["expr"])))
    assert len(used) > 10
    assert not _missing(used, exported), (
        f"alert rules query metrics nobody exports: {_missing(used, exported)}"
    )
