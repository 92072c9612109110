"""The connection options are declared once (diagnostics/remote.py) and every command that calls a
coordinator gets them, with the values reaching its Remote."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from diagnostics.cli import app as cli
from diagnostics.remote import Remote, connects

CONNECTION = {"--coordinator", "--tls-dir", "--insecure", "--token-file", "--timeout"}


def test_the_options_reach_the_command_as_one_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    app = typer.Typer(add_completion=False)

    @app.command()
    @connects
    def probe(name: str = "x", *, r: Remote) -> None:
        seen.append((name, r))

    monkeypatch.delenv("STANCHION_COORDINATOR", raising=False)
    args = ["--name", "y", "--coordinator", "h:1", "--tls-dir", "/t", "--token-file", "/k", "--timeout", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [("y", Remote("h:1", "/t", False, "/k", 3.0))]
    CliRunner().invoke(app, ["--insecure"])
    assert seen[-1] == ("x", Remote("127.0.0.1:50051", "", True, "", 10.0))


@pytest.mark.parametrize("group", ["job", "node"])
def test_every_job_and_node_command_has_the_connection_options(group: str) -> None:
    root = typer.main.get_command(cli)
    for sub in root.commands[group].commands.values():
        opts = {o for p in sub.params for o in p.opts}
        assert opts >= CONNECTION, (sub.name, sorted(CONNECTION - opts))
