"""Command-line flags of a trainer rank, shared by `torchrun -m trainer` and `stanchion train`.

    torchrun --nproc-per-node 2 -m trainer --preset tiny --data DIR --run-dir DIR --steps 200
    stanchion train --nproc 2 --preset tiny --data DIR --run-dir DIR --steps 200

Exit codes: 0 finished (or stopped by SIGTERM after a checkpoint), 1 crashed (see error.json in the
worker directory), 2 bad configuration (before any process group starts), 3 superseded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from stanchion.sdk import contract
from stanchion.sdk.runtime import wait_as_standby, watch_agent
from stanchion.settings import ConfigError, merge, parse_assignments
from trainer.config import TrainConfig, resolve

log = logging.getLogger("trainer")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help laid out as every other `stanchion` command's (Typer's): "Usage: PROG
    [OPTIONS]", an "Options:" section, metavars such as ``<int>`` and ``[default: ...]``. The two
    hooks overridden below are those argparse's own MetavarTypeHelpFormatter and
    ArgumentDefaultsHelpFormatter override."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        kind = {int: "int", float: "float", Path: "path"}.get(action.type, "str")  # type: ignore[arg-type]
        return f"<{kind}>"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != []
        if shown and action.default != argparse.SUPPRESS and "%(default)" not in text:
            text += "  [default: %(default)s]"
        return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, ``error: ... (hint: see 'PROG --help')``, and exit code 2, as for
    every other `stanchion` command; argparse would print the whole usage first."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            contract.EXIT_CONFIG,  # 2, the CLI's usage-error code too
            f"error: {message} (hint: see '{self.prog} --help')\n",
        )


def _indented(text: str) -> str:
    """A paragraph wrapped and indented as Typer prints a command's help and epilog."""
    return textwrap.fill(" ".join(text.split()), width=78, initial_indent="  ", subsequent_indent="  ")


def parser(prog: str = "trainer") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        usage="%(prog)s [OPTIONS]",
        description=_indented("Deterministic, resumable GPT pretraining on torch.distributed."),
        epilog=_indented(__doc__.split("\n\n", 2)[2]),
        formatter_class=_HelpFormatter,
        add_help=False,
    )
    opts = p.add_argument_group("Options")
    opts.add_argument("-h", "--help", action="help", help="Show this message and exit.")
    opts.add_argument(
        "--preset", default=None, help="Model, data and optimizer preset: tiny, gpt2-124m, llama-1b."
    )
    opts.add_argument(
        "--config", type=Path, default=None, help="A TOML file of config keys (trainer/config.py)."
    )
    opts.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config key, e.g. --set model.n_layer=6 (repeatable).",
    )
    opts.add_argument(
        "--data", type=Path, default=None, help="A directory written by `stanchion data prepare`."
    )
    opts.add_argument("--run-dir", type=Path, default=None, help="Checkpoints and per-rank files go here.")
    opts.add_argument(
        "--steps", type=int, default=None, help="Total optimizer steps (fixes the LR schedule)."
    )
    opts.add_argument(
        "--checkpoint-every", type=int, default=None, help="Steps between checkpoints (0: none)."
    )
    opts.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of the initial weights, the batch order and injected faults.",
    )
    opts.add_argument(
        "--faults", type=Path, default=None, help="A JSON fault-injection schedule (stanchion/sdk/faults.py)."
    )
    opts.add_argument(
        "--resume", default="auto", help="auto (newest good checkpoint), none, or a checkpoint path."
    )
    opts.add_argument(
        "--sample", type=int, default=0, metavar="N", help="Print N sampled lines after training."
    )
    opts.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="Spawn N local ranks (stanchion train only; torchrun does its own).",
    )
    opts.add_argument("--json", action="store_true", help="Print the final summary as JSON on stdout.")
    return p


def resolve_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> TrainConfig:
    """preset < --config < flags and --set. An agent passes the resolved config in STANCHION_CONFIG."""
    env = os.environ if env is None else env
    overrides: dict[str, Any] = {}
    for key, value in (
        ("steps", args.steps),
        ("checkpoint_every", args.checkpoint_every),
        ("seed", args.seed),
    ):
        if value is not None:
            overrides[key] = value
    if args.data is not None:
        overrides["data"] = {"path": str(args.data)}
    if args.preset:
        overrides["preset"] = args.preset
    overrides = merge(overrides, parse_assignments(args.sets))
    toml_path = args.config if args.config is not None else None
    if toml_path is None and env.get(contract.ENV_CONFIG):  # an agent-written resolved config
        toml_path = Path(env[contract.ENV_CONFIG])
    if toml_path is not None and toml_path.suffix == ".json":
        from stanchion.settings import merge as _merge
        from trainer.config import from_dict

        with open(toml_path) as f:
            return from_dict(_merge(json.load(f), overrides))
    cfg = resolve(args.preset or "tiny", toml_path=toml_path, overrides=overrides)
    if not cfg.data.path:
        raise ConfigError(
            "data.path: no data directory given; pass --data DIR (see `stanchion data prepare`)"
        )
    return cfg


