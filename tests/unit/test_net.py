"""stanchion/net.py: a port that cannot be bound is one AddressInUse naming the flag, and gRPC's C
core does not print its own line about it first."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from stanchion.net import AddressInUse, bind_grpc

CORE_LINE = b"E1206 20:24:16.311928    7868 add_port.cc:83] Failed to add port to server: in use\n"


def test_a_real_grpc_bind_on_a_busy_port_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(AddressInUse) as e:
            bind_grpc(lambda: server.add_insecure_port(address), "--listen", address)
    assert e.value.flag == "--listen" and address in str(e.value)
    assert capfd.readouterr().err == ""


def test_a_failed_bind_drops_only_the_core_lines(capfd: pytest.CaptureFixture[str]) -> None:
    def add_port() -> int:
        os.write(2, CORE_LINE + b"another thread's line\n")
        raise RuntimeError("Failed to bind to address 127.0.0.1:9; details")

    with pytest.raises(AddressInUse, match=r"--listen 127.0.0.1:9: cannot listen there \(Failed to bind"):
        bind_grpc(add_port, "--listen", "127.0.0.1:9")
    assert capfd.readouterr().err == "another thread's line\n"


def test_a_port_of_0_is_a_failure_too(capfd: pytest.CaptureFixture[str]) -> None:
    def add_port() -> int:
        os.write(2, CORE_LINE)
        return 0

    with pytest.raises(AddressInUse, match="already in use"):
        bind_grpc(add_port, "--health-port", "127.0.0.1:9")
    assert capfd.readouterr().err == ""


def test_a_successful_bind_passes_everything_on(capfd: pytest.CaptureFixture[str]) -> None:
    def add_port() -> int:
        os.write(2, CORE_LINE + b"kept\n")
        return 1234

    assert bind_grpc(add_port, "--listen", "127.0.0.1:0") == 1234
    assert capfd.readouterr().err == CORE_LINE.decode() + "kept\n"
