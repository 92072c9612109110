"""Stanchion: fault tolerance for your own torch.distributed training loop, and the kernel every part
of Stanchion shares.

The public, stable surface (docs/sdk.md)::

    import stanchion

    rt = stanchion.join()                                  # rank, world size, device, generation
    guard = stanchion.guard(rt, model, optimizer, steps=N, ...)
    for step in guard:
        with guard.step() as s:
            s.backward(loss_fn(model, batch_at(s.data_index, rt.rank, 0)))
        guard.maybe_checkpoint()
    guard.finish()

``join``, ``guard``, ``Protections``, ``collective`` and ``pause`` are loaded on first use, so ``import
stanchion`` loads neither torch nor gRPC. Everything under :mod:`stanchion.sdk` other than these
names is internal. The kernel modules (configuration, files, waiting, identity, TLS, vocabularies)
serve the trainer, the agent, the coordinator and the CLI.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("stanchion")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_PUBLIC = {
    "join": "stanchion.sdk.runtime",
    "Runtime": "stanchion.sdk.runtime",
    "guard": "stanchion.sdk.guard",
    "Guard": "stanchion.sdk.guard",
    "Step": "stanchion.sdk.guard",
    "Protections": "stanchion.sdk.protections",
    "collective": "stanchion.sdk.parallel",
    "CollectiveFailed": "stanchion.sdk.parallel",
    "pause": "stanchion.sdk.liveness",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stanchion' has no attribute {name!r}")
