"""One help convention for the whole CLI: `-h` and `--help` on every group and command print a
`Usage: stanchion ...` line (required arguments as Click writes them: `SPEC`) and an "Options:"
section, and exit 0; a usage error is one `error: ...` line with exit code 2. `stanchion train`,
whose flags are the trainer's argparse ones, follows it too."""

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
    assert out.out.startswith(f"Usage: {' '.join(['stanchion', *path])} [OPTIONS]"), out.out[:200]
    usage = out.out.splitlines()[0]
    assert "{" not in usage and "}" not in usage, usage
    assert "\nOptions:\n" in out.out and "-h, --help" in out.out and "Show this message and exit." in out.out


@pytest.mark.parametrize(
    ("path", "usage"),
    [
        (["job", "submit"], "Usage: stanchion job submit [OPTIONS] SPEC"),
        (["job", "cancel"], "Usage: stanchion job cancel [OPTIONS] JOB_ID"),
        (["job", "status"], "Usage: stanchion job status [OPTIONS] [JOB_ID]"),
        (["ckpt", "verify"], "Usage: stanchion ckpt verify [OPTIONS] PATH"),
        (["train"], "Usage: stanchion train [OPTIONS]"),
    ],
)
def test_the_usage_line_writes_arguments_as_click_does(
    path: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    assert capsys.readouterr().out.splitlines()[0] == usage


def test_train_help_has_no_argparse_wording(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "options:" not in out and "show this help message" not in out and "usage:" not in out
    # Typer's option column: a metavar per type, the default where there is one.
    assert "--steps <int>" in out and "--data <path>" in out and "--set KEY=VALUE" in out
    assert "[default: auto]" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ],
)
def test_a_train_usage_error_is_one_line_with_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2
    assert out.err == f"error: {message} (hint: see 'stanchion train --help')\n" and out.out == ""


def test_every_train_flag_still_parses() -> None:
    from trainer.cli import parser

    args = parser("stanchion train").parse_args(
        ["--preset", "tiny", "--config", "c.toml", "--set", "model.n_layer=6", "--set", "optim.lr=0.001"]
        + ["--data", "d", "--run-dir", "r", "--steps", "5", "--checkpoint-every", "2", "--seed", "7"]
        + ["--faults", "f.json", "--resume", "none", "--sample", "3", "--nproc", "2", "--json"]
    )
    assert args.sets == ["model.n_layer=6", "optim.lr=0.001"]
    assert (args.preset, str(args.config), str(args.data), str(args.run_dir)) == ("tiny", "c.toml", "d", "r")
    assert (args.steps, args.checkpoint_every, args.seed, str(args.faults)) == (5, 2, 7, "f.json")
    assert (args.resume, args.sample, args.nproc, args.json) == ("none", 3, 2, True)
    defaults = parser().parse_args([])
    assert (defaults.sets, defaults.resume, defaults.sample, defaults.nproc, defaults.json) == (
        [],
        "auto",
        0,
        1,
        False,
    )
