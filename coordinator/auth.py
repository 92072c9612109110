"""Who may call the coordinator, and what they may call.

Agents start processes on GPU nodes when the coordinator tells them to, so an open control plane
is remote code execution on the whole cluster. This module is the coordinator's gate:

- **Identity** comes from the peer's mTLS certificate (a URI SAN ``spiffe://stanchion/<role>/<name>``,
  read from grpc's ``auth_context()``), or else from a bearer token (``authorization: Bearer <t>``)
  checked against a file of SHA-256 hashes.
- **Policy** maps every RPC's full method name to the roles that may call it. It is derived from the
  generated service descriptors, and importing this module fails if any method has no entry, so a
  new RPC cannot ship unprotected. Health checks and reflection stay open.
- **AuthInterceptor** wraps each handler: the check runs before the handler, a refused call never
  reaches it, and the handler reads the caller with `current_identity(context)`. Agent RPCs carry
  a node id in the request; handlers call `await require_node(context, request.node_id)`.

Client certificates, required or not (`server_credentials`): grpc Python offers two modes only.
``require_client_cert=True`` (the default) makes the TLS handshake demand a certificate signed by
our CA. A caller without one, with one from another CA, or speaking plaintext never gets a gRPC
connection: the client sees UNAVAILABLE ("failed to connect") and no request byte is parsed. This
refusal is stronger than a status code, and the interceptor never runs. With ``False``, grpc does
not even *ask* for a client certificate (``GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE``; there is no
request-but-don't-require mode in Python), so every caller must present a bearer token, and a
caller without one gets UNAUTHENTICATED from the interceptor. Authenticated callers that overstep
get PERMISSION_DENIED in both modes.

Roles and identities are the kernel's (`stanchion.identity`), and so are the TLS credentials every
process builds (`stanchion.tls`).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos.stanchion.v1 import agent_pb2, operator_pb2
from stanchion.identity import (
    ANONYMOUS,
    NAME_RE,
    ROLE_AGENT,
    ROLE_OPERATOR,
    ROLE_READER,
    TRUST_DOMAIN,
    Identity,
    identity_from_auth_context,
    validate_node_id,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Policy: every RPC of every Stanchion service, and the roles that may call it

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_OPERATOR_ONLY = frozenset({ROLE_OPERATOR})
_READERS = frozenset({ROLE_OPERATOR, ROLE_READER})
_AGENTS = frozenset({ROLE_AGENT})

# (service, method) -> allowed roles. A new RPC must be added here or the import below fails.
_RULES: dict[tuple[str, str], frozenset[str]] = {
    **{
        ("OperatorService", m): _OPERATOR_ONLY
        for m in ("SubmitJob", "CancelJob", "CordonNode", "UncordonNode", "DrainNode", "StartBisection")
    },
    **{
        ("OperatorService", m): _READERS
        for m in (
            "GetJob",
            "ListJobs",
            "ExplainJob",
            "ListNodes",
            "ListCheckpoints",
            "StreamEvents",
            "GetBisection",
        )
    },
    ("AgentService", "Register"): _AGENTS,
    ("AgentService", "Heartbeat"): _AGENTS,
}


def _build_policy(
    files: Iterable[Any], rules: Mapping[tuple[str, str], frozenset[str]]
) -> dict[str, frozenset[str]]:
    policy: dict[str, frozenset[str]] = {}
    seen: set[tuple[str, str]] = set()
    missing: list[str] = []
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                full = f"/{service.full_name}/{method.name}"
                key = (service.name, method.name)
                if key not in rules:
                    missing.append(full)
                    continue
                seen.add(key)
                policy[full] = rules[key]
    stale = sorted(f"{s}/{m}" for s, m in set(rules) - seen)
    if missing or stale:
        raise RuntimeError(
            "coordinator/auth.py policy is out of date with the protos: "
            + (f"no policy for {', '.join(missing)}" if missing else "")
            + ("; " if missing and stale else "")
            + (f"policy names unknown methods {', '.join(stale)}" if stale else "")
            + " (add each RPC to _RULES with the roles allowed to call it)"
        )
    return policy


POLICY: dict[str, frozenset[str]] = _build_policy((operator_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR), _RULES)

# ---------------------------------------------------------------------------------------------
# Identity from the peer certificate


# ---------------------------------------------------------------------------------------------
# Bearer tokens

_TOKEN_LINE = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})\s+(?P<role>\S+)\s+(?P<name>\S+)\s*$")
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096


class TokenFileError(ValueError):
    """A token file that cannot be read or has a bad line (the message names the line)."""


def generate_token() -> str:
    """A new random token (256 bits). Hand it to its owner once; store only `hash_token(token)`."""
    return "stn_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: ``sha256:<hex>``. Tokens are random, so no salt or KDF is needed."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_line(token: str, role: str, name: str) -> str:
    """One line of a token file: ``sha256:<hex> <role> <name>``; for agents the name is the node id."""
    _check_grant(role, name)
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise ValueError(
            f"a token needs {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} characters; use generate_token()"
        )
    return f"{hash_token(token)} {role} {name}"


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a token, for channels where call credentials are not sent (plaintext)."""
    return (("authorization", f"Bearer {token}"),)


