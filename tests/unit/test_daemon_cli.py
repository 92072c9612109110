"""The daemons' `serve` options come from their configuration dataclasses, declared once; a port
that is taken is one line naming the flag, with exit code 5."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from agent.config import AgentConfig
from coordinator.config import CoordinatorConfig
from diagnostics.daemon_cli import flag_of, serve_command


def flags_of(cls: type) -> set[str]:
    app = typer.Typer(add_completion=False)
    app.command()(serve_command(cls, lambda cfg, port_file: None, "doc"))
    cmd = typer.main.get_command(app)
    return {o for p in cmd.params for o in p.opts}


@pytest.mark.parametrize("cls", [CoordinatorConfig, AgentConfig])
def test_every_documented_field_is_a_flag_and_nothing_else_is(cls: type) -> None:
    documented = {flag_of(f) for f in dataclasses.fields(cls) if "help" in f.metadata}
    assert documented and flags_of(cls) == documented | {"--config", "--port-file"}
    # A flag is its field's name unless the field names it (a repeatable one reads in the singular).
    named = {f.name: f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata}
    assert all(
        flag_of(f) == "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name not in named
    )
    assert named == ({"entrypoints": "--entrypoint"} if cls is AgentConfig else {})


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path, monkeypatch) -> None:
    seen: list[Any] = []
    app = typer.Typer(add_completion=False)
    app.command()(serve_command(CoordinatorConfig, lambda cfg, port_file: seen.append((cfg, port_file)), "d"))
    toml = tmp_path / "c.toml"
    toml.write_text('listen = "127.0.0.1:1"\nstate_db = "from-file.db"\nmetrics_port = 7\ninsecure = true\n')
    monkeypatch.setenv("STANCHION_STATE_DB", "from-env.db")
    monkeypatch.setenv("STANCHION_METRICS_PORT", "8")
    r = CliRunner().invoke(app, ["--config", str(toml), "--metrics-port", "9", "--port-file", "p.json"])
    assert r.exit_code == 0, r.output
    cfg, port_file = seen[0]
    assert (cfg.listen, cfg.state_db, cfg.metrics_port, cfg.insecure, port_file) == (
        "127.0.0.1:1",
        "from-env.db",
        9,
        True,
        "p.json",
    )


def held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# What `setup_logging` writes before the bind: "2026-12-06 20:24:16,299 INFO name message".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")


@pytest.mark.parametrize(
    ("daemon", "flag"),
    [("coordinator", "--listen"), ("coordinator", "--metrics-port"), ("agent", "--health-port")],
)
def test_a_port_in_use_is_one_line_naming_the_flag_and_exit_code_5(
    tmp_path: Path, daemon: str, flag: str
) -> None:
    with held_port() as s:
        port = s.getsockname()[1]
        if daemon == "coordinator":
            args = ["--insecure", "--state-db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0"]
        else:  # nothing listens on port 1: the agent fails on its health port before it gets there
            args = ["--insecure", "--node-id", "n0", "--coordinator", "127.0.0.1:1"]
            args += ["--run-root", str(tmp_path / "runs")]
        args += [flag, f"127.0.0.1:{port}" if flag == "--listen" else str(port)]
        r = subprocess.run(
            [sys.executable, "-m", "diagnostics.cli", daemon, "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 5, r.stderr
    # All of stderr: the daemon's own log lines, then the error and nothing else (gRPC's C core
    # logs a failed bind on descriptor 2 as "E1206 ... add_port.cc:83] Failed to add port ...").
    rest = [line for line in r.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(rest) == 1 and rest[0].startswith(f"error: {flag} "), r.stderr
    assert str(port) in rest[0] and "Traceback" not in r.stderr and "Errno" not in r.stderr, r.stderr
