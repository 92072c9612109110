"""The agent daemon: one per node.

It hosts the node's rendezvous TCPStore (used as MASTER_ADDR/PORT when the node is node rank 0, with
a key prefix per generation), keeps standby ranks warm, registers with the coordinator, heartbeats
(at once when something happened, every interval otherwise, fast while a recovery is under way),
applies directives in order and rejects stale ones, and relays what its ranks report. When the
coordinator is unreachable it keeps its ranks running and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import grpc

from agent.config import AgentConfig
from agent.workers import Worker, WorkerGroup
from protos import client
from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from stanchion import sdnotify
from stanchion.files import write_json_atomic
from stanchion.net import bind_grpc, bind_http
from stanchion.sdk import manifest
from stanchion.vocab import AgentEventKind, EventKind, ExitReason
from stanchion.waiting import Backoff

log = logging.getLogger(__name__)

MONITOR_S = 0.05
# `systemctl restart` sends this (the unit's RestartKillSignal): the agent exits and leaves its ranks
# training for the agent that starts next, which adopts them. SIGTERM (a stop) stops them.
HAND_OVER_SIGNAL = signal.SIGUSR2
MAX_EVENTS_PER_BEAT = 500


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.group = WorkerGroup(cfg)
        self.store: Any = None
        self.store_port = 0
        self.outbox: list[types_pb2.Event] = []
        self._event_seq = int(time.time() * 1000) * 1000  # increases across agent restarts
        self.acked = 0
        self.wake = asyncio.Event()
        self.interval_s = 1.0
        self.connected = False
        self.health: tuple[int, str] = (types_pb2.HEALTH_VERDICT_UNSPECIFIED, "")
        self.stopping = asyncio.Event()
        self.failed = False
        self.metrics_port = 0
        self.trial_runner: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._channel: grpc.aio.Channel | None = None
        self._stub: agent_pb2_grpc.AgentServiceStub | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._token = ""
        self.training_metrics = self.group.metrics
        self.health_backend: Any = None
        self.xid_watcher: Any = None

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from torch.distributed import TCPStore

        # The store outlives generations; each generation uses its own key prefix in it.
        self.store = TCPStore(self.cfg.host, 0, is_master=True, wait_for_workers=False, multi_tenant=True)
        self.store_port = self.store.port
        log.info("[node %s] rendezvous store on %s:%d", self.cfg.node_id, self.cfg.host, self.store_port)
        if self.cfg.token_file:
            self._token = Path(self.cfg.token_file).read_text().strip()
        self._channel = client.aio_channel(
            self.cfg.coordinator,
            tls_dir=self.cfg.tls_dir,
            role="agent",
            node_id=self.cfg.node_id,
            insecure=self.cfg.insecure,
            token=self._token if not self.cfg.insecure else "",
        )
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        from agent import health

        self.health_backend = health.open_backend()  # one line in the log when there is no driver
        if self.health_backend is not None:
            self.xid_watcher = health.XidWatcher(self.health_backend)
            self.xid_watcher.start()
        self._start_metrics()
        await self._start_health()
        self.group.adopt()  # ranks a previous agent of this node left running
        await self.group.ensure_standbys()
        from agent.trials import TrialRunner

        self.trial_runner = TrialRunner(self)
        self._tasks = [
            asyncio.create_task(self._monitor(), name="monitor"),
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        for t in self._tasks:
            t.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A core loop that dies takes the agent down (systemd or `stanchion up` restarts it) instead
        of leaving a node that looks alive but no longer heartbeats or watches its ranks."""
        if task.cancelled() or self.stopping.is_set():
            return
        log.critical(
            "[node %s] %s loop died: %r; stopping", self.cfg.node_id, task.get_name(), task.exception()
        )
        self.failed = True
        self.stopping.set()

    async def stop(self, *, hand_over: bool = False) -> None:
        """Stop serving. The node's ranks are stopped (SIGTERM: they checkpoint; SIGKILL after the
        grace) unless ``hand_over``: then they train on, for the next agent of this node to adopt."""
        sdnotify.stopping()
        self.stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if not hand_over:
            await self.group.shutdown(self.cfg.stop_grace_s)
        if self.trial_runner is not None:
            await self.trial_runner.shutdown()
        if self._health_server is not None:
            await self._health_server.stop(0.5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.xid_watcher is not None:
            self.xid_watcher.stop()
        if self.health_backend is not None:
            self.health_backend.close()
        if self._channel is not None:
            await self._channel.close()

    # -- events ----------------------------------------------------------------------------------
    def emit(
        self,
        kind: str,
        *,
        job_id: str = "",
        generation: int = 0,
        step: int = 0,
        rank: int = -1,
        suspect_ranks: list[int] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self._event_seq += 1
        self.outbox.append(
            types_pb2.Event(
                kind=kind,
                job_id=job_id,
                generation=max(generation, 0),
                step=max(step, 0),
                rank=rank,
                suspect_ranks=suspect_ranks or [],
                time=time.time(),
                detail_json=json.dumps(detail or {}, default=str),
                seq=self._event_seq,
                node_id=self.cfg.node_id,
            )
        )
        self.wake.set()

    async def _monitor(self) -> None:
        while not self.stopping.is_set():
            for kind, w, rec in self.group.poll():
                await self._relay(kind, w, rec)
            await self.group.reslot()
            if self.trial_runner is not None:
                self.trial_runner.poll()
            await asyncio.sleep(MONITOR_S)

    async def _relay(self, kind: str, w: Worker, rec: dict[str, Any]) -> None:
        detail = {
            k: v
            for k, v in rec.items()
            if k not in ("event", "rank", "generation", "step", "suspect_ranks", "t")
        }
        if kind == EventKind.CHECKPOINT_COMMITTED:
            v = await asyncio.to_thread(manifest.verify, rec.get("path", ""))
            detail.update(verified=v.ok, verify_reason=v.reason)
        if kind == AgentEventKind.WORKER_EXITED:
            log.warning(
                "[node %s] w%05d (rank %d) exited: %s", self.cfg.node_id, w.wid, w.rank, rec.get("summary")
            )
            if w.slot is None:
                await self.group.ensure_standbys()
                if rec.get("reason") != ExitReason.STANDBY_LOST:
                    return
        gen = rec.get("generation", w.generation)
        self.emit(
            kind,
            job_id=w.job_id,
            generation=gen if isinstance(gen, int) and gen >= 0 else max(w.generation, 0),
            step=int(rec.get("step", w.step) or 0),
            rank=w.rank,
            suspect_ranks=list(rec.get("suspect_ranks", [])),
            detail=detail,
        )

    # -- talking to the coordinator --------------------------------------------------------------
    def inventory(self) -> types_pb2.NodeInventory:
        import psutil

        from agent import health

        gpus = []
        backend = health.open_backend()
        if backend is not None:
            with backend:
                for g in backend.sample():
                    gpus.append(
                        types_pb2.GpuInfo(
                            index=g.index,
                            uuid=g.uuid,
                            name=g.name or "",
                            memory_total_bytes=int(g.memory_total_bytes or 0),
                        )
                    )
        from stanchion import __version__

        return types_pb2.NodeInventory(
            host=socket.gethostname(),
            addresses=[self.cfg.host],
            gpus=gpus,
            cpu_count=os.cpu_count() or 0,
            memory_total_bytes=psutil.virtual_memory().total,
            agent_version=__version__,
            workers=self.cfg.workers,
            spare=self.cfg.spare,
            store_port=self.store_port,
        )

    def _metadata(self) -> Any:
        return client.call_metadata(self._token, self.cfg.insecure)

    async def register(self) -> None:
        backoff = Backoff(0.1, self.cfg.max_backoff_s)
        inventory = await asyncio.to_thread(self.inventory)
        while not self.stopping.is_set():
            try:
                resp = await self._stub.Register(
                    agent_pb2.RegisterRequest(
                        node_id=self.cfg.node_id,
                        inventory=inventory,
                        job_id=self.group.job_id,
                        generation=max(self.group.generation, 0),
                        workers=self.group.statuses(),
                    ),
                    timeout=self.cfg.rpc_timeout_s,
                    metadata=self._metadata(),
                )
                self.interval_s = resp.heartbeat_interval_ms / 1000
                self.connected = True
                log.info("[node %s] registered with %s", self.cfg.node_id, self.cfg.coordinator)
                return
            except grpc.aio.AioRpcError as e:
                if not client.retryable(e.code()):
                    raise RuntimeError(
                        f"the coordinator refused registration: {e.code().name}: {e.details()}"
                    ) from None
                delay = backoff.next()
                log.warning(
                    "[node %s] cannot register (%s: %s); retrying in %.1fs",
                    self.cfg.node_id,
                    e.code().name,
                    e.details(),
                    delay,
                )
                await self._sleep(delay)

    async def _heartbeats(self) -> None:
        await self.register()
        backoff = Backoff(0.1, self.cfg.max_backoff_s)
        # Loops test `stopping` themselves: grpc.aio may turn a task cancellation into an RpcError.
        while not self.stopping.is_set():
            sent = self.outbox[:MAX_EVENTS_PER_BEAT]
            traces = self.trial_runner.pending_traces() if self.trial_runner else []
            req = agent_pb2.HeartbeatRequest(
                node_id=self.cfg.node_id,
                job_id=self.group.job_id,
                generation=max(self.group.generation, 0),
                workers=self.group.statuses(),
                last_step=self._last_step(),
                step_time_s=self._step_time(),
                events=sent,
                health=self.health[0],
                health_reason=self.health[1][:2000],
                acked_directive_seq=self.acked,
                traces=traces,
            )
            try:
                resp = await self._stub.Heartbeat(
                    req, timeout=self.cfg.rpc_timeout_s, metadata=self._metadata()
                )
            except grpc.aio.AioRpcError as e:
                self.connected = False
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "[node %s] coordinator does not know this node (%s): registering again",
                        self.cfg.node_id,
                        e.details(),
                    )
                    await self.register()
                    continue
                delay = backoff.next()
                log.warning(
                    "[node %s] heartbeat failed (%s); workers keep running; retry in %.1fs",
                    self.cfg.node_id,
                    e.code().name,
                    delay,
                )
                await self._sleep(delay)
                continue
            backoff.reset()
            self.connected = True
            del self.outbox[: len(sent)]
            if self.trial_runner:
                self.trial_runner.traces_sent(traces)
            for d in resp.directives:
                if d.seq > self.acked:
                    await self.apply(d)
                    self.acked = d.seq
            self.interval_s = max(resp.heartbeat_interval_ms / 1000, 0.01)
            if self.outbox:
                continue
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def _last_step(self) -> int:
        steps = [
            w.step
            for w in self.group.workers
            if w.alive
            and w.slot is not None
            and w.job_id == self.group.job_id
            and w.generation == self.group.generation
            and not w.stopping
        ]
        return max(steps, default=0)

    def _step_time(self) -> float:
        times = [w.median_step_s() for w in self.group.workers if w.alive and w.step_times]
        return max(times, default=0.0)

    # -- directives -------------------------------------------------------------------------------
    async def apply(self, d: agent_pb2.Directive) -> None:
        kind = d.WhichOneof("kind")
        stale = (
            d.job_id == self.group.job_id
            and d.generation < self.group.generation
            and kind in ("start", "rollback")
        )
        if kind == "start" and d.job_id == self.group.job_id and d.generation == self.group.generation:
            stale = True
        if stale:
            log.warning(
                "[node %s] rejecting stale %s directive for generation %d (current %d)",
                self.cfg.node_id,
                kind,
                d.generation,
                self.group.generation,
            )
            self.emit(
                AgentEventKind.STALE_DIRECTIVE,
                job_id=d.job_id,
                generation=d.generation,
                detail={"kind": kind, "current_generation": self.group.generation},
            )
            return
        log.info("[job %s gen %d node %s] directive %s", d.job_id, d.generation, self.cfg.node_id, kind)
        try:
            if kind == "start":
                await self.group.start_generation(d)
            elif kind == "stop":
                await self.group.stop_job_workers(
                    d.stop.reason, generation=d.generation, checkpoint=d.stop.checkpoint
                )
            elif kind == "rollback":
                self.group.rollback(d)
            elif kind == "mark":
                path = self.group.checkpoint_path(d.job_id, d.mark.path)
                if path and os.path.isdir(path):
                    manifest.mark_bad(path, d.mark.reason)
            elif kind == "trial":
                if self.trial_runner is None:
                    raise ValueError("this agent runs no diagnostic trials")
                await self.trial_runner.start(d)
        except ValueError as e:  # a directive this node refuses (for example a path outside its directories)
            log.error("[node %s] refused %s directive: %s", self.cfg.node_id, kind, e)
            self.emit(
                AgentEventKind.DIRECTIVE_REJECTED,
                job_id=d.job_id,
                generation=d.generation,
                detail={"kind": kind, "error": str(e)},
            )
        except Exception as e:  # noqa: BLE001 - report it and keep heartbeating; never wedge the node
            log.exception("[node %s] %s directive failed", self.cfg.node_id, kind)
            self.emit(
                AgentEventKind.DIRECTIVE_FAILED,
                job_id=d.job_id,
                generation=d.generation,
                detail={"kind": kind, "error": f"{type(e).__name__}: {e}"},
            )

    # -- health, metrics --------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        from agent import health

        dirs = [self.cfg.run_root]
        while not self.stopping.is_set():
            result = await health.assess_async(self.health_backend, dirs, self.xid_watcher)
            verdict = {
                "healthy": types_pb2.HEALTH_VERDICT_HEALTHY,
                "degraded": types_pb2.HEALTH_VERDICT_DEGRADED,
                "unhealthy": types_pb2.HEALTH_VERDICT_UNHEALTHY,
            }[result.verdict]
            if (verdict, result.reason) != self.health:
                if (
                    self.health[0] != types_pb2.HEALTH_VERDICT_UNSPECIFIED
                    or verdict != types_pb2.HEALTH_VERDICT_HEALTHY
                ):
                    self.emit(
                        AgentEventKind.HEALTH, detail={"verdict": result.verdict, "reason": result.reason}
                    )
                self.health = (verdict, result.reason)
            sdnotify.watchdog()  # this loop does real work each round: a wedged agent stops pinging
            await asyncio.sleep(min(self.cfg.health_interval_s, (sdnotify.watchdog_interval_s() or 1e9)))

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port < 0:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        from agent.health_collector import HealthCollector
        from agent.metrics import AgentCollector

        registry = CollectorRegistry(auto_describe=True)
        registry.register(AgentCollector(self))
        registry.register(HealthCollector(self.health_backend, self.xid_watcher, [self.cfg.run_root]))
        self._metrics_server, _ = bind_http(
            lambda: start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_addr, registry=registry),
            "--metrics-port",
            f"{self.cfg.metrics_addr}:{self.cfg.metrics_port}",
        )
        self.metrics_port = self._metrics_server.server_port

    async def _start_health(self) -> None:
        if not self.cfg.health_port:
            return
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._health_server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._health_server)
        addr = f"{self.cfg.metrics_addr}:{self.cfg.health_port}"
        bind_grpc(lambda: self._health_server.add_insecure_port(addr), "--health-port", addr)
        await self._health_server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)


