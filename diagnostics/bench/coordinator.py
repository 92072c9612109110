"""`stanchion bench coordinator`: how many agents one coordinator process carries.

The goal (docs/benchmarks.md): one coordinator process carries at least 1,000 agents heartbeating
every second, with the heartbeat's p99 latency well under the interval, no failed heartbeats and no
node declared lost.

What runs, all real processes on this machine:

- **The coordinator**: ``python -m diagnostics.cli coordinator serve --listen 127.0.0.1:0`` with its
  defaults (grpc.aio server, one controller queue, SQLite state, 10 s heartbeat timeout), mTLS from
  a fresh development PKI (``--tls``, the default) or ``--insecure``, and its /metrics endpoint.
- **Simulated agents** in ``--client-procs`` processes (``python -m diagnostics.bench
  coordinator-client``, diagnostics/bench/__main__.py), asyncio + grpc.aio. The shape is the
  agent's own: unary ``Register`` once, then unary ``Heartbeat`` every interval with directives
  piggybacked on the responses. Each simulated agent has **its own channel and its own TCP (and
  TLS) connection** (a local subchannel pool per channel, which grpc would otherwise share between
  channels of one process), and in TLS mode its own client certificate (``agent-sim-NNNNN.pem``),
  because that is what the coordinator sees from real agents: one connection, one handshake and
  one identity check per node. Payload per heartbeat: one
  ``WorkerStatus`` per local rank (``--workers-per-node``, default 8: an 8-GPU node) in state
  TRAINING with an advancing step, the node's health verdict, the acked directive sequence, and with
  probability ``--event-rate`` one relayed event (a ~200-byte JSON detail; the coordinator stores
  each in SQLite).
- **One job over every agent** (``--job``, the default): once all agents registered, an operator
  submits a job with ``nodes`` = the agent count; the coordinator starts it on all of them
  (``StartWorkers`` piggybacked on a heartbeat reply, acked on the next, which the reply asks for
  at the fast interval), and from then on every heartbeat carries that generation's progress
  through the job state machine, as in training. ``--no-job`` leaves the agents idle.
- **Schedule**: each agent heartbeats at a fixed rate from a random phase in the first interval
  (the offered load is agents / interval, spread evenly). A reply slower than the interval delays
  the next send instead of queueing a burst (as the agent does); such a run shows fewer heartbeats
  achieved than offered. The first ``--warmup-s`` seconds are not measured.

Measured: heartbeat latency at the client (send to reply, ms), heartbeats per second achieved vs
offered, failures by status code, how late the client processes sent (their own event-loop lag:
large values mean the load generator, not the coordinator, was the bottleneck), the coordinator's
CPU time and RSS (psutil on its pid), its TCP connections, and what the coordinator itself sees:
``stanchion_node_heartbeat_age_seconds`` of every node and ``stanchion_heartbeats_total`` scraped
from its /metrics during the measured window, and ``stanchion_nodes{state="lost"}``. The window
is also reported in 5 s slices (latency, client lateness, and the cores used by the coordinator,
the clients and everything else on the machine), since a shared machine's load moves.

Several points (``--agents`` repeated, ``--compare-insecure``) run one after the other, each with a
fresh coordinator; the JSON's results are the first point's, and ``points`` summarises them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HEARTBEAT_TIMEOUT_S = 10.0  # the coordinator's default (coordinator/config.py); the benchmark keeps it
RPC_TIMEOUT_S = 5.0  # the agent's default deadline per call (agent/config.py rpc_timeout_s)
P99_FRACTION = 0.1  # "p99 well under the interval": at most a tenth of it
ACHIEVED_FRACTION = 0.99  # heartbeats achieved / offered
NODE_PREFIX = "sim-"
SLICE_S = 5.0  # the measured window is also reported in slices this long (load on a shared machine moves)
SLOW_MS = 50.0  # heartbeats slower than this are kept with their send time, to find stalls
# A local subchannel pool per channel: without it, grpc shares one connection between all channels
# of a process that have the same target and options, and the coordinator would see one client.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def node_ids(n: int, start: int = 0) -> list[str]:
    return [f"{NODE_PREFIX}{i:05d}" for i in range(start, start + n)]


def split(n: int, parts: int) -> list[range]:
    """``n`` agent indexes in ``parts`` contiguous slices whose sizes differ by at most one."""
    if n < 0 or parts < 1:
        raise ValueError("need n >= 0 and parts >= 1")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    vals = sorted(values)
    k = (len(vals) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max/mean of ``values`` (None for each when there are none)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p999": percentile(values, 99.9),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def parse_metrics(text: str) -> dict[str, Any]:
    """From a /metrics scrape: every node's heartbeat age, the heartbeat counter and node states."""
    from prometheus_client.parser import text_string_to_metric_families

    ages: dict[str, float] = {}
    nodes: dict[str, float] = {}
    total = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "stanchion_node_heartbeat_age_seconds":
                ages[s.labels.get("node", "")] = s.value
            elif s.name == "stanchion_heartbeats_total":
                total = s.value
            elif s.name == "stanchion_nodes":
                nodes[s.labels.get("state", "")] = s.value
    return {"heartbeat_age_s": ages, "heartbeats_total": total, "nodes": nodes}


