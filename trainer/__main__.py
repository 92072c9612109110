"""`python -m trainer` / `torchrun -m trainer`: one trainer rank (see trainer/cli.py for flags)."""

import logging
import os
import sys

from stanchion.sdk.checkpoint import blocked_by_abandoned_checkpoint
from trainer.cli import main

if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # the guard leaves this way when superseded or stopped while waiting
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if blocked_by_abandoned_checkpoint():
        # A checkpoint abandoned with a broken generation may still block in a collective until the
        # group's timeout; the interpreter would join its thread at exit. Nothing of it is needed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
