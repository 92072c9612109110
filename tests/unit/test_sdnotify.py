"""sd_notify without systemd: a datagram socket stands in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stanchion import sdnotify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            s.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield s


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"stanchion-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield s


@pytest.mark.parametrize("fixture", ["path_socket", "abstract_socket"])
def test_states_arrive(fixture: str, request: pytest.FixtureRequest):
    s = request.getfixturevalue(fixture)
    assert sdnotify.ready()
    assert s.recv(4096) == b"READY=1"
    assert sdnotify.watchdog()
    assert s.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.status("training\nstep 10")
    assert s.recv(4096) == b"STATUS=training step 10"
    assert sdnotify.stopping()
    assert s.recv(4096) == b"STOPPING=1"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # VM transport: not for host daemons
    assert sdnotify.notify("READY=1") is False


def test_a_socket_that_is_gone_returns_false(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("NOTIFY_SOCKET", f"/nonexistent/{uuid.uuid4().hex}")
    assert sdnotify.watchdog() is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("10000000", None, 5.0),
        ("10000000", "self", 5.0),
        ("10000000", "other", None),
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec, pid, expected):
    for name, val in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if val is None:
            monkeypatch.delenv(name, raising=False)
        else:
            val = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(val, val)
            monkeypatch.setenv(name, val)
    assert sdnotify.watchdog_interval_s() == expected


def test_faulthandler_prints_the_stack_on_a_watchdog_abort():
    # systemd's watchdog kills with SIGABRT; run in a child so the test process keeps pytest's handler.
    code = (
        "import os, signal\n"
        "from stanchion.sdnotify import enable_faulthandler\n"
        "def stuck_in_here():\n"
        "    os.kill(os.getpid(), signal.SIGABRT)\n"
        "enable_faulthandler()\n"
        "stuck_in_here()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == -6  # SIGABRT
    assert "Fatal Python error: Aborted" in result.stderr
    assert "stuck_in_here" in result.stderr
