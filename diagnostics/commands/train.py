"""`stanchion train`: run the trainer directly (one process, or --nproc N local ranks).

The flags are the trainer's own (trainer/cli.py), so `stanchion train ...` and
`torchrun --nproc-per-node N -m trainer ...` accept exactly the same ones.
"""

from __future__ import annotations

import typer


def train(ctx: typer.Context) -> None:
    """Train a model: the same flags as `torchrun -m trainer` (run `stanchion train --help`)."""
    from trainer.cli import main

    raise typer.Exit(code=main(list(ctx.args), prog="stanchion train"))


# Everything after `train` goes to the trainer's own parser, --help included.
train.command_settings = {  # type: ignore[attr-defined]
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    "add_help_option": False,
}
