"""`python -m trainer` / `torchrun -m trainer`: one trainer rank (see trainer/cli.py for flags)."""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