def setup_logging() -> None:
    rank = os.environ.get("RANK", "?")
    gen = os.environ.get(contract.ENV_GENERATION, "-")
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("STANCHION_DEBUG") else logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [trainer gen={gen} rank={rank} pid=%(process)d] %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None, prog: str = "trainer") -> int:
    watch_agent()
    args = parser(prog).parse_args(argv)
    setup_logging()
    if os.environ.get(contract.ENV_STANDBY) == "1":
        return standby(args)
    try:
        cfg = resolve_config(args)
        from stanchion.sdk.parallel import env_topology

        world = env_topology()[1]
        if not os.environ.get(contract.ENV_STANDBY):
            cfg.check_world(world * (args.nproc if "RANK" not in os.environ else 1))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return contract.EXIT_CONFIG
    if args.nproc > 1 and "RANK" not in os.environ:
        from trainer.launch import launch_local

        return launch_local(args.nproc, argv if argv is not None else sys.argv[1:])
    return run_rank(cfg, args)


def standby(args: argparse.Namespace) -> int:
    """A pre-warmed rank for an agent: pay for Python, torch and the trainer's imports now, then wait
    for an assignment that names the generation, the rank and the config to build."""
    import signal

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    import torch

    import trainer.loop  # noqa: F401 - model, data, optimizer, checkpoint and distributed modules

    # The first optimizer construction imports torch._dynamo (about a second): do it while idle.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], foreach=True)
    prepared = prepare(args, os.environ.get(contract.ENV_STANDBY_CONFIG, ""))
    paths = contract.WorkerPaths(Path(os.environ[contract.ENV_WORKER_DIR]))
    assignment = wait_as_standby(paths, lambda: bool(stop))
    if assignment is None:
        return contract.EXIT_OK if stop else contract.EXIT_SUPERSEDED
    try:
        cfg = resolve_config(args, env={contract.ENV_CONFIG: assignment.config})
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return contract.EXIT_CONFIG
    if assignment.faults:
        args.faults = Path(assignment.faults)
    if assignment.run_dir:
        args.run_dir = Path(assignment.run_dir)
    built = None
    if prepared is not None:
        if prepared[0] == cfg:
            built = prepared[1]
            log.info("standby: using the model built before the assignment")
        else:
            log.info("standby: the assignment's config differs from the one prepared: building it now")
    return run_rank(cfg, args, first_assignment=assignment, built=built)


def prepare(args: argparse.Namespace, hint: str) -> tuple[TrainConfig, Any] | None:
    """Build the trainer (model initialised, data opened) for the config its agent hinted at, before
    any assignment: what a warm standby is for. None without a usable hint; any problem with it is
    left for the assignment's own config to report."""
    if not hint or not Path(hint).is_file():
        return None
    from trainer.loop import RunOptions, Trainer

    try:
        cfg = resolve_config(args, env={contract.ENV_CONFIG: hint})
        t0 = time.perf_counter()
        built = Trainer(cfg, RunOptions(run_dir=Path("unassigned")))
    except Exception as e:  # noqa: BLE001 - a hint only: the assignment decides what to build
        log.warning("standby: could not prepare the hinted config %s: %s", hint, e)
        return None
    log.info(
        "standby: built the hinted job's model in %.2f s, before any assignment", time.perf_counter() - t0
    )
    return cfg, built


def run_rank(
    cfg: TrainConfig, args: argparse.Namespace, first_assignment: Any = None, built: Any = None
) -> int:
    """Train as one rank. ``built``: a Trainer a standby made for this same config before its
    assignment, given the run's options here."""
    from stanchion.sdk import faults
    from trainer.loop import RunOptions, Trainer

    run_dir = Path(args.run_dir or os.environ.get(contract.ENV_RUN_DIR) or "runs/default")
    faults_path = args.faults or (
        Path(os.environ[contract.ENV_FAULTS]) if os.environ.get(contract.ENV_FAULTS) else None
    )
    try:
        if faults_path:
            faults.load(faults_path)  # a bad schedule is a usage error, before any group forms
        opts = RunOptions(
            run_dir=run_dir,
            faults=faults_path,
            resume=args.resume,
            first_assignment=first_assignment,
            sample_lines=args.sample,
        )
        trainer = built if built is not None else Trainer(cfg, opts)
        trainer.opts = opts
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return contract.EXIT_CONFIG
    try:
        code = trainer.run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return contract.EXIT_CONFIG
    except SystemExit:  # the guard's exits: superseded (3), or stopped while waiting (0)
        raise
    except BaseException as e:  # noqa: BLE001 - a crash is reported as data, then the process exits 1
        if isinstance(e, KeyboardInterrupt):
            raise
        trainer.write_error(e)
        traceback.print_exc()
        return contract.EXIT_ERROR
    if args.json and trainer.is_main:
        print(json.dumps(summary(trainer), sort_keys=True))
    return code


def summary(trainer: Any) -> dict[str, Any]:
    return {
        "steps_completed": trainer.cursor.step,
        "final_val_loss": trainer.final_val_loss,
        "tokens": trainer.cursor.tokens,
        "counters": trainer.counters,
        "skip_windows": trainer.cursor.skip_windows,
    }
