"""The coordinator's gate: real grpc.aio servers on 127.0.0.1:0 with TLS from `init_pki`, the
AuthInterceptor, the health service and minimal Operator/Agent servicers that record every call
they receive. Each refusal asserts its exact status code and that no handler was reached.

What a refused client sees depends on the server's mode (see coordinator/auth.py):
- mTLS (``require_client_cert=True``, the default): no certificate, a certificate from another CA and
  plaintext all fail the TLS handshake, and grpc reports a failed connection as UNAVAILABLE;
- token mode (server-only TLS): grpc does not ask for client certificates, so a caller without a
  valid bearer token gets UNAUTHENTICATED from the interceptor.
Authenticated callers that overstep get PERMISSION_DENIED in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator import auth
from coordinator.auth import (
    POLICY,
    AuthInterceptor,
    RateLimiter,
    TokenFileError,
    TokenStore,
    current_identity,
    hash_token,
    require_node,
    token_line,
)
from diagnostics.certs import init_pki
from protos.stanchion.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc, types_pb2
from stanchion.identity import ANONYMOUS, Identity, identity_from_auth_context
from stanchion.tls import TlsConfigError, channel_credentials, server_credentials, token_channel_credentials

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

OPERATOR_TOKEN = "stn_operator-token-0123456789abcdef"
READER_TOKEN = "stn_reader-token-0123456789abcdef"
AGENT_A_TOKEN = "stn_agent-a-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "tls"
    init_pki(d, node_ids=["node-a", "node-b"])
    return d


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA that issues the same file names and identities."""
    d = tmp_path_factory.mktemp("other") / "tls"
    init_pki(d, node_ids=["node-a"])
    return d


def token_store() -> TokenStore:
    store = TokenStore()
    store.add(OPERATOR_TOKEN, "operator", "alice")
    store.add(READER_TOKEN, "reader", "grafana")
    store.add(AGENT_A_TOKEN, "agent", "node-a")
    return store


# --- a tiny coordinator -----------------------------------------------------------------------


