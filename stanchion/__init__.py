"""Stanchion's shared kernel: what every part of Stanchion (trainer, agent, coordinator, the CLI)
needs and none of them owns. It imports nothing from those packages, and importing it loads neither
gRPC nor torch.

- :mod:`stanchion.settings`: configuration files, ``--set`` overrides and validation errors.
- :mod:`stanchion.files`: atomic JSON files, directory fsync, JSON-lines writing and reading.
- :mod:`stanchion.waiting`: a deadline-bounded wait on a condition, and jittered backoff.
- :mod:`stanchion.buildinfo`: version and revision; :mod:`stanchion.sdnotify`: systemd readiness.
- :mod:`stanchion.identity`: node ids, roles and certificate names; :mod:`stanchion.tls` (loads gRPC):
  the TLS credentials both daemons and the CLI build from a certificate directory.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stanchion")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
