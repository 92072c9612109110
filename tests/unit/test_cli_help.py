"""One help convention for the whole CLI: `-h` and `--help` on every group and command print a
`Usage: stanchion ...` line and exit 0."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from diagnostics.cli import app, main


def command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:  # Typer's vendored Click: groups have .commands
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return out


PATHS = command_paths()


def test_the_tree_is_walked() -> None:
    assert ["job", "submit"] in PATHS and ["data", "prepare"] in PATHS and ["train"] in PATHS


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "stanchion")
def test_every_command_prints_its_usage(
    path: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, flag])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert out.out.startswith(f"Usage: {' '.join(['stanchion', *path])}"), out.out[:200]