def _check_grant(role: str, name: str) -> None:
    if role not in (ROLE_OPERATOR, ROLE_READER, ROLE_AGENT):
        raise ValueError(f"a token grants operator, reader or agent, not {role!r}")
    if role == ROLE_AGENT:
        validate_node_id(name)
    elif not NAME_RE.match(name):
        raise ValueError(f"bad token name {name!r}: use letters, digits, '.', '_' or '-'")


@dataclass(frozen=True)
class _TokenEntry:
    digest: bytes
    role: str
    name: str


class TokenStore:
    """Hashed bearer tokens, each granting one role (and, for agents, one node id).

    File format, one token per line (``#`` starts a comment)::

        sha256:<64 hex digits> operator alice
        sha256:<64 hex digits> reader   grafana
        sha256:<64 hex digits> agent    node-3      # the name of an agent token is its node id
    """

    def __init__(self) -> None:
        self._entries: list[_TokenEntry] = []

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            mode = p.stat().st_mode
        except OSError as e:
            raise TokenFileError(f"cannot read token file {p}: {e.strerror or e}") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("token file %s is writable by others; anyone who can write it can grant roles", p)
        store = cls()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _TOKEN_LINE.match(line)
            if not m:
                raise TokenFileError(f"{p}:{lineno}: expected 'sha256:<64 hex> <role> <name>'")
            try:
                store._add_entry(bytes.fromhex(m["hex"]), m["role"], m["name"])
            except ValueError as e:
                raise TokenFileError(f"{p}:{lineno}: {e}") from None
        return store

    def add(self, token: str, role: str, name: str) -> str:
        """Grant ``role`` to ``token``; returns the file line that stores it."""
        line = token_line(token, role, name)
        self._add_entry(hashlib.sha256(token.encode("utf-8")).digest(), role, name)
        return line

    def _add_entry(self, digest: bytes, role: str, name: str) -> None:
        _check_grant(role, name)
        if any(hmac.compare_digest(e.digest, digest) for e in self._entries):
            raise ValueError("the same token appears twice")
        self._entries.append(_TokenEntry(digest, role, name))

    def verify(self, token: str) -> Identity | None:
        """The identity a token grants, or None. Compares against every entry in constant time."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match: _TokenEntry | None = None
        for entry in self._entries:  # no early exit: the time does not depend on which entry matched
            if hmac.compare_digest(entry.digest, digest):
                match = entry
        return None if match is None else Identity(match.role, match.name, "token")

    def __len__(self) -> int:
        return len(self._entries)


def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str]:
    """(token, problem) from call metadata: (None, "") without an authorization header."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return None, ""
    if len(values) > 1:
        return None, "more than one authorization header"
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "the authorization header is not 'Bearer <token>'"
    return token.strip(), ""


# ---------------------------------------------------------------------------------------------
# The interceptor, and what handlers call

# (context, identity) of the call the current task serves; set by the interceptor's wrapper, which
# runs in the RPC's own task just before the handler.
_CURRENT: contextvars.ContextVar[tuple[Any, Identity] | None] = contextvars.ContextVar(
    "stanchion_identity", default=None
)


def current_identity(context: grpc.aio.ServicerContext) -> Identity:
    """The caller of the RPC ``context`` belongs to. Raises RuntimeError when no AuthInterceptor ran."""
    current = _CURRENT.get()
    if current is None or current[0] is not context:
        raise RuntimeError("no identity for this call: is the server built with AuthInterceptor?")
    return current[1]


