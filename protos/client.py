"""Client conventions for the stanchion.v1 API: keepalive that agrees with the server, retries
only for idempotent calls, deadlines on every call, and credentials.

Used by the agent and by every CLI command that talks to a coordinator.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

# Agrees with coordinator/server.py: the server accepts pings down to every 10 s.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Retried on UNAVAILABLE only, and only where repeating is harmless: registration and heartbeats
# (events carry sequence numbers), reads, cordon/uncordon, and submits (which carry a request id).
IDEMPOTENT = {
    "stanchion.v1.AgentService": ["Register", "Heartbeat"],
    "stanchion.v1.OperatorService": [
        "SubmitJob",
        "GetJob",
        "ListJobs",
        "ExplainJob",
        "ListNodes",
        "CordonNode",
        "UncordonNode",
        "ListCheckpoints",
        "GetBisection",
    ],
}
# Beyond gRPC's own retries: a caller that keeps trying until the coordinator answers (an agent
# registering, a heartbeat) gives up only on these, which no retry can change.
PERMANENT = frozenset(
    {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT}
)


def retryable(code: grpc.StatusCode) -> bool:
    """Whether a call that failed with ``code`` is worth repeating after a backoff."""
    return code not in PERMANENT


SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": svc, "method": meth} for svc, meths in IDEMPOTENT.items() for meth in meths
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        *KEEPALIVE,
        # gRPC's reconnect backoff grows to 120 s by default: an agent would then find a restarted
        # coordinator long after the coordinator's reconcile grace. Cap it at 2 s.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def aio_channel(
    target: str,
    *,
    tls_dir: str = "",
    role: str = "operator",
    node_id: str | None = None,
    insecure: bool = False,
    token: str = "",
) -> grpc.aio.Channel:
    """An asyncio channel to a coordinator: mTLS from ``tls_dir``, or TLS plus a bearer token, unless
    ``insecure``. The credential builders live in coordinator/auth.py, the one module that knows the
    certificate layout."""
    if insecure:
        return grpc.aio.insecure_channel(target, options=channel_options())
    from stanchion.tls import channel_credentials, token_channel_credentials

    # A token replaces the client certificate (the coordinator's token port has server-only TLS).
    creds = (
        token_channel_credentials(tls_dir, token) if token else channel_credentials(tls_dir, role, node_id)
    )
    return grpc.aio.secure_channel(target, creds, options=channel_options())


def channel(
    target: str,
    *,
    tls_dir: str = "",
    role: str = "operator",
    node_id: str | None = None,
    insecure: bool = False,
    token: str = "",
) -> grpc.Channel:
    """The blocking twin of :func:`aio_channel` (scripts, tests, `stanchion up`'s watcher)."""
    if insecure:
        return grpc.insecure_channel(target, options=channel_options())
    from stanchion.tls import channel_credentials, token_channel_credentials

    creds = (
        token_channel_credentials(tls_dir, token) if token else channel_credentials(tls_dir, role, node_id)
    )
    return grpc.secure_channel(target, creds, options=channel_options())


def call_metadata(token: str, insecure: bool) -> tuple[tuple[str, str], ...] | None:
    """Bearer tokens ride in call credentials over TLS; over plaintext they must be explicit metadata."""
    if token and insecure:
        return (("authorization", f"Bearer {token}"),)
    return None
