"""Shared helpers for the deploy tests: paths, and the real tools they run.

A missing tool fails the test with the command that installs it; it never skips. `make test`
installs promtool (apt package `prometheus`) and kubernetes-validate (the `dev` extra); kubectl and
systemd-analyze come with the development image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs"

INSTALL_HINTS = {
    "promtool": "apt-get install -y --no-install-recommends prometheus  (or run `make system-deps`)",
    "kubectl": "install the `kubectl` package (v1.27+, it carries kustomize); it is preinstalled in the development image",
    "systemd-analyze": "apt-get install -y systemd  (preinstalled in the development image)",
}


def require_tool(name: str) -> str:
    """The path of a command-line tool; fails the test, with how to install it, when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINTS.get(name, 'install it')}", pytrace=False)
    return path


def kubernetes_validate_cmd() -> list[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: .venv/bin/pip install kubernetes-validate "
            "(it is in the `dev` extra: pip install -e '.[dev]')",
            pytrace=False,
        )
    return [sys.executable, "-m", "kubernetes_validate"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, **kwargs)
