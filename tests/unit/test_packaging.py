"""The five top-level packages come from this repository, not from same-named PyPI projects."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["agent", "coordinator", "trainer", "diagnostics", "protos"])
def test_package_imports_from_this_repository(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_cli_version_help_and_usage_errors() -> None:
    exe = [sys.executable, "-m", "diagnostics.cli"]
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, cwd=REPO)
    assert version.returncode == 0
    assert version.stdout.startswith("stanchion ")
    help_ = subprocess.run([*exe, "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0 and "Usage:" in help_.stdout
    bad = subprocess.run([*exe, "--no-such-flag"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "--no-such-flag" in bad.stderr


def test_light_modules_do_not_import_torch() -> None:
    """The CLI, the config and the trainer contract stay importable without paying for torch."""
    code = (
        "import sys, diagnostics.cli, trainer.config, stanchion.sdk.contract, stanchion.settings;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