def merge_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def stall_episodes(
    slow: Iterable[Sequence[float]], origin: float, gap_s: float = 0.25
) -> list[dict[str, Any]]:
    """Slow heartbeats ``(sent at, ms)`` grouped into episodes: a new one starts when the next slow
    heartbeat was sent more than ``gap_s`` after the previous one. Times are seconds after ``origin``.
    Many heartbeats slow at once point at a stall of the coordinator (or of the machine); isolated
    ones at a single request."""
    out: list[dict[str, Any]] = []
    for t, ms in sorted((float(t), float(ms)) for t, ms in slow):
        if out and t - out[-1]["_last"] <= gap_s:
            e = out[-1]
            e["heartbeats"] += 1
            e["max_ms"] = max(e["max_ms"], ms)
            e["_last"] = t
        else:
            out.append({"at_s": t - origin, "heartbeats": 1, "max_ms": ms, "_last": t})
    for e in out:
        e["span_s"] = e.pop("_last") - origin - e["at_s"]
    return out


def slice_table(
    samples: Sequence[Sequence[float]], cpu_samples: Sequence[Sequence[Any]], origin: float
) -> list[dict[str, Any]]:
    """The window in slices between consecutive CPU samples ``(time, coordinator CPU s, client CPU
    s, psutil.cpu_times())``: latency p50/p99/max of the heartbeats sent in the slice (``samples``
    are ``(sent at - origin, latency ms, lateness ms)``; each lands in exactly one slice), the
    clients' p99 send lateness, and the cores the coordinator, the clients and everything else on
    the machine used."""
    out = []
    pairs = list(zip(cpu_samples, cpu_samples[1:], strict=False))
    for i, ((t0, c0, cl0, s0), (t1, c1, cl1, s1)) in enumerate(pairs):
        lo, hi, dt = t0 - origin, t1 - origin, t1 - t0
        # Every sample lands in a slice: the first and last are open-ended (a CPU sample is taken a
        # moment after the window opens, and the last heartbeats return after it closed).
        first, last = i == 0, i == len(pairs) - 1
        inside = [x for x in samples if (first or lo <= x[0]) and (last or x[0] < hi)]
        lat = distribution([x[1] for x in inside])
        late = distribution([x[2] for x in inside])
        busy = _busy_cores(s0, s1, dt)
        coord, clients = ((c1 - c0) / dt, (cl1 - cl0) / dt) if dt > 0 else (None, None)
        out.append(
            {
                "from_s": lo,
                "to_s": hi,
                "heartbeats": lat["n"],
                "p50_ms": lat["p50"],
                "p99_ms": lat["p99"],
                "max_ms": lat["max"],
                "client_lateness_p99_ms": late["p99"],
                "coordinator_cores": coord,
                "client_cores": clients,
                "machine_busy_cores": busy,
                "other_cores": None if None in (busy, coord, clients) else busy - coord - clients,
            }
        )
    return out


def job_spec(agents: int, workers_per_node: int, name: str = "bench") -> str:
    """A job that spans every simulated agent: the coordinator starts it on all of them, and each
    member's heartbeats then carry that generation's progress."""
    world = agents * workers_per_node
    return "\n".join(
        [
            f'name = "{name}"',
            f"nodes = {agents}",
            f"min_nodes = {agents}",
            f"workers_per_node = {workers_per_node}",
            "[trainer]",
            'preset = "tiny"',
            "steps = 1000000000",
            "[trainer.data]",
            'path = "bench"',
            "micro_batch_size = 1",
            f"global_batch_size = {world}",
            "",
        ]
    )


