"""`python -m trainer` / `torchrun -m trainer`: one trainer rank (see trainer/cli.py for flags)."""

from stanchion.sdk.runtime import exit_process
from trainer.cli import main

if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # the guard leaves this way when superseded or stopped while waiting
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    exit_process(code)  # without the interpreter's shutdown after a broken generation
