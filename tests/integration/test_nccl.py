"""NCCL failure handling on a GPU (`pytest -m gpu`, run by scripts/gpu-check.sh): a collective is
awaited by polling, one that cannot complete is given up at its deadline, its communicator is
aborted while the device still runs, and the process forms a new group and goes on. The logic of
these paths is tested on the CPU in tests/unit/test_collective_wait.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import REPO, env


@pytest.mark.gpu
def test_an_nccl_collective_is_given_up_aborted_and_the_group_formed_again():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    p = subprocess.run(
        [sys.executable, str(REPO / "tests" / "programs" / "nccl_single.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.endswith(": ok")]
    assert [line.split()[0] for line in lines] == ["awaited:", "given", "aborted", "re-formed:"], p.stdout
