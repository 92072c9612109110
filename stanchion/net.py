"""Binding the daemons' listening ports, with one error for a port that is taken.

gRPC reports a bind failure as a C-core log line plus ``RuntimeError: Failed to bind`` (or a port
of 0), and the Prometheus HTTP server as ``OSError: [Errno 98]``; neither names the setting to
change. :class:`AddressInUse` names the flag and the address, and the CLI maps it to exit code 5.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
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
    """Call ``server.add_*_port`` (as ``add_port``) and return the bound port."""
    try:
        port = add_port()
    except RuntimeError as e:  # grpcio >= 1.60 raises "Failed to bind to address ..."
        raise AddressInUse(flag, address, str(e).split(";")[0]) from None
    if port == 0:  # older grpcio returns 0
        raise AddressInUse(flag, address)
    return port


def bind_http(start: Callable[[], T], flag: str, address: str) -> T:
    """Call ``start`` (which binds an HTTP server) and return what it returns."""
    try:
        return start()
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise AddressInUse(flag, address, e.strerror or str(e)) from None
        raise
