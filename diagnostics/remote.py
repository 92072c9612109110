"""Talking to a coordinator from the CLI: shared options, one call helper, and the mapping from
gRPC status codes to exit codes.

Exit codes of every command that calls a coordinator: 0 ok, 1 failure, 2 invalid request (the
coordinator said INVALID_ARGUMENT), 3 not found, 4 coordinator unreachable, 5 not authorized.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from diagnostics.errors import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_USAGE, CliError

EXIT_NOT_AUTHORIZED = 5
REMOTE_EPILOG = "Exit codes: 0 ok, 1 failure, 2 invalid request, 3 not found, 4 coordinator unreachable, 5 not authorized."
T = TypeVar("T")

CoordinatorOpt = Annotated[
    str, typer.Option("--coordinator", envvar="STANCHION_COORDINATOR", help="Coordinator address HOST:PORT.")
]
TlsDirOpt = Annotated[
    str,
    typer.Option(
        "--tls-dir", envvar="STANCHION_TLS_DIR", help="Directory with ca.pem and this client's certificate."
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="Plaintext gRPC (only against a coordinator started with --insecure)."),
]
TokenFileOpt = Annotated[
    str,
    typer.Option(
        "--token-file",
        envvar="STANCHION_TOKEN_FILE",
        help="A file holding a bearer token (instead of a client certificate).",
    ),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Deadline of each call, in seconds.")]


@dataclass(frozen=True)
class Remote:
    coordinator: str = "127.0.0.1:50051"
    tls_dir: str = ""
    insecure: bool = False
    token_file: str = ""
    timeout_s: float = 10.0
    role: str = "operator"

    def token(self) -> str:
        if not self.token_file:
            return ""
        try:
            return Path(self.token_file).read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the token file: {e}", hint="check --token-file") from None

    def channel(self) -> Any:
        from protos import client

        if not self.insecure and not self.tls_dir:
            raise CliError(
                "no credentials: the coordinator requires mTLS by default",
                hint="pass --tls-dir DIR (from `stanchion certs init`) or --insecure for a plaintext coordinator",
                exit_code=EXIT_USAGE,
            )
        role = self.role
        tls = Path(self.tls_dir) if self.tls_dir else None
        if (
            tls
            and role == "operator"
            and not (tls / "operator.pem").exists()
            and (tls / "reader.pem").exists()
        ):
            role = "reader"  # a read-only operator directory
        return client.aio_channel(
            self.coordinator,
            tls_dir=self.tls_dir,
            role=role,
            insecure=self.insecure,
            token=self.token() if not self.insecure else "",
        )


# The connection options, declared once: every command decorated with `connects` shows them.
_CONNECTION = (
    ("coordinator", CoordinatorOpt, ""),
    ("tls_dir", TlsDirOpt, ""),
    ("insecure", InsecureOpt, False),
    ("token_file", TokenFileOpt, ""),
    ("timeout", TimeoutOpt, 10.0),
)


def connects(fn: Callable[..., T]) -> Callable[..., T]:
    """For a command that calls a coordinator: ``fn`` takes ``r: Remote`` and declares no
    connection options; its command line gets them (``--coordinator``, ``--tls-dir``, ``--insecure``,
    ``--token-file``, ``--timeout``) and ``r`` is built from them."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "r"]
    conn = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
        for n, a, d in _CONNECTION
    ]

    @functools.wraps(fn)
    def command(**kw: Any) -> T:
        return fn(r=remote(*(kw.pop(n) for n, _, _ in _CONNECTION)), **kw)

    params = own + conn
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def remote(coordinator: str, tls_dir: str, insecure: bool, token_file: str, timeout: float = 10.0) -> Remote:
    return Remote(
        coordinator or os.environ.get("STANCHION_COORDINATOR", "127.0.0.1:50051"),
        tls_dir,
        insecure,
        token_file,
        timeout,
    )


def call(r: Remote, fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run ``fn(service, call_kwargs)`` against the operator service and map errors to exit codes."""
    import grpc

    from protos import client
    from protos.stanchion.v1 import operator_pb2_grpc

    async def go() -> T:
        async with r.channel() as channel:
            service = operator_pb2_grpc.OperatorServiceStub(channel)
            kwargs = {"timeout": r.timeout_s, "metadata": client.call_metadata(r.token(), r.insecure)}
            return await fn(service, kwargs)

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as e:
        raise rpc_error(e, r) from None


def rpc_error(e: Any, r: Remote) -> CliError:
    import grpc

    code, details = e.code(), e.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(
            f"coordinator {r.coordinator} is unreachable ({code.name}: {details})",
            hint="check --coordinator, that it is running, and the TLS settings",
            exit_code=EXIT_UNAVAILABLE,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return CliError(details, exit_code=EXIT_NOT_FOUND)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(details, hint="fix the field named above", exit_code=EXIT_USAGE)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CliError(
            f"{code.name}: {details}",
            hint="use an operator certificate or token for changes",
            exit_code=EXIT_NOT_AUTHORIZED,
        )
    return CliError(f"{code.name}: {details}", exit_code=EXIT_FAILURE)
