"""Worker processes that the benchmarks start: ``python -m diagnostics.bench WORKER ARGS``.

- ``baseline-worker TRAINER-FLAGS``: one rank of the plain DDP / FSDP2 / HSDP baseline of `bench
  trainer`, run under torchrun (:func:`diagnostics.bench.trainer.baseline_worker`, command built by
  ``baseline_command``);
- ``sdk-worker --mode plain|guarded --run-dir DIR ...``: one rank of `bench sdk`, a user's own loop
  plain or under the guard, run under torchrun (:mod:`diagnostics.bench.sdk_worker`, command built
  by :func:`diagnostics.bench.sdk.sdk_command`);
- ``checkpoint-worker --run-dir DIR --rounds R --gap G --window W -- TRAINER-FLAGS``: one rank of
  `bench checkpoint`, run under torchrun (:func:`diagnostics.bench.checkpoint.checkpoint_worker`,
  command built by ``checkpoint_command``);
- ``coordinator-client SPEC.json``: one process of simulated agents of `bench coordinator`
  (:func:`diagnostics.bench.coordinator.client_main`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = (
    "usage: torchrun --nproc-per-node N -m diagnostics.bench baseline-worker TRAINER-FLAGS\n"
    "       torchrun --nproc-per-node N -m diagnostics.bench sdk-worker --mode plain|guarded --run-dir DIR\n"
    "       torchrun --nproc-per-node N -m diagnostics.bench checkpoint-worker --run-dir DIR --rounds R "
    "--gap G --window W -- TRAINER-FLAGS\n"
    "       python -m diagnostics.bench coordinator-client SPEC.json"
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["baseline-worker"]:
        from diagnostics.bench.trainer import baseline_worker

        return baseline_worker(argv[1:])
    if argv[:1] == ["sdk-worker"]:
        from diagnostics.bench.sdk_worker import main as sdk_worker

        return sdk_worker(argv[1:])
    if argv[:1] == ["checkpoint-worker"]:
        from diagnostics.bench.checkpoint import checkpoint_worker

        return checkpoint_worker(argv[1:])
    if argv[:1] == ["coordinator-client"]:
        from diagnostics.bench.coordinator import client_main

        return client_main(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