async def serve(cfg: AgentConfig, *, port_file: str = "") -> None:
    sdnotify.enable_faulthandler()
    agent = Agent(cfg)
    stop = asyncio.Event()
    asked: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, HAND_OVER_SIGNAL):
        loop.add_signal_handler(sig, lambda sig=sig: (asked.append(sig), stop.set()))
    await agent.start()
    forward = asyncio.create_task(_forward(agent.stopping, stop))
    if port_file:
        write_json_atomic(
            port_file,
            {"metrics_port": agent.metrics_port, "store_port": agent.store_port, "pid": os.getpid()},
        )
    sdnotify.ready()
    await stop.wait()
    # A restart (the hand-over signal) or a failure of the agent itself (systemd restarts it) leaves
    # the ranks training for the next agent, when ranks may outlive this one; a stop stops them.
    hand_over = cfg.orphan_grace_s > 0 and (HAND_OVER_SIGNAL in asked or agent.failed)
    if hand_over:
        log.info(
            "[node %s] restarting: %d ranks train on, for the next agent to adopt within %.0fs",
            cfg.node_id,
            sum(w.alive for w in agent.group.workers),
            cfg.orphan_grace_s,
        )
    else:
        log.info(
            "[node %s] stopping: SIGTERM to ranks, up to %.0fs for their checkpoints",
            cfg.node_id,
            cfg.stop_grace_s,
        )
    await agent.stop(hand_over=hand_over)
    forward.cancel()
    if agent.failed:
        raise SystemExit(1)


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
