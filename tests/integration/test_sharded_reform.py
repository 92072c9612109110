"""An FSDP2 model re-formed in place (stanchion/sdk/sharded.py): a step cut short in its backward
pass, then a new generation's process group under the same mesh, ends bit-exact with the run that
had neither; a world the mesh no longer fits is refused, so the rank starts over as a new process;
the audit's reduce-scatter tap refuses to replace a program's own reduce-scatter."""

from __future__ import annotations

import subprocess
import sys

import torch
from support import REPO, env

PROGRAM = REPO / "tests" / "programs" / "sharded_reform.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROGRAM), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env(),
        cwd=REPO,
    )


def test_a_step_cut_short_and_a_new_group_leave_no_trace(tmp_path):
    ref = run("train", "--store", str(tmp_path / "store-ref"), "--out", str(tmp_path / "ref.pt"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = run(
        "train", "--store", str(tmp_path / "store-cut"), "--cut", "3", "--out", str(tmp_path / "cut.pt")
    )
    assert cut.returncode == 0, cut.stderr[-3000:]
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "cut.pt")
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    # The root's gradients from the cut step's backward are dropped, not added to the redone step's.
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_world_the_mesh_no_longer_fits_is_refused(tmp_path):
    p = run("shrink", "--store", str(tmp_path / "store"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LayoutChanged: mesh (2,) cannot be re-made" in p.stdout, p.stdout


def test_the_audits_tap_never_replaces_a_programs_own_reduce_scatter(tmp_path):
    p = run("own-comm", "--store", str(tmp_path / "store"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "has its own reduce-scatter (Mine)" in p.stdout and "audit_every=0" in p.stdout, p.stdout
    assert "installed over" not in p.stdout