class Operator(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, reached: list[tuple[str, Identity]]):
        self.reached = reached

    async def SubmitJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.reached.append(("SubmitJob", current_identity(context)))
        return operator_pb2.SubmitJobResponse(job=types_pb2.Job(job_id="job-1"))

    async def ListJobs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.reached.append(("ListJobs", current_identity(context)))
        return operator_pb2.ListJobsResponse()

    async def StreamEvents(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.reached.append(("StreamEvents", current_identity(context)))
        for seq in (1, 2):
            yield operator_pb2.StreamEventsResponse(event=types_pb2.Event(kind="hang"), seq=seq)


class Agent(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, reached: list[tuple[str, Identity]]):
        self.reached = reached

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.reached.append(("Register", await require_node(context, request.node_id)))
        return agent_pb2.RegisterResponse(heartbeat_interval_ms=1000)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.reached.append(("Heartbeat", await require_node(context, request.node_id)))
        return agent_pb2.HeartbeatResponse()


@dataclass
class Running:
    port: int
    reached: list[tuple[str, Identity]] = field(default_factory=list)

    def methods(self) -> list[str]:
        return [m for m, _ in self.reached]


@contextlib.asynccontextmanager
async def serving(
    pki: Path | None,
    *,
    require_client_cert: bool = True,
    tokens: TokenStore | None = None,
    insecure: bool = False,
) -> AsyncIterator[Running]:
    """A server with the interceptor: TLS from ``pki``, or plaintext when ``pki`` is None."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens=tokens, insecure=insecure)])
    reached: list[tuple[str, Identity]] = []
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(Operator(reached), server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(Agent(reached), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if pki is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port(
            "127.0.0.1:0", server_credentials(pki, require_client_cert=require_client_cert)
        )
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield Running(port, reached)
    finally:
        await server.stop(None)


REQUESTS: dict[str, tuple[str, Any]] = {
    "SubmitJob": ("operator", operator_pb2.SubmitJobRequest(spec_toml="", request_id="r1")),
    "ListJobs": ("operator", operator_pb2.ListJobsRequest()),
    "StreamEvents": ("operator", operator_pb2.StreamEventsRequest()),
    "Register": ("agent", agent_pb2.RegisterRequest(node_id="node-a")),
    "Heartbeat": ("agent", agent_pb2.HeartbeatRequest(node_id="node-a")),
}


async def call(
    port: int,
    creds: grpc.ChannelCredentials | None,
    rpc: str,
    request: Any = None,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> tuple[grpc.StatusCode, Any]:
    """(status, response) of one call; a streaming response is collected into a list."""
    service, default = REQUESTS[rpc]
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
    async with channel:
        stub: Any = (
            operator_pb2_grpc.OperatorServiceStub(channel)
            if service == "operator"
            else agent_pb2_grpc.AgentServiceStub(channel)
        )
        method = getattr(stub, rpc)
        try:
            if rpc == "StreamEvents":
                return OK, [r async for r in method(request or default, timeout=5, metadata=metadata)]
            return OK, await method(request or default, timeout=5, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()


def heartbeat(node_id: str) -> Any:
    return agent_pb2.HeartbeatRequest(node_id=node_id)


# --- policy -----------------------------------------------------------------------------------


def test_policy_covers_every_method_of_both_services() -> None:
    expected = {
        f"/{svc.full_name}/{m.name}"
        for file in (operator_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR)
        for svc in file.services_by_name.values()
        for m in svc.methods
    }
    assert set(POLICY) == expected
    mutating = {"SubmitJob", "CancelJob", "CordonNode", "UncordonNode", "DrainNode", "StartBisection"}
    for method, roles in POLICY.items():
        short = method.rsplit("/", 1)[1]
        if method.startswith("/stanchion.v1.AgentService/"):
            assert roles == {"agent"}, method
        elif short in mutating:
            assert roles == {"operator"}, method
        else:
            assert roles == {"operator", "reader"}, method


def test_a_method_without_policy_fails_the_build() -> None:
    rules = dict(auth._RULES)
    del rules[("AgentService", "Heartbeat")]
    with pytest.raises(RuntimeError, match=r"no policy for /stanchion.v1.AgentService/Heartbeat"):
        auth._build_policy((operator_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR), rules)
    rules = {**auth._RULES, ("AgentService", "Retired"): frozenset({"agent"})}
    with pytest.raises(RuntimeError, match=r"unknown methods AgentService/Retired"):
        auth._build_policy((operator_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR), rules)


# --- mTLS -------------------------------------------------------------------------------------


def test_operator_certificate_may_submit(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki) as srv:
            code, reply = await call(srv.port, channel_credentials(pki, "operator"), "SubmitJob")
            assert code == OK and reply.job.job_id == "job-1"
            assert srv.reached == [("SubmitJob", Identity("operator", "operator", "mtls"))]

    asyncio.run(main())


def test_reader_certificate_reads_but_may_not_submit(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki) as srv:
            creds = channel_credentials(pki, "reader")
            assert (await call(srv.port, creds, "ListJobs"))[0] == OK
            code, details = await call(srv.port, creds, "SubmitJob")
            assert code == PERMISSION_DENIED and "reader" in details
            assert srv.methods() == ["ListJobs"]

    asyncio.run(main())


def test_agent_certificate_acts_only_for_its_own_node(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki) as srv:
            creds = channel_credentials(pki, "agent", "node-a")
            assert (await call(srv.port, creds, "Heartbeat", heartbeat("node-a")))[0] == OK
            code, details = await call(srv.port, creds, "Heartbeat", heartbeat("node-b"))
            assert code == PERMISSION_DENIED and "node-b" in details
            code, _ = await call(srv.port, creds, "Register", agent_pb2.RegisterRequest(node_id="node-b"))
            assert code == PERMISSION_DENIED
            assert srv.reached == [("Heartbeat", Identity("agent", "node-a", "mtls"))]

    asyncio.run(main())


def test_roles_stay_on_their_own_side(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki) as srv:
            agent = channel_credentials(pki, "agent", "node-a")
            for rpc in ("SubmitJob", "ListJobs", "StreamEvents"):
                assert (await call(srv.port, agent, rpc))[0] == PERMISSION_DENIED, rpc
            operator = channel_credentials(pki, "operator")
            for rpc in ("Register", "Heartbeat"):
                assert (await call(srv.port, operator, rpc))[0] == PERMISSION_DENIED, rpc
            # The coordinator's own certificate is valid for client auth but grants no RPC.
            coordinator = channel_credentials(pki, "coordinator")
            assert (await call(srv.port, coordinator, "ListJobs"))[0] == PERMISSION_DENIED
            assert srv.reached == []

    asyncio.run(main())


def test_stream_events_is_protected_too(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki) as srv:
            code, events = await call(srv.port, channel_credentials(pki, "reader"), "StreamEvents")
            assert code == OK and [e.seq for e in events] == [1, 2]
            code, _ = await call(srv.port, channel_credentials(pki, "agent", "node-b"), "StreamEvents")
            assert code == PERMISSION_DENIED
            assert srv.reached == [("StreamEvents", Identity("reader", "reader", "mtls"))]

    asyncio.run(main())


def test_no_certificate_foreign_ca_and_plaintext_fail_the_handshake(pki: Path, other_pki: Path) -> None:
    """With client certificates required, these callers never get a gRPC connection. grpc reports a
    failed TLS handshake as UNAVAILABLE: no request is parsed and no handler (or interceptor) runs."""

    async def main() -> None:
        async with serving(pki) as srv:
            callers: dict[str, grpc.ChannelCredentials | None] = {
                "no certificate": grpc.ssl_channel_credentials(
                    root_certificates=(pki / "ca.pem").read_bytes()
                ),
                "no certificate, valid token": token_channel_credentials(pki, OPERATOR_TOKEN),
                "certificate from another CA": grpc.ssl_channel_credentials(
                    root_certificates=(pki / "ca.pem").read_bytes(),
                    private_key=(other_pki / "operator-key.pem").read_bytes(),
                    certificate_chain=(other_pki / "operator.pem").read_bytes(),
                ),
                "plaintext": None,
            }
            for name, creds in callers.items():
                for rpc in ("SubmitJob", "Heartbeat"):
                    code, _ = await call(srv.port, creds, rpc)
                    assert code == UNAVAILABLE, (name, rpc, code)
            assert srv.reached == []

    asyncio.run(main())


def test_client_refuses_a_coordinator_from_another_ca(pki: Path, other_pki: Path) -> None:
    async def main() -> None:
        async with serving(other_pki) as srv:
            code, _ = await call(srv.port, channel_credentials(pki, "operator"), "SubmitJob")
            assert code == UNAVAILABLE and srv.reached == []

    asyncio.run(main())


async def health_status(port: int, creds: grpc.ChannelCredentials) -> Any:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def test_health_needs_no_role(pki: Path) -> None:
    """Health stays open to anyone who gets a connection. In mTLS mode that still takes a certificate
    from the CA (docs/security.md: probes use a separate health-only listener or exec probes)."""
    serving_status = health_pb2.HealthCheckResponse.SERVING

    async def main() -> None:
        # mTLS: the coordinator's own certificate grants no RPC, yet may ask for health.
        async with serving(pki) as srv:
            assert await health_status(srv.port, channel_credentials(pki, "coordinator")) == serving_status
        # Token mode: no token at all.
        async with serving(pki, require_client_cert=False, tokens=token_store()) as srv:
            ca_only = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
            assert await health_status(srv.port, ca_only) == serving_status
        # An --insecure server with tokens: plaintext, no token.
        async with (
            serving(None, insecure=True, tokens=token_store()) as srv,
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch,
        ):
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == serving_status

    asyncio.run(main())


# --- bearer tokens ----------------------------------------------------------------------------


def test_tokens_on_a_server_only_tls_port(pki: Path, other_pki: Path) -> None:
    async def main() -> None:
        async with serving(pki, require_client_cert=False, tokens=token_store()) as srv:
            ca_only = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())

            def tok(token: str) -> grpc.ChannelCredentials:
                return token_channel_credentials(pki, token)

            assert (await call(srv.port, tok(OPERATOR_TOKEN), "SubmitJob"))[0] == OK
            assert (await call(srv.port, tok(READER_TOKEN), "ListJobs"))[0] == OK
            assert (await call(srv.port, tok(AGENT_A_TOKEN), "Heartbeat", heartbeat("node-a")))[0] == OK
            expected = [
                ("SubmitJob", Identity("operator", "alice", "token")),
                ("ListJobs", Identity("reader", "grafana", "token")),
                ("Heartbeat", Identity("agent", "node-a", "token")),
            ]
            assert srv.reached == expected

            refusals = [
                ("no token", ca_only, "SubmitJob", None, UNAUTHENTICATED),
                ("unknown token", tok("stn_not-a-known-token-at-all"), "ListJobs", None, UNAUTHENTICATED),
                (
                    "not a bearer header",
                    ca_only,
                    "ListJobs",
                    [("authorization", f"Basic {OPERATOR_TOKEN}")],
                    UNAUTHENTICATED,
                ),
                ("no token on the stream", ca_only, "StreamEvents", None, UNAUTHENTICATED),
                ("reader submits", tok(READER_TOKEN), "SubmitJob", None, PERMISSION_DENIED),
                (
                    "agent token, other node",
                    tok(AGENT_A_TOKEN),
                    "Heartbeat",
                    heartbeat("node-b"),
                    PERMISSION_DENIED,
                ),
                ("agent token, operator RPC", tok(AGENT_A_TOKEN), "ListJobs", None, PERMISSION_DENIED),
                ("operator token, agent RPC", tok(OPERATOR_TOKEN), "Heartbeat", None, PERMISSION_DENIED),
                # grpc does not ask for client certificates in this mode: a certificate proves nothing.
                (
                    "certificate, no token",
                    channel_credentials(pki, "operator"),
                    "SubmitJob",
                    None,
                    UNAUTHENTICATED,
                ),
                (
                    "client trusts another CA",
                    channel_credentials(other_pki, "operator"),
                    "SubmitJob",
                    None,
                    UNAVAILABLE,
                ),
            ]
            for name, creds, rpc, extra, want in refusals:
                request = extra if not isinstance(extra, list) else None
                metadata = extra if isinstance(extra, list) else None
                code, _ = await call(srv.port, creds, rpc, request, metadata)
                assert code == want, (name, code)
            assert srv.reached == expected  # no refused call reached a handler

    asyncio.run(main())


def test_replacing_the_token_store_revokes_a_token(pki: Path) -> None:
    async def main() -> None:
        interceptor = AuthInterceptor(tokens=token_store())
        server = grpc.aio.server(interceptors=[interceptor])
        reached: list[tuple[str, Identity]] = []
        operator_pb2_grpc.add_OperatorServiceServicer_to_server(Operator(reached), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(pki, require_client_cert=False))
        await server.start()
        try:
            creds = token_channel_credentials(pki, READER_TOKEN)
            assert (await call(port, creds, "ListJobs"))[0] == OK
            fresh = TokenStore()
            fresh.add(OPERATOR_TOKEN, "operator", "alice")  # the reader token is gone
            interceptor.replace_tokens(fresh)
            assert (await call(port, creds, "ListJobs"))[0] == UNAUTHENTICATED
            assert [m for m, _ in reached] == ["ListJobs"]
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_certificate_wins_over_a_token(pki: Path) -> None:
    async def main() -> None:
        async with serving(pki, tokens=token_store()) as srv:
            creds = channel_credentials(pki, "reader")
            code, _ = await call(
                srv.port, creds, "SubmitJob", metadata=[("authorization", f"Bearer {OPERATOR_TOKEN}")]
            )
            assert code == PERMISSION_DENIED and srv.reached == []

    asyncio.run(main())


# --- plaintext --------------------------------------------------------------------------------


def test_insecure_without_tokens_lets_everyone_in(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving(None, insecure=True) as srv:
            assert (await call(srv.port, None, "SubmitJob"))[0] == OK
            assert (await call(srv.port, None, "Heartbeat", heartbeat("node-b")))[0] == OK
            assert srv.reached == [("SubmitJob", ANONYMOUS), ("Heartbeat", ANONYMOUS)]

    with caplog.at_level(logging.WARNING, logger="coordinator.auth"):
        asyncio.run(main())
    assert "AUTHENTICATION IS OFF" in caplog.text


def test_insecure_with_tokens_still_demands_them() -> None:
    async def main() -> None:
        async with serving(None, insecure=True, tokens=token_store()) as srv:
            assert (await call(srv.port, None, "SubmitJob"))[0] == UNAUTHENTICATED
            meta = auth.token_metadata(READER_TOKEN)
            assert (await call(srv.port, None, "SubmitJob", metadata=meta))[0] == PERMISSION_DENIED
            assert (await call(srv.port, None, "ListJobs", metadata=meta))[0] == OK
            assert srv.methods() == ["ListJobs"]

    asyncio.run(main())


def test_a_secure_interceptor_refuses_plaintext_calls() -> None:
    """Defence in depth: an interceptor not built with insecure=True refuses non-TLS calls, token or not."""

    async def main() -> None:
        async with serving(None, tokens=token_store()) as srv:
            meta = auth.token_metadata(OPERATOR_TOKEN)
            code, details = await call(srv.port, None, "SubmitJob", metadata=meta)
            assert code == UNAUTHENTICATED and "TLS" in details and srv.reached == []

    asyncio.run(main())


# --- pieces -----------------------------------------------------------------------------------


def ssl_context(*uris: str) -> dict[str, list[bytes]]:
    return {"transport_security_type": [b"ssl"], "peer_uri": [u.encode() for u in uris]}


def test_identity_from_auth_context() -> None:
    assert identity_from_auth_context(ssl_context("spiffe://stanchion/agent/node-3")) == Identity(
        "agent", "node-3", "mtls"
    )
    # Other URIs are ignored; a second Stanchion identity makes the certificate ambiguous.
    assert identity_from_auth_context(
        ssl_context("https://example.com/x", "spiffe://stanchion/reader/r")
    ) == Identity("reader", "r", "mtls")
    assert (
        identity_from_auth_context(
            ssl_context("spiffe://stanchion/reader/r", "spiffe://stanchion/operator/o")
        )
        is None
    )
    for bad in (
        "spiffe://other/operator/o",  # another trust domain
        "spiffe://stanchion/root/o",  # not a role
        "spiffe://stanchion/operator/o/extra",
        "spiffe://stanchion/operator/",
        "spiffe://stanchion/agent/../x",
    ):
        assert identity_from_auth_context(ssl_context(bad)) is None, bad
    assert identity_from_auth_context({"peer_uri": [b"spiffe://stanchion/operator/o"]}) is None  # not TLS
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context(
        ssl_context("spiffe://corp/operator/o"), trust_domain="corp"
    ) == Identity("operator", "o", "mtls")


def test_token_store_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# Stanchion tokens\n"
        f"{token_line(OPERATOR_TOKEN, 'operator', 'alice')}\n"
        "\n"
        f"{hash_token(AGENT_A_TOKEN)}  agent  node-a   # node a\n"
    )
    store = TokenStore.load(path)
    assert len(store) == 2
    assert store.verify(OPERATOR_TOKEN) == Identity("operator", "alice", "token")
    assert store.verify(AGENT_A_TOKEN) == Identity("agent", "node-a", "token")
    assert store.verify(READER_TOKEN) is None
    assert store.verify("") is None
    assert hash_token("x") == "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("sha256:abc operator alice", "expected 'sha256:<64 hex> <role> <name>'"),
        (f"{hash_token(OPERATOR_TOKEN)} operator", "expected"),
        (f"{hash_token(OPERATOR_TOKEN)} coordinator c", "grants operator, reader or agent"),
        (f"{hash_token(OPERATOR_TOKEN)} agent bad/node", "bad node id"),
        (f"{OPERATOR_TOKEN} operator alice", "expected"),  # a plaintext token by mistake
    ],
)
def test_token_file_errors_name_the_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(TokenFileError, match=rf"tokens:2: .*{problem}"):
        TokenStore.load(path)


def test_token_store_refuses_duplicates_weak_tokens_and_unknown_roles(tmp_path: Path) -> None:
    store = token_store()
    with pytest.raises(ValueError, match="twice"):
        store.add(OPERATOR_TOKEN, "reader", "bob")
    with pytest.raises(ValueError, match="characters"):
        store.add("short", "operator", "bob")
    with pytest.raises(ValueError, match="grants operator, reader or agent"):
        store.add("stn_0123456789abcdef0123", "admin", "bob")
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenStore.load(tmp_path / "missing")
    assert auth.generate_token() != auth.generate_token()
    assert len(auth.generate_token()) >= 40


def test_current_identity_needs_the_interceptor() -> None:
    with pytest.raises(RuntimeError, match="AuthInterceptor"):
        current_identity(object())  # type: ignore[arg-type]


def test_credential_errors_name_the_file(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(
        TlsConfigError, match=r"neither agent-node-z\.pem nor tls\.crt .*stanchion certs init"
    ):
        channel_credentials(pki, "agent", "node-z")
    with pytest.raises(TlsConfigError, match=r"neither coordinator\.pem nor tls\.crt"):
        server_credentials(tmp_path)
    no_ca = tmp_path / "no-ca"
    no_ca.mkdir()
    for name in ("operator.pem", "operator-key.pem"):
        (no_ca / name).write_bytes((pki / name).read_bytes())
    with pytest.raises(TlsConfigError, match=r"ca\.pem is missing"):
        channel_credentials(no_ca, "operator")
    with pytest.raises(ValueError, match="needs a node id"):
        channel_credentials(pki, "agent")
    with pytest.raises(ValueError, match="unknown role"):
        channel_credentials(pki, "admin")
    # A key that belongs to another certificate is caught here, not in a handshake.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("ca.pem", "operator.pem"):
        (mixed / name).write_bytes((pki / name).read_bytes())
    (mixed / "operator-key.pem").write_bytes((pki / "reader-key.pem").read_bytes())
    with pytest.raises(TlsConfigError, match=r"operator-key\.pem is not the key of .*operator\.pem"):
        channel_credentials(mixed, "operator")


def secret_dir(pki: Path, dest: Path, stem: str) -> Path:
    """One machine's files under Kubernetes TLS Secret names, as deploy/ mounts them."""
    dest.mkdir()
    (dest / "ca.crt").write_bytes((pki / "ca.pem").read_bytes())
    (dest / "tls.crt").write_bytes((pki / f"{stem}.pem").read_bytes())
    (dest / "tls.key").write_bytes((pki / f"{stem}-key.pem").read_bytes())
    (dest / "tls.key").chmod(0o600)
    return dest


def test_one_machine_directories_with_secret_names_work(pki: Path, tmp_path: Path) -> None:
    coordinator_dir = secret_dir(pki, tmp_path / "coordinator", "coordinator")
    agent_dir = secret_dir(pki, tmp_path / "agent", "agent-node-a")

    async def main() -> None:
        async with serving(coordinator_dir) as srv:
            creds = channel_credentials(agent_dir, "agent", "node-a")
            assert (await call(srv.port, creds, "Heartbeat", heartbeat("node-a")))[0] == OK
            # Still mTLS: the CA alone (for token clients) gets no connection.
            code, _ = await call(srv.port, token_channel_credentials(agent_dir, AGENT_A_TOKEN), "ListJobs")
            assert code == UNAVAILABLE

    asyncio.run(main())


def test_a_certificate_for_another_identity_is_refused_before_connecting(pki: Path, tmp_path: Path) -> None:
    agent_dir = secret_dir(pki, tmp_path / "agent", "agent-node-a")
    with pytest.raises(
        TlsConfigError, match=r"tls\.crt is for spiffe://stanchion/agent/node-a, not node node-b"
    ):
        channel_credentials(agent_dir, "agent", "node-b")
    with pytest.raises(
        TlsConfigError, match=r"is for spiffe://stanchion/agent/node-a, not the operator role"
    ):
        channel_credentials(agent_dir, "operator")
    reader_dir = secret_dir(pki, tmp_path / "reader", "reader")
    with pytest.raises(
        TlsConfigError, match=r"is for spiffe://stanchion/reader/reader, not the operator role"
    ):
        channel_credentials(reader_dir, "operator")


def test_rate_limiter_refills_with_the_clock() -> None:
    now = [100.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after_s() == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.try_acquire() and not limiter.try_acquire()
    now[0] += 100  # a long idle period refills only up to the burst
    assert sum(limiter.try_acquire() for _ in range(10)) == 3
    now[0] -= 50  # a clock that steps back adds nothing
    assert not limiter.try_acquire()
    with pytest.raises(ValueError):
        RateLimiter(0, 1)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)
