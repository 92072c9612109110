"""Building and serving the coordinator: gRPC (agent and operator services, the standard health
service), the Prometheus endpoint, and systemd readiness.

``build`` binds everything and returns a handle (tests bind port 0 and read the real port);
``serve`` runs until a signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.config import CoordinatorConfig
from coordinator.controller import Controller
from coordinator.service import AgentService, OperatorService
from coordinator.store import Store
from protos.stanchion.v1 import agent_pb2_grpc, operator_pb2_grpc
from stanchion import sdnotify
from stanchion.net import bind_grpc
from stanchion.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAMES = ("stanchion.v1.AgentService", "stanchion.v1.OperatorService")

# Keepalive that agrees with the clients' (common/channels.py): clients ping every 30 s, the server
# accepts pings down to every 10 s, so no GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    controller: Controller
    store: Store
    health: health.aio.HealthServicer
    metrics_port: int = 0
    health_server: grpc.aio.Server | None = None
    metrics_server: Any = None
    bisector: Any = None
    token_port: int = 0

    async def stop(self, grace: float = 2.0) -> None:
        sdnotify.stopping()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)
        await self.controller.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.store.close()


async def build(cfg: CoordinatorConfig) -> Running:
    from coordinator import auth

    store = Store(cfg.state_db)
    controller = Controller(cfg, store)
    controller.load()
    options = [
        *SERVER_OPTIONS,
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    tokens = auth.TokenStore.load(cfg.token_file) if cfg.token_file else None
    interceptor = auth.AuthInterceptor(tokens=tokens, insecure=cfg.insecure)
    server = grpc.aio.server(options=options, interceptors=[interceptor])
    limiter = auth.RateLimiter(cfg.register_rate_per_s, cfg.register_burst)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentService(controller, limiter=limiter, authorize=auth.require_node), server
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(OperatorService(controller), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if cfg.insecure:
        port = bind_grpc(lambda: server.add_insecure_port(cfg.listen), "--listen", cfg.listen)
    else:
        creds = server_credentials(cfg.tls_dir)
        port = bind_grpc(lambda: server.add_secure_port(cfg.listen, creds), "--listen", cfg.listen)
    token_port = 0
    if cfg.token_listen:
        token_creds = server_credentials(cfg.tls_dir, require_client_cert=False)
        token_port = bind_grpc(
            lambda: server.add_secure_port(cfg.token_listen, token_creds), "--token-listen", cfg.token_listen
        )
    health_server = None
    if cfg.health_port:
        # Kubelet probes cannot present client certificates: a plaintext port that serves health only.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_addr = f"{cfg.listen.rpartition(':')[0]}:{cfg.health_port}"
        bind_grpc(lambda: health_server.add_insecure_port(health_addr), "--health-port", health_addr)
    from coordinator.bisection.runner import Bisector

    bisector = Bisector(controller)
    controller.bisector = bisector
    metrics_server, metrics_port = None, 0
    if cfg.metrics_port >= 0:
        from coordinator.metrics import start_metrics

        metrics_server, metrics_port = start_metrics(controller, cfg.metrics_addr, cfg.metrics_port)
    await server.start()
    if health_server is not None:
        await health_server.start()
    await controller.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "coordinator serving on port %d (%s), metrics on %d",
        port,
        "plaintext" if cfg.insecure else "mTLS",
        metrics_port,
    )
    running = Running(
        server,
        port,
        controller,
        store,
        health_servicer,
        metrics_port,
        health_server,
        metrics_server,
        bisector,
    )
    running.token_port = token_port
    return running


async def serve(cfg: CoordinatorConfig, *, port_file: str = "") -> None:
    sdnotify.enable_faulthandler()
    running = await build(cfg)
    if port_file:
        from stanchion.files import write_json_atomic

        write_json_atomic(
            port_file,
            {"port": running.port, "metrics_port": running.metrics_port, "token_port": running.token_port},
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sdnotify.ready()
    interval = sdnotify.watchdog_interval_s()
    watchdog = asyncio.create_task(_watchdog(running.controller, interval)) if interval else None
    await stop.wait()
    log.info("coordinator stopping")
    if watchdog is not None:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    await running.stop()


async def _watchdog(controller: Controller, interval: float) -> None:
    """Ping systemd only while the controller actually processes work (a hung loop stops pinging)."""
    while True:
        await controller.submit("noop")
        sdnotify.watchdog()
        await asyncio.sleep(interval)
