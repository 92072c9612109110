"""Binding the daemons' listening ports, with one error for a port that is taken.

gRPC reports a bind failure as a C-core log line plus ``RuntimeError: Failed to bind`` (or a port
of 0), and the Prometheus HTTP server as ``OSError: [Errno 98]``; neither names the setting to
change. :class:`AddressInUse` names the flag and the address, and the CLI maps it to exit code 5;
:func:`bind_grpc` keeps the C-core line off stderr, so that the CLI's line is the only one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class AddressInUse(Exception):
    def __init__(self, flag: str, address: str, detail: str = ""):
        super().__init__(
            f"{flag} {address}: cannot listen there ({detail or 'the address is already in use'}); "
            f"stop the process that holds it or pass another {flag}"
        )
        self.flag, self.address = flag, address


def bind_grpc(add_port: Callable[[], int], flag: str, address: str) -> int:
    """Call ``server.add_*_port`` (as ``add_port``) and return the bound port.

    A failed bind is logged by gRPC's C core straight to file descriptor 2 (``E1206 ...
    add_port.cc:83] Failed to add port to server: ...``) before Python sees the error, and
    GRPC_VERBOSITY is read once, when gRPC starts, so it cannot be lowered for one call. The call
    runs with descriptor 2 held in a temporary file: whatever was written there is passed on
    afterwards, except, when the bind failed, C core's lines about it (AddressInUse says it).
    """
    with _stderr_held() as held:
        try:
            port = add_port()
        except RuntimeError as e:  # grpcio >= 1.60 raises "Failed to bind to address ..."
            held.failed = True
            raise AddressInUse(flag, address, str(e).split(";")[0]) from None
        held.failed = port == 0  # older grpcio returns 0
        if held.failed:
            raise AddressInUse(flag, address)
    return port


# gRPC C core's log lines for a failed bind: "E1206 20:24:16.311928 7868 add_port.cc:83] ...".
_CORE_BIND_FAILURE = re.compile(rb"^[EW]\d{4} .*(add_port|Failed to add port|Failed to bind)")


class _Held:
    failed = False  # the bind failed: C core's lines about it are left out when passing stderr on


@contextlib.contextmanager
def _stderr_held() -> Iterator[_Held]:
    held = _Held()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon started without one): nothing to hold
        yield held
        return
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            lines = buf.read().splitlines(keepends=True)
            kept = [line for line in lines if not (held.failed and _CORE_BIND_FAILURE.search(line))]
            if kept:
                os.write(2, b"".join(kept))


def bind_http(start: Callable[[], T], flag: str, address: str) -> T:
    """Call ``start`` (which binds an HTTP server) and return what it returns."""
    try:
        return start()
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise AddressInUse(flag, address, e.strerror or str(e)) from None
        raise
