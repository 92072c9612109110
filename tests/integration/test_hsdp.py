"""HSDP under the guard: the gradient norm counts each shard once, as the unsharded model's does."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from support import REPO, env


def test_the_hsdp_gradient_norm_equals_the_unsharded_models(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
        + [str(REPO / "tests" / "programs" / "hsdp_norms.py"), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env(),
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    guard, reference = out["guard"], out["reference"]
    # Sums of the same squares in another order (per shard, then across shards): equal to float32
    # rounding, where counting every shard once per replica would be sqrt(2) = 1.41 times too large.
    assert math.isclose(guard["total"], reference["total"], rel_tol=1e-5), out
    assert guard["layers"].keys() == reference["layers"].keys()
    for name, norm in reference["layers"].items():
        assert math.isclose(guard["layers"][name], norm, rel_tol=1e-5), (name, out)
