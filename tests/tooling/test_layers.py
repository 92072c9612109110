"""The package layers hold: `lint-imports` checks the contracts in pyproject.toml ([tool.importlinter]):
diagnostics over agent | coordinator over trainer | protos over the stanchion kernel, no cycles
between them, no gRPC in the trainer, neither gRPC nor torch in the kernel."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports is missing: `make install-dev` installs import-linter"
    r = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "0 broken" in r.stdout, r.stdout[-2000:]