async def require_node(context: grpc.aio.ServicerContext, node_id: str) -> Identity:
    """Abort with PERMISSION_DENIED unless an agent caller is ``node_id`` (the id in its certificate
    or token). Agent RPCs call this with the node id from their request. Non-agent callers pass:
    the policy has already decided whether they may call the RPC at all."""
    identity = current_identity(context)
    if identity.role == ROLE_AGENT and identity.name != node_id:  # ids are not secret
        log.warning("denied: %s sent a request for node %r", identity, node_id)
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"agent {identity.name} may not act for node {node_id!r}"
        )
    return identity


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (certificate first, then bearer token) and applies ``policy``.

    No identity → UNAUTHENTICATED; a role the method does not allow, or a method with no policy →
    PERMISSION_DENIED. Either way the handler never runs. Health and reflection stay open.

    ``insecure=True`` is for an explicit ``--insecure`` (plaintext) server. With a token store it
    still demands tokens (which then cross the network in clear text). **Without one, every caller
    is ANONYMOUS and may call everything**, agent RPCs for any node included. Without
    ``insecure``, a call that did not arrive over TLS is refused.
    """

    def __init__(
        self,
        *,
        tokens: TokenStore | None = None,
        insecure: bool = False,
        trust_domain: str = TRUST_DOMAIN,
        policy: Mapping[str, frozenset[str]] = POLICY,
    ):
        self._tokens = tokens
        self._insecure = insecure
        self._trust_domain = trust_domain
        self._policy = dict(policy)
        if insecure and tokens is None:
            log.warning(
                "AUTHENTICATION IS OFF: --insecure without a token file; anyone who can reach this "
                "port can submit jobs and start processes on every node"
            )

    def replace_tokens(self, tokens: TokenStore) -> None:
        """Swap in a freshly loaded token store (e.g. on SIGHUP), so a revoked token stops working
        without a restart. Calls already past the check are not affected."""
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        return _wrap_handler(handler, lambda context: self._authorize(method, metadata, context))

    def _authenticate(self, metadata: Any, context: grpc.aio.ServicerContext) -> tuple[Identity | None, str]:
        auth_context = context.auth_context()
        if not self._insecure and b"ssl" not in auth_context.get("transport_security_type", ()):
            return None, "this server accepts TLS connections only"
        identity = identity_from_auth_context(auth_context, trust_domain=self._trust_domain)
        if identity is not None:
            return identity, ""
        token, problem = _bearer_token(metadata)
        if problem:
            return None, problem
        if token is not None:
            if self._tokens is None:
                return None, "this server accepts no bearer tokens"
            identity = self._tokens.verify(token)
            return identity, "" if identity else "unknown bearer token"
        if self._insecure and self._tokens is None:
            return ANONYMOUS, ""
        return None, "no client certificate with a Stanchion identity and no bearer token"

    async def _authorize(self, method: str, metadata: Any, context: grpc.aio.ServicerContext) -> Identity:
        identity, problem = self._authenticate(metadata, context)
        if identity is None:
            log.info("unauthenticated call to %s from %s: %s", method, context.peer(), problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            raise AssertionError("unreachable: abort raises")
        if identity is ANONYMOUS:
            return identity
        allowed = self._policy.get(method)
        if allowed is None or identity.role not in allowed:
            why = "it has no policy" if allowed is None else f"it is for {', '.join(sorted(allowed))}"
            log.warning("denied %s to %s: %s", method, identity, why)
            short = method.rsplit("/", 1)[-1]
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"role {identity.role} may not call {short}"
            )
        return identity


def _wrap_handler(
    handler: grpc.RpcMethodHandler, authorize: Callable[[grpc.aio.ServicerContext], Awaitable[Identity]]
) -> grpc.RpcMethodHandler:
    """The same handler with ``authorize`` run first in each of its behaviours (all four kinds).

    A single request message is parsed only after ``authorize`` passed: grpc would otherwise run
    the protobuf parser on a refused caller's bytes first, and answer bytes that do not parse with
    UNKNOWN ("Unexpected <class 'DecodeError'>"). Here they get INVALID_ARGUMENT, and a caller
    without credentials gets UNAUTHENTICATED whatever it sends. (Request streams, which no
    Stanchion RPC has, keep grpc's own parsing.)
    """
    parse = None if handler.request_streaming else handler.request_deserializer

    async def request(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception as e:  # noqa: BLE001 - whatever the parser raises, the bytes are the problem
            log.info("undecodable request from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message")
            raise AssertionError("unreachable: abort raises") from None

    def wrap(behavior: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if behavior is None:
            return None
        if inspect.isasyncgenfunction(behavior):  # a streaming response written with `yield`

            async def wrapped_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                _CURRENT.set((context, await authorize(context)))
                async for response in behavior(await request(request_or_iterator, context), context):
                    yield response

            return wrapped_stream

        async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            reset = _CURRENT.set((context, await authorize(context)))
            try:
                result = behavior(await request(request_or_iterator, context), context)
                return await result if inspect.isawaitable(result) else result
            finally:
                _CURRENT.reset(reset)

        return wrapped

    return handler._replace(  # type: ignore[attr-defined]  # grpc's handlers are namedtuples
        request_deserializer=handler.request_deserializer if handler.request_streaming else None,
        unary_unary=wrap(handler.unary_unary),
        unary_stream=wrap(handler.unary_stream),
        stream_unary=wrap(handler.stream_unary),
        stream_stream=wrap(handler.stream_stream),
    )


# ---------------------------------------------------------------------------------------------
# Rate limiting


class RateLimiter:
    """A token bucket: ``burst`` calls at once, refilled at ``rate_per_s``. ``clock`` is injectable
    (seconds, monotonic) so tests need no sleeping. Not thread-safe; one event loop owns it."""

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = float(rate_per_s)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._last) * self.rate_per_s)
        self._last = now

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; False (and nothing taken) if not."""
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def retry_after_s(self, cost: float = 1.0) -> float:
        """How long until ``cost`` tokens are available (0 if they are now)."""
        self._refill()
        return max(0.0, (cost - self._tokens) / self.rate_per_s)


async def require_rate(context: grpc.aio.ServicerContext, limiter: RateLimiter, what: str) -> None:
    """Abort with RESOURCE_EXHAUSTED when ``limiter`` has no token for this call."""
    if not limiter.try_acquire():
        wait_s = limiter.retry_after_s()
        log.warning("rate limit: refused %s from %s", what, context.peer())
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {what} requests; retry in {wait_s:.1f}s"
        )
