"""What build is running: the package version and, in a source checkout, the git revision."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from stanchion import __version__


@functools.cache
def revision() -> str:
    """The git revision of a source checkout (empty for an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=2,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build_info(component: str) -> GaugeMetricFamily:
    """`stanchion_build_info{version, revision, component} 1`, exported by both daemons."""
    g = GaugeMetricFamily(
        "stanchion_build_info",
        "Build identity of this Stanchion process.",
        labels=["version", "revision", "component"],
    )
    g.add_metric([__version__, revision(), component], 1)
    return g
