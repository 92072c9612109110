"""Stanchion's operator side: the `stanchion` CLI, node checks, bisection planner, benchmarks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stanchion")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
