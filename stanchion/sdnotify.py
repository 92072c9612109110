"""sd_notify(3) without a dependency: one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op returning False, so daemons call these
unconditionally. With ``Type=notify`` the unit is "started" at :func:`ready`; with ``WatchdogSec=``
the daemon calls :func:`watchdog` every :func:`watchdog_interval_s` seconds from the code path whose
progress it vouches for (the event loop), and systemd kills it with SIGABRT when the pings stop;
:func:`enable_faulthandler` makes that SIGABRT print every thread's stack to stderr (the journal).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); False when not run by systemd or the send failed."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):  # Linux abstract namespace
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):  # unset, or a vsock: address (VMs), which host daemons don't get
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        logger.warning("sd_notify %r to %s failed: %s", state, os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to call :func:`watchdog`: half of $WATCHDOG_USEC, or None when the watchdog is off
    or meant for another process ($WATCHDOG_PID names a different PID)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line status that ``systemctl status`` shows."""
    return notify("STATUS=" + text.replace("\n", " "))


def enable_faulthandler() -> None:
    """Dump every thread's Python stack to stderr on SIGSEGV, SIGFPE, SIGABRT, SIGBUS and SIGILL,
    so a watchdog kill (SIGABRT) leaves the place the daemon was stuck in the journal."""
    faulthandler.enable(all_threads=True)