def coordinator_goals(
    *,
    agents: int,
    interval_s: float,
    p99_ms: float | None,
    failures: int,
    achieved: float | None,
    offered: float,
    lost: int | None,
    max_age_s: float | None,
) -> list[dict[str, Any]]:
    from diagnostics.bench.common import goal

    at_scale = agents >= 1000
    p99_target = P99_FRACTION * interval_s * 1000
    ratio = None if achieved is None or offered <= 0 else achieved / offered
    return [
        goal(
            "agents carried",
            agents,
            ">= 1000 agents heartbeating at the interval",
            at_scale,
            "simulated agents, each with its own connection; the other goals are met at this count or not",
        ),
        goal(
            "heartbeat p99 latency (ms)",
            p99_ms,
            f"< {p99_target:g} ms ({P99_FRACTION:g} of the {interval_s:g} s interval)",
            None if p99_ms is None else p99_ms < p99_target,
            "client-side send-to-reply time of every heartbeat in the measured window",
        ),
        goal(
            "failed heartbeats",
            failures,
            "0",
            failures == 0,
            "heartbeats that ended in a status other than OK (any code, deadline 5 s)",
        ),
        goal(
            "heartbeats achieved / offered",
            ratio,
            f">= {ACHIEVED_FRACTION:g}",
            None if ratio is None else ratio >= ACHIEVED_FRACTION,
            "successful heartbeats per second in the window over agents / interval",
        ),
        goal(
            "nodes declared lost",
            lost,
            f"0 (the coordinator's heartbeat timeout is {HEARTBEAT_TIMEOUT_S:g} s)",
            None if lost is None else lost == 0,
            'stanchion_nodes{state="lost"} at the last scrape of the window',
        ),
        goal(
            "oldest heartbeat age the coordinator saw (s)",
            max_age_s,
            f"< {HEARTBEAT_TIMEOUT_S:g} s",
            None if max_age_s is None else max_age_s < HEARTBEAT_TIMEOUT_S,
            "max of stanchion_node_heartbeat_age_seconds over every scrape in the window",
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The simulated agents (one client process runs a slice of them)


def inventory(index: int, workers: int) -> Any:
    from protos.stanchion.v1 import types_pb2

    return types_pb2.NodeInventory(
        host=f"{NODE_PREFIX}{index:05d}.bench.invalid",
        addresses=[f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"],
        gpus=[
            types_pb2.GpuInfo(
                uuid=f"GPU-{index:08x}-{g:04x}-0000-0000-000000000000", name="NVIDIA H100 80GB HBM3"
            )
            for g in range(workers)
        ],
        cpu_count=224,
        memory_total_bytes=2 * 1024**4,
        agent_version="bench",
        workers=workers,
        store_port=29400,
    )


class SimAgent:
    """What one agent reports: worker statuses that advance, events with sequence numbers, acks.

    Directives are applied at once: ``start`` makes the node a member of that job's generation (its
    workers then report that generation and the node's ranks), ``stop`` makes it idle again."""

    def __init__(self, index: int, workers: int, event_rate: float, rng: random.Random):
        self.index = index
        self.node_id = f"{NODE_PREFIX}{index:05d}"
        self.workers = workers
        self.event_rate = event_rate
        self.rng = rng
        self.step = rng.randrange(1000, 100_000)
        self.event_seq = 0
        self.acked = 0
        self.pending_events: list[Any] = []
        self.job_id = ""
        self.generation = 0
        self.node_rank = index

    def request(self, now: float) -> Any:
        from protos.stanchion.v1 import agent_pb2, types_pb2

        self.step += 1
        if self.rng.random() < self.event_rate:
            self.event_seq += 1
            detail = {
                "gpu": self.rng.randrange(self.workers),
                "temperature_c": self.rng.randrange(55, 80),
                "power_w": self.rng.randrange(300, 700),
                "sm_clock_mhz": 1980,
                "ecc_sbe_volatile": 0,
                "xid": None,
                "reason": "periodic sample",
            }
            self.pending_events.append(
                types_pb2.Event(
                    kind="health",
                    generation=0,
                    step=self.step,
                    rank=-1,
                    time=now,
                    detail_json=json.dumps(detail),
                    seq=self.event_seq,
                    node_id=self.node_id,
                )
            )
        base = self.node_rank * self.workers
        return agent_pb2.HeartbeatRequest(
            node_id=self.node_id,
            job_id=self.job_id,
            generation=self.generation,
            workers=[
                types_pb2.WorkerStatus(
                    local_rank=r,
                    rank=base + r,
                    state=types_pb2.WORKER_STATE_TRAINING,
                    pid=100_000 + base + r,
                    step=self.step,
                    step_time_s=0.9 + 0.01 * r,
                    generation=self.generation,
                )
                for r in range(self.workers)
            ],
            last_step=self.step,
            step_time_s=0.9,
            events=self.pending_events,
            health=types_pb2.HEALTH_VERDICT_HEALTHY,
            acked_directive_seq=self.acked,
        )

    def replied(self, resp: Any) -> int:
        """Events delivered; directives acknowledged (applied at once). Returns the directives seen."""
        self.pending_events = []
        for d in resp.directives:
            if d.seq <= self.acked:
                continue
            kind = d.WhichOneof("kind")
            if kind == "start":
                self.job_id, self.generation, self.node_rank = d.job_id, d.generation, d.start.node_rank
            elif kind == "stop" and d.job_id == self.job_id:
                self.job_id = ""
            self.acked = d.seq
        return len(resp.directives)


class ClientStats:
    def __init__(self) -> None:
        # (sent at, seconds after the window opened; latency ms; how late the client sent it, ms)
        self.samples: list[tuple[float, float, float]] = []
        self.sent = 0
        self.ok = 0
        self.over_interval = 0
        self.failures: dict[str, int] = {}
        self.failures_total: dict[str, int] = {}  # warm-up included
        self.directives = 0  # over the whole run, warm-up included
        self.fast_replies = 0  # replies that asked for a shorter interval (a directive not yet acked)
        self.events = 0
        self.reregistered = 0
        self.failure_details: dict[str, dict[str, int]] = {}  # code -> details (a few) -> count
        self.failure_ms: list[float] = []  # how long failed calls took


async def _call_with_retry(fn: Any, what: str, deadline_s: float) -> Any:
    """Call with the agent's retry rules (`protos.client.retryable`, `stanchion.waiting.Backoff`)."""
    import grpc

    from protos import client
    from stanchion.waiting import Backoff

    backoff, t_end = Backoff(0.1, 2.0), time.monotonic() + deadline_s
    while True:
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            delay = backoff.next()
            if not client.retryable(e.code()) or time.monotonic() + delay > t_end:
                raise RuntimeError(f"{what}: {e.code().name}: {e.details()}") from None
        await asyncio.sleep(delay)


async def run_client(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One client process: register its slice of agents, report ready, wait for the start time,
    heartbeat until the end, and return the measurements."""
    import grpc

    from protos import client
    from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc

    target, tls_dir, insecure = spec["target"], spec.get("tls_dir", ""), bool(spec.get("insecure"))
    workers, interval = int(spec["workers_per_node"]), float(spec["interval_s"])
    indexes = range(spec["first"], spec["first"] + spec["count"])
    rng = random.Random(spec.get("seed", 0))
    options = [*client.channel_options(), OWN_CONNECTION]
    creds_for = None
    if not insecure:
        from stanchion.tls import channel_credentials

        def creds_for(node_id: str) -> Any:
            return channel_credentials(tls_dir, "agent", node_id)

    agents = [SimAgent(i, workers, float(spec["event_rate"]), random.Random(rng.random())) for i in indexes]
    channels, services = [], []
    for a in agents:
        ch = (
            grpc.aio.insecure_channel(target, options=options)
            if insecure
            else grpc.aio.secure_channel(target, creds_for(a.node_id), options=options)
        )
        channels.append(ch)
        services.append(agent_pb2_grpc.AgentServiceStub(ch))

    async def register(a: SimAgent, service: Any) -> None:
        req = agent_pb2.RegisterRequest(node_id=a.node_id, inventory=inventory(a.index, workers))
        await _call_with_retry(lambda: service.Register(req, timeout=10.0), f"register {a.node_id}", 120.0)

    t0 = time.perf_counter()
    sem = asyncio.Semaphore(int(spec.get("register_concurrency", 64)))

    async def register_one(a: SimAgent, service: Any) -> None:
        async with sem:
            await register(a, service)

    await asyncio.gather(*(register_one(a, s) for a, s in zip(agents, services, strict=True)))
    register_s = time.perf_counter() - t0
    Path(spec["ready_file"]).write_text(json.dumps({"agents": len(agents), "register_s": register_s}))
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line.strip():
        raise RuntimeError("no start time on stdin (the benchmark stopped?)")
    go = json.loads(line)
    start, measure_from, end = float(go["start"]), float(go["measure_from"]), float(go["end"])
    stats = ClientStats()

    async def agent_loop(a: SimAgent, service: Any) -> None:
        next_t = start + rng.random() * interval
        while next_t < end:
            delay = next_t - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at = time.time()
            measured = next_t >= measure_from
            req = a.request(sent_at)
            t = time.perf_counter()
            try:
                resp = await service.Heartbeat(req, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                stats.failures_total[code] = stats.failures_total.get(code, 0) + 1
                seen = stats.failure_details.setdefault(code, {})
                detail = (e.details() or "")[:200]
                if detail in seen or len(seen) < 3:
                    seen[detail] = seen.get(detail, 0) + 1
                stats.failure_ms.append((time.perf_counter() - t) * 1000)
                if measured:
                    stats.sent += 1
                    stats.failures[code] = stats.failures.get(code, 0) + 1
                if e.code() == grpc.StatusCode.NOT_FOUND:  # declared lost: register again, as agents do
                    stats.reregistered += 1
                    with contextlib.suppress(RuntimeError):
                        await register(a, service)
                next_t = max(next_t + interval, time.time())
                continue
            latency_ms = (time.perf_counter() - t) * 1000
            if measured:
                stats.sent += 1
                stats.ok += 1
                lateness_ms = max(0.0, (sent_at - next_t) * 1000)
                stats.samples.append(
                    (round(sent_at - measure_from, 4), round(latency_ms, 3), round(lateness_ms, 3))
                )
                stats.over_interval += latency_ms > interval * 1000
                stats.events += len(req.events)
                stats.fast_replies += 0 < resp.heartbeat_interval_ms < interval * 1000
            stats.directives += a.replied(resp)
            step_s = max(resp.heartbeat_interval_ms / 1000, 0.01) if resp.heartbeat_interval_ms else interval
            next_t = max(next_t + step_s, time.time())

    cpu_start = None

    async def cpu_mark() -> None:
        nonlocal cpu_start
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        cpu_start = time.process_time()

    marker = asyncio.create_task(cpu_mark())
    await asyncio.gather(*(agent_loop(a, s) for a, s in zip(agents, services, strict=True)))
    cpu_window = time.process_time() - cpu_start if cpu_start is not None else None
    marker.cancel()
    await asyncio.gather(*(ch.close() for ch in channels))
    return {
        "agents": len(agents),
        "register_s": register_s,
        "samples": stats.samples,
        "sent": stats.sent,
        "ok": stats.ok,
        "over_interval": stats.over_interval,
        "failures": stats.failures,
        "failures_total": stats.failures_total,
        "directives": stats.directives,
        "fast_replies": stats.fast_replies,
        "events": stats.events,
        "reregistered": stats.reregistered,
        "failure_details": stats.failure_details,
        "failure_ms": stats.failure_ms,
        "cpu_s_window": cpu_window,
        "cpu_s_total": time.process_time(),
    }


def client_main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m diagnostics.bench coordinator-client SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("nice"):
        os.nice(int(spec["nice"]))
    result = asyncio.run(run_client(spec))
    from stanchion.files import write_json_atomic

    write_json_atomic(spec["result_file"], result)
    return 0


# ---------------------------------------------------------------------------------------------
# The benchmark (parent process)


def _scrape(port: int, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:  # noqa: S310
        return r.read().decode()


def _stop(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """SIGTERM the process this module started (by pid), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[:600]
    return ""


def _wait_for(path: Path, proc: subprocess.Popen[Any], log: Path, what: str, timeout_s: float) -> None:
    """Wait until ``proc`` (``what``) creates ``path``; give up at once if it exits."""
    from diagnostics.bench.common import BenchError
    from stanchion.waiting import wait_until

    def ready() -> bool:
        if path.exists():
            return True
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode}: {_tail(log)}", hint=f"see {log}")
        return False

    try:
        wait_until(ready, timeout_s, f"{what} to create {path.name}")
    except TimeoutError as e:
        raise BenchError(f"{what}: not ready ({e})", hint=f"see {log}") from None


def _established(pid: int, port: int) -> int | None:
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


def _operator(port: int, tls_dir: Path | None) -> tuple[Any, Any]:
    """A blocking channel and an OperatorService client: the PKI's operator certificate, or plaintext."""
    from protos import client
    from protos.stanchion.v1 import operator_pb2_grpc

    target = f"127.0.0.1:{port}"
    if tls_dir is None:
        channel = client.channel(target, insecure=True)
    else:
        channel = client.channel(target, tls_dir=str(tls_dir), role="operator")
    return channel, operator_pb2_grpc.OperatorServiceStub(channel)


def _busy_cores(before: Any, after: Any, seconds: float) -> float | None:
    """Cores busy (all processes) between two psutil.cpu_times() samples."""
    if seconds <= 0:
        return None
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return (total - idle) / seconds


def run_point(
    *,
    agents: int,
    seconds: float,
    warmup_s: float,
    client_procs: int,
    tls: bool,
    interval_s: float,
    workers_per_node: int,
    event_rate: float,
    scrape_every_s: float,
    work_dir: Path,
    timeout_s: float,
    progress: Any,
    client_nice: int = 0,
    job: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """One measurement: a fresh coordinator, ``agents`` simulated agents, one measured window."""
    import psutil

    from diagnostics.bench.common import REPO, BenchError, bench_env, median

    if agents < 1 or client_procs < 1 or seconds <= 0 or interval_s <= 0:
        raise ValueError("agents, client_procs, seconds and interval_s must be positive")
    client_procs = min(client_procs, agents)
    work_dir.mkdir(parents=True, exist_ok=True)
    load_at_start = list(os.getloadavg())
    env = bench_env(1)
    ids = node_ids(agents)
    tls_dir = work_dir / "tls"
    security = ["--insecure"]
    if tls:
        from diagnostics.certs import init_pki

        progress(f"creating a development PKI with {agents} agent certificates in {tls_dir}")
        init_pki(tls_dir, node_ids=ids, overwrite=True)
        security = ["--tls-dir", str(tls_dir)]
    port_file = work_dir / "coordinator.json"
    coord_log = work_dir / "coordinator.log"
    coord_cmd = [
        sys.executable, "-m", "diagnostics.cli", "coordinator", "serve",
        "--listen", "127.0.0.1:0",
        "--state-db", str(work_dir / "coordinator.db"),
        "--metrics-port", "0",
        "--port-file", str(port_file),
        *security,
    ]  # fmt: skip
    progress(f"starting the coordinator ({'mTLS' if tls else 'plaintext'}); log {coord_log}")
    clients: list[tuple[subprocess.Popen[Any], Path]] = []
    op_channel = None
    with coord_log.open("wb") as f:
        coord = subprocess.Popen(
            coord_cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(port_file, coord, coord_log, "the coordinator", 60.0)
        ports = json.loads(port_file.read_text())
        port, metrics_port = int(ports["port"]), int(ports["metrics_port"])
        progress(f"  coordinator pid {coord.pid}, port {port}, metrics port {metrics_port}")
        cp = psutil.Process(coord.pid)
        cpu0 = cp.cpu_times()
        rss_idle = cp.memory_info().rss

        # Client processes: each registers its slice, then waits for the start time on stdin.
        slices = split(agents, client_procs)
        t_reg = time.perf_counter()
        for i, sl in enumerate(slices):
            spec = {
                "target": f"127.0.0.1:{port}",
                "tls_dir": str(tls_dir) if tls else "",
                "insecure": not tls,
                "first": sl.start,
                "count": len(sl),
                "interval_s": interval_s,
                "workers_per_node": workers_per_node,
                "event_rate": event_rate,
                "seed": seed * 1000 + i,
                "nice": client_nice,
                "ready_file": str(work_dir / f"client-{i}.ready"),
                "result_file": str(work_dir / f"client-{i}.json"),
            }
            spec_path = work_dir / f"client-{i}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log = work_dir / f"client-{i}.log"
            with log.open("wb") as f:
                p = subprocess.Popen(
                    [sys.executable, "-m", "diagnostics.bench", "coordinator-client", str(spec_path)],
                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env, cwd=REPO,
                    start_new_session=True,
                )  # fmt: skip
            clients.append((p, log))
        progress(f"registering {agents} agents from {len(clients)} client process(es)")
        for i, (p, log) in enumerate(clients):
            _wait_for(work_dir / f"client-{i}.ready", p, log, f"client {i}", timeout_s)
        register_wall_s = time.perf_counter() - t_reg
        connections = _established(coord.pid, port)
        progress(
            f"  registered in {register_wall_s:.1f} s; the coordinator has {connections} established connections"
        )
        op_channel, operator = _operator(port, tls_dir if tls else None)
        job_info: dict[str, Any] | None = None
        if job:
            from protos.stanchion.v1 import operator_pb2

            resp = operator.SubmitJob(
                operator_pb2.SubmitJobRequest(spec_toml=job_spec(agents, workers_per_node)), timeout=30.0
            )
            job_info = {"job_id": resp.job.job_id, "nodes": agents, "workers_per_node": workers_per_node}
            progress(
                f"  submitted job {resp.job.job_id} on all {agents} agents ({len(resp.job.nodes)} members)"
            )

        start = time.time() + 0.5
        measure_from = start + warmup_s
        end = measure_from + seconds
        go = json.dumps({"start": start, "measure_from": measure_from, "end": end}) + "\n"
        for p, _ in clients:
            assert p.stdin is not None
            p.stdin.write(go.encode())
            p.stdin.close()
        progress(f"heartbeating: {warmup_s:g} s warm-up, then {seconds:g} s measured")

        # While the agents run: CPU of the coordinator, the clients and the machine at every slice
        # boundary, the coordinator's RSS, and its /metrics (the last scrape just before the end).
        client_ps = [psutil.Process(p.pid) for p, _ in clients]

        def cpu_sample() -> tuple[float, float, float, Any]:
            c = cp.cpu_times()
            cl = 0.0
            for q in client_ps:
                with contextlib.suppress(psutil.Error):
                    ct = q.cpu_times()
                    cl += ct.user + ct.system
            return time.time(), c.user + c.system, cl, psutil.cpu_times()

        edges = [measure_from + k * SLICE_S for k in range(math.ceil(seconds / SLICE_S))] + [end]
        last_scrape = end - 0.5
        scrape_at = [measure_from + k * scrape_every_s for k in range(int(seconds // scrape_every_s) + 1)]
        plan = sorted(
            [(t, "cpu") for t in edges] + [(t, "scrape") for t in scrape_at if t < last_scrape - 0.5]
            + [(last_scrape, "scrape")]
        )  # fmt: skip
        rss_peak, scrapes, cpu_samples = 0, [], []
        while plan:
            t, kind = plan[0]
            now = time.time()
            if now < t:
                if coord.poll() is not None:
                    raise BenchError(
                        f"the coordinator exited with code {coord.returncode}", hint=f"see {coord_log}"
                    )
                if now >= measure_from:
                    rss_peak = max(rss_peak, cp.memory_info().rss)
                time.sleep(min(0.25, t - now))
                continue
            plan.pop(0)
            if kind == "cpu":
                cpu_samples.append(cpu_sample())
            else:
                scrapes.append((now, parse_metrics(_scrape(metrics_port))))
        rss_end = cp.memory_info().rss
        threads = cp.num_threads()
        if job_info is not None:
            from protos.stanchion.v1 import operator_pb2, types_pb2

            j = operator.GetJob(operator_pb2.GetJobRequest(job_id=job_info["job_id"]), timeout=30.0).job
            job_info.update(
                state=types_pb2.JobState.Name(j.state),
                generation=j.generation,
                restarts=j.restarts,
                members=len(j.nodes),
                step=j.step,
                reason=j.reason[:200],
            )

        results = []
        for i, (p, log) in enumerate(clients):
            try:
                code = p.wait(timeout=max(30.0, RPC_TIMEOUT_S * 3))
            except subprocess.TimeoutExpired:
                raise BenchError(f"client {i} did not finish", hint=f"see {log}") from None
            if code != 0:
                raise BenchError(f"client {i} exited with code {code}: {_tail(log)}", hint=f"see {log}")
            results.append(json.loads((work_dir / f"client-{i}.json").read_text()))
        cpu_total = cp.cpu_times()
    finally:
        if op_channel is not None:
            op_channel.close()
        for p, _ in clients:
            _stop(p, 5.0)
        _stop(coord)

    # ---- aggregate ----
    samples = [x for r in results for x in r["samples"]]
    lat = [x[1] for x in samples]
    failures = merge_counts(r["failures"] for r in results)
    n_fail = sum(failures.values())
    ok = sum(r["ok"] for r in results)
    sent = sum(r["sent"] for r in results)
    offered_per_s = agents / interval_s
    achieved_per_s = ok / seconds
    (t_w0, c_w0, cl_w0, sys_w0), (t_w1, c_w1, cl_w1, sys_w1) = cpu_samples[0], cpu_samples[-1]
    window_s = t_w1 - t_w0
    coord_cpu_s = c_w1 - c_w0
    client_cpu_s = cl_w1 - cl_w0
    slices = slice_table(samples, cpu_samples, measure_from)
    ages_all = [a for _, s in scrapes for a in s["heartbeat_age_s"].values()]
    last = scrapes[-1][1]
    first_total = next((s["heartbeats_total"] for _, s in scrapes if s["heartbeats_total"] is not None), None)
    server_rate = None
    if first_total is not None and last["heartbeats_total"] is not None and scrapes[-1][0] > scrapes[0][0]:
        server_rate = (last["heartbeats_total"] - first_total) / (scrapes[-1][0] - scrapes[0][0])
    lat_d = distribution(lat)
    episodes = stall_episodes([(x[0], x[1]) for x in samples if x[1] > SLOW_MS], 0.0)
    age_last = distribution(list(last["heartbeat_age_s"].values()))
    age_all = distribution(ages_all)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = _busy_cores(sys_w0, sys_w1, window_s)
    coord_cores = coord_cpu_s / window_s if window_s > 0 else None
    client_cores = client_cpu_s / window_s if window_s > 0 else None
    return {
        "agents": agents,
        "tls": tls,
        "client_procs": client_procs,
        "load_average_1_5_15": {
            "at_start": [round(x, 2) for x in load_at_start],
            "at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "job": job_info,
        "p50_ms": lat_d["p50"],
        "p99_ms": lat_d["p99"],
        "max_ms": lat_d["max"],
        "failures": n_fail,
        "failures_by_code": failures,
        "latency_ms": lat_d,
        "heartbeats": {
            "offered_per_s": offered_per_s,
            "achieved_per_s": achieved_per_s,
            "achieved_over_offered": achieved_per_s / offered_per_s,
            "sent": sent,
            "ok": ok,
            "slower_than_interval": sum(r["over_interval"] for r in results),
            "coordinator_counted_per_s": server_rate,
            "events_relayed": sum(r["events"] for r in results),
            "directives_received_including_warmup": sum(r["directives"] for r in results),
            "replies_asking_for_a_shorter_interval": sum(r["fast_replies"] for r in results),
            "failures_including_warmup": merge_counts(r["failures_total"] for r in results),
            "reregistered": sum(r["reregistered"] for r in results),
            "failure_details": {
                code: merge_counts(r["failure_details"].get(code, {}) for r in results)
                for code in sorted({c for r in results for c in r["failure_details"]})
            },
            "failed_call_ms": distribution([x for r in results for x in r["failure_ms"]]),
        },
        "client_send_lateness_ms": distribution([x[2] for x in samples]),
        "slices": slices,
        "p99_ms_median_of_slices": median([x["p99_ms"] for x in slices if x["p99_ms"] is not None])
        if any(x["p99_ms"] is not None for x in slices)
        else None,
        "stalls": {
            "slow_ms": SLOW_MS,
            "slow_heartbeats": sum(e["heartbeats"] for e in episodes),
            "episodes": len(episodes),
            "worst": sorted(episodes, key=lambda e: -e["max_ms"])[:10],
            "scrapes_at_s": [t - measure_from for t, _ in scrapes],
            "sent_at_s": "seconds after the measured window opened",
        },
        "registration": {
            "wall_s": register_wall_s,
            "per_client_s": [r["register_s"] for r in results],
            "per_s": agents / register_wall_s if register_wall_s > 0 else None,
        },
        "coordinator": {
            "pid_threads": threads,
            "established_connections": connections,
            "cpu_s_window": coord_cpu_s,
            "cpu_cores_window": coord_cores,
            "cpu_ms_per_heartbeat": 1000 * coord_cpu_s / ok if ok else None,
            "cpu_s_total": cpu_total.user + cpu_total.system - cpu0.user - cpu0.system,
            "rss_mb_idle": rss_idle / 2**20,
            "rss_mb_peak": rss_peak / 2**20,
            "rss_mb_end": rss_end / 2**20,
            "heartbeat_age_s_last_scrape": age_last,
            "heartbeat_age_s_all_scrapes": age_all,
            "heartbeat_age_s_median_per_scrape": [
                median(s["heartbeat_age_s"].values()) if s["heartbeat_age_s"] else None for _, s in scrapes
            ],
            "scrapes": len(scrapes),
            "nodes_by_state": last["nodes"],
        },
        "cpu_competition": {
            "usable_cores": cores,
            "machine_busy_cores": busy,
            "coordinator_cores": coord_cores,
            "client_cores": client_cores,
            "other_cores": None
            if busy is None or coord_cores is None or client_cores is None
            else busy - coord_cores - client_cores,
        },
    }


POINT_SUMMARY_KEYS = ("agents", "tls", "p50_ms", "p99_ms", "max_ms", "failures", "failures_by_code")


def point_summary(point: Mapping[str, Any], interval_s: float) -> dict[str, Any]:
    """The figures of one point that a table of points needs, with its goals met or not."""
    hb, c, cc = point["heartbeats"], point["coordinator"], point["cpu_competition"]
    goals = point_goals(point, interval_s)
    return {
        **{k: point[k] for k in POINT_SUMMARY_KEYS},
        "p99_ms_median_of_slices": point["p99_ms_median_of_slices"],
        "achieved_per_s": hb["achieved_per_s"],
        "offered_per_s": hb["offered_per_s"],
        "coordinator_cores": c["cpu_cores_window"],
        "coordinator_cpu_ms_per_heartbeat": c["cpu_ms_per_heartbeat"],
        "coordinator_rss_mb_peak": c["rss_mb_peak"],
        "heartbeat_age_s_max": c["heartbeat_age_s_all_scrapes"]["max"],
        "nodes_lost": c["nodes_by_state"].get("lost"),
        "client_cores": cc["client_cores"],
        "other_cores": cc["other_cores"],
        "client_lateness_p99_ms": point["client_send_lateness_ms"]["p99"],
        "load_average_1_5_15": point["load_average_1_5_15"],
        "failure_details": hb["failure_details"],
        "failed_call_ms_p50": hb["failed_call_ms"]["p50"],
        "reregistered": hb["reregistered"],
        "job_state": point["job"]["state"] if point["job"] else None,
        "job_restarts": point["job"]["restarts"] if point["job"] else None,
        "goals_met": {g["goal"]: g["met"] for g in goals},
    }


def point_goals(point: Mapping[str, Any], interval_s: float) -> list[dict[str, Any]]:
    hb, c = point["heartbeats"], point["coordinator"]
    lost = c["nodes_by_state"].get("lost")
    return coordinator_goals(
        agents=point["agents"],
        interval_s=interval_s,
        p99_ms=point["p99_ms"],
        failures=point["failures"],
        achieved=hb["achieved_per_s"],
        offered=hb["offered_per_s"],
        lost=None if lost is None else int(lost),
        max_age_s=c["heartbeat_age_s_all_scrapes"]["max"],
    )


def plan_points(agents: Sequence[int], tls: bool, compare_insecure: bool) -> list[tuple[int, bool]]:
    """(agents, tls) of every point in order: each count over the chosen transport, then (with
    ``compare_insecure`` and TLS) the same count in plaintext. The first point is the headline."""
    out = []
    for n in agents:
        out.append((n, tls))
        if tls and compare_insecure:
            out.append((n, False))
    return out


def bench_coordinator(
    *,
    agents: Sequence[int],
    seconds: float,
    warmup_s: float,
    client_procs: int,
    tls: bool,
    interval_s: float,
    workers_per_node: int,
    event_rate: float,
    scrape_every_s: float,
    work_dir: Path,
    command: str,
    timeout_s: float,
    progress: Any,
    client_nice: int = 0,
    job: bool = True,
    compare_insecure: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Every point of :func:`plan_points`, one after the other; the JSON's results are the first
    (headline) point's, with every point summarised under ``points``."""
    from diagnostics.bench.common import envelope

    if not agents:
        raise ValueError("at least one agent count")
    load_at_start = list(os.getloadavg())
    points = []
    for n, point_tls in plan_points(agents, tls, compare_insecure):
        progress(f"--- {n} agents, {'mTLS' if point_tls else 'plaintext'}{', one job' if job else ''}")
        points.append(
            run_point(
                agents=n,
                seconds=seconds,
                warmup_s=warmup_s,
                client_procs=client_procs,
                tls=point_tls,
                interval_s=interval_s,
                workers_per_node=workers_per_node,
                event_rate=event_rate,
                scrape_every_s=scrape_every_s,
                work_dir=work_dir / f"{n}-{'tls' if point_tls else 'plaintext'}",
                timeout_s=timeout_s,
                progress=progress,
                client_nice=client_nice,
                job=job,
                seed=seed,
            )
        )
        p = points[-1]
        progress(
            f"  p50 {_ms(p['p50_ms'])}, p99 {_ms(p['p99_ms'])}, {p['failures']} failures, "
            f"{p['heartbeats']['achieved_per_s']:.0f}/{p['heartbeats']['offered_per_s']:.0f} heartbeats/s"
        )
    head = points[0]
    cores = head["cpu_competition"]["usable_cores"]
    settings = {
        "agents": list(agents),
        "seconds": seconds,
        "warmup_s": warmup_s,
        "client_procs": client_procs,
        "client_nice": client_nice,
        "agents_per_client": [len(s) for s in split(head["agents"], min(client_procs, head["agents"]))],
        "tls": tls,
        "compare_insecure": compare_insecure,
        "job": job,
        "interval_s": interval_s,
        "workers_per_node": workers_per_node,
        "event_rate": event_rate,
        "scrape_every_s": scrape_every_s,
        "slice_s": SLICE_S,
        "rpc_timeout_s": RPC_TIMEOUT_S,
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "shape": "unary Register, then unary Heartbeat at a fixed rate; directives piggybacked on replies",
        "connections": "one grpc.aio channel and one TCP connection per simulated agent (local subchannel pool)",
    }
    results = {**head, "points": [point_summary(p, interval_s) for p in points]}
    notes = [
        f"results are the first point ({head['agents']} agents, {'mTLS' if head['tls'] else 'plaintext'}); "
        "points summarises every point, each with a fresh coordinator, in the order run.",
        f"The coordinator and the {client_procs} client process(es) share this machine's {cores} usable "
        "core(s), and other jobs may run on it too: client-side latency includes the clients' own "
        "event-loop delays and the time the coordinator waited for a core (see cpu_competition, "
        "slices and client_send_lateness_ms).",
    ]
    return envelope(
        "coordinator",
        command,
        settings,
        results,
        point_goals(head, interval_s),
        notes,
        load_at_start,
        headline=("agents", "p50_ms", "p99_ms", "failures"),
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"
