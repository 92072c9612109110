"""How the coordinator daemon runs (not what it trains: that is the job spec).

Defaults < TOML file (``--config``) < ``STANCHION_*`` environment < CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from stanchion.settings import option, require


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str = option("127.0.0.1:50051", "gRPC address HOST:PORT.")
    state_db: str = option("stanchion-coordinator.db", "SQLite state file (created if missing).")
    metrics_port: int = option(-1, "Prometheus port (-1: off, 0: any free port).")
    metrics_addr: str = option("127.0.0.1", "Address the metrics endpoint binds.")
    health_port: int = option(0, "Plaintext grpc.health.v1 port for probes (0: off).")
    tls_dir: str = option("", "mTLS directory (stanchion certs init).")
    insecure: bool = option(False, "Plaintext gRPC: for local experiments only.")
    token_file: str = option("", "Hashed bearer tokens (docs/security.md).")
    token_listen: str = option(
        "",
        "A second address with server-only TLS whose callers authenticate with bearer tokens (needs --tls-dir and --token-file).",
    )
    heartbeat_interval_s: float = 1.0
    heartbeat_fast_s: float = 0.05  # nodes in a recovery poll this often
    heartbeat_timeout_s: float = option(10.0, "A node whose last heartbeat is older is lost.")
    tick_s: float = 0.2
    register_rate_per_s: float = 200.0
    register_burst: int = 2000
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        require(
            bool(sep) and bool(host) and port.isdigit() and 0 <= int(port) < 65536,
            "listen",
            "expected HOST:PORT",
        )
        require(
            -1 <= self.metrics_port < 65536,
            "metrics_port",
            "must be a port number (-1: off, 0: any free port)",
        )
        require(0 <= self.health_port < 65536, "health_port", "must be a port number (0: off)")
        require(
            self.insecure or bool(self.tls_dir),
            "tls_dir",
            "TLS is the default: pass --tls-dir DIR (see `stanchion certs init`), or --insecure for plaintext",
        )
        require(
            not self.token_listen or (bool(self.tls_dir) and bool(self.token_file)),
            "token_listen",
            "needs tls_dir (the server certificate) and token_file",
        )
        require(
            0.01 <= self.heartbeat_interval_s <= 60, "heartbeat_interval_s", "must be between 0.01 and 60"
        )
        require(
            0.01 <= self.heartbeat_fast_s <= self.heartbeat_interval_s,
            "heartbeat_fast_s",
            "must be between 0.01 and heartbeat_interval_s",
        )
        require(
            self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s,
            "heartbeat_timeout_s",
            "must exceed twice heartbeat_interval_s",
        )
        require(0.01 <= self.tick_s <= 5, "tick_s", "must be between 0.01 and 5")
        require(
            self.register_rate_per_s > 0 and self.register_burst >= 1, "register_rate_per_s", "must be > 0"
        )
        require(
            1024 <= self.max_message_bytes <= 256 * 1024 * 1024, "max_message_bytes", "must be 1 KiB..256 MiB"
        )
