"""The SDK's public surface and its pure parts; the guard's refusals in a one-rank process of their
own (a process group and SIGTERM handler must not leak into other tests)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO, env

from stanchion.sdk.guard import (
    decode_state,
    encode_state,
    heal_sources,
    replica_groups,
    shard_groups,
    top_level_groups,
)


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess[str]:
    e = env(STANCHION_RUN_DIR=str(tmp_path / "run"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        e.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=e, cwd=REPO
    )


def test_import_stanchion_loads_torch_only_when_the_sdk_is_used(tmp_path):
    p = run_python(
        "import sys, stanchion\n"
        "before = 'torch' in sys.modules\n"
        "join, guard = stanchion.join, stanchion.guard\n"
        "print(before, 'torch' in sys.modules, join.__module__, guard.__module__)\n",
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "True", "stanchion.sdk.runtime", "stanchion.sdk.guard"]


def test_an_unknown_name_is_an_attribute_error():
    import stanchion

    with pytest.raises(AttributeError, match="has no attribute 'gaurd'"):
        stanchion.gaurd  # noqa: B018


def test_replica_groups_follow_the_replicate_dimension():
    mesh = [[0, 1, 2], [3, 4, 5]]  # 2 replicas x 3 shards
    assert replica_groups(mesh, ["replicate", "shard"], "replicate") == [[0, 3], [1, 4], [2, 5]]
    assert replica_groups([[0, 2], [1, 3]], ["shard", "replicate"], "replicate") == [[0, 2], [1, 3]]
    assert replica_groups([0, 1, 2, 3], ["shard"], None) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match=r"replicate_dim='dp'.*\['replicate', 'shard'\]"):
        replica_groups(mesh, ["replicate", "shard"], "dp")


def test_shard_groups_are_one_replica_each_and_cover_every_rank_once():
    mesh = [[0, 1, 2], [3, 4, 5]]
    assert shard_groups(mesh, ["replicate", "shard"], "replicate") == [[0, 1, 2], [3, 4, 5]]
    assert shard_groups([[0, 2], [1, 3]], ["shard", "replicate"], "replicate") == [[0, 1], [2, 3]]
    cube = torch.arange(8).reshape(2, 2, 2).tolist()  # (shard, replicate, tp)
    groups = shard_groups(cube, ["shard", "replicate", "tp"], "replicate")
    assert groups == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Each shard group meets each replica group in exactly one rank.
    for g in groups:
        for r in replica_groups(cube, ["shard", "replicate", "tp"], "replicate"):
            assert len(set(g) & set(r)) == 1


def test_each_replica_group_heals_from_its_own_member_at_the_newest_step():
    hsdp = [[0, 2], [1, 3]]  # 2 replicas x 2 shards: ranks 0 and 2 hold the same shard
    # Rank 0 was replaced (no state): its shard comes from rank 2; rank 1's group from rank 1.
    assert heal_sources([(False, 0), (True, 9), (True, 9), (True, 9)], hsdp) == (9, [2, 1])
    # The newest state wins within a group, then the lowest rank.
    assert heal_sources([(True, 8), (True, 9), (True, 9), (True, 9)], hsdp) == (9, [2, 1])
    ddp = [[0, 1, 2]]
    assert heal_sources([(True, 5), (False, 0), (True, 5)], ddp) == (5, [0])


def test_no_heal_when_a_shard_has_no_holder_or_the_shards_disagree_on_the_step():
    # Both holders of one shard lost: no peer can supply it, so a checkpoint restores everyone.
    assert heal_sources([(False, 0), (True, 9), (False, 0), (True, 9)], [[0, 2], [1, 3]]) is None
    # Plain FSDP: every rank is its own group; a replacement's shard exists nowhere else.
    assert heal_sources([(True, 4), (False, 0)], [[0], [1]]) is None
    assert heal_sources([(True, 4), (True, 4)], [[0], [1]]) == (4, [0, 1])
    # Shards at different steps would not make one model.
    assert heal_sources([(True, 9), (True, 8), (False, 0), (False, 0)], [[0, 2], [1, 3]]) is None


def test_registered_state_round_trips_through_a_manifest():
    plain = {"scheduler.0": {"last_epoch": 7, "base_lrs": [0.1], "_last_lr": [0.05]}}
    assert encode_state(plain) == {"json": plain}
    assert decode_state(json.loads(json.dumps(encode_state(plain)))) == plain
    with_tensor = {"ema": {"shadow": torch.arange(4.0)}, "pos": {"n": float("nan")}}
    encoded = json.loads(json.dumps(encode_state(with_tensor)))
    assert set(encoded) == {"torch"}
    back = decode_state(encoded)
    assert torch.equal(back["ema"]["shadow"], torch.arange(4.0)) and back["pos"]["n"] != back["pos"]["n"]


def test_default_norm_groups_are_the_top_level_children():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    assert top_level_groups(model) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}


REFUSALS = r"""
import json, torch, stanchion
model = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rt = stanchion.join()
errors = {}
def attempt(name, fn):
    try:
        fn()
        errors[name] = None
    except (TypeError, ValueError) as e:
        errors[name] = f"{type(e).__name__}: {e}"
ddp = torch.nn.parallel.DistributedDataParallel(model)
attempt("ddp", lambda: stanchion.guard(rt, ddp, opt, steps=3))
attempt("optimizers", lambda: stanchion.guard(rt, model, [opt], steps=3))
attempt("steps", lambda: stanchion.guard(rt, model, opt, steps=0))
attempt("audit", lambda: stanchion.guard(rt, model, opt, steps=3, batch_at=lambda i, r, m: None))
attempt("state", lambda: stanchion.guard(rt, model, opt, steps=3, state={"loader": object()}))
print(json.dumps(errors))
"""


def test_the_guard_refuses_what_it_cannot_protect_and_says_why(tmp_path):
    p = run_python(REFUSALS, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = json.loads(p.stdout.strip().splitlines()[-1])
    assert errors["ddp"].startswith("TypeError: guard(model=...): pass the module itself")
    assert "re-forming" in errors["ddp"]
    assert (
        errors["optimizers"]
        == "TypeError: guard(optimizer=...): expected one torch.optim.Optimizer, got list"
    )
    assert errors["steps"] == "ValueError: guard(steps=0): must be > 0"
    assert errors["audit"].startswith("ValueError: guard(): pass batch_at and loss_fn together")
    assert errors["state"] == (
        "TypeError: guard(state={'loader': ...}): needs state_dict() and load_state_dict()"
    )


SNAPSHOTS = r"""
import json, os, torch, stanchion
out = {}
for every in (20, 0):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = stanchion.join(run_dir=os.path.join(os.environ["STANCHION_RUN_DIR"], str(every)))
    g = stanchion.guard(rt, model, opt, steps=1, protections=stanchion.Protections(snapshot_every=every))
    out[every] = g.snapshots.steps()
    g.finish()
print(json.dumps(out))
"""


def test_a_generation_starts_with_a_snapshot_unless_snapshots_are_off(tmp_path):
    p = run_python(SNAPSHOTS, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"20": [0], "0": []}


PARENT = r"""
import os, subprocess, sys, time
env = dict(os.environ, STANCHION_PARENT_PID=str(os.getpid()), STANCHION_STANDBY="1",
           STANCHION_WORKER_DIR=sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import stanchion; stanchion.join()"], env=env)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_standby_of_a_users_program_dies_with_its_agent(tmp_path):
    """A rank waiting in join() (and one training after it) must not outlive the agent that started
    it: an orphan would train on beside the replacement the coordinator starts."""
    import os
    import signal

    from stanchion.files import read_jsonl
    from stanchion.waiting import wait_until

    worker = tmp_path / "w0"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(worker)], stdout=subprocess.PIPE, text=True, env=env(), cwd=REPO
    )
    child = 0
    try:
        child = int(parent.stdout.readline())
        wait_until(
            lambda: any(e["event"] == "standby" for e in read_jsonl(worker / "events.jsonl")),
            60,
            "the program's standby to announce itself",
        )
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)

        def gone() -> bool:
            try:
                with open(f"/proc/{child}/stat") as f:
                    return f.read().split(") ", 1)[1].startswith("Z")  # exited, not yet reaped
            except FileNotFoundError:
                return True

        wait_until(gone, 30, "the standby to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child:  # stop the standby if the feature under test failed to (it names its worker dir)
            with contextlib.suppress(OSError):
                if str(worker).encode() in Path(f"/proc/{child}/environ").read_bytes():
                    os.kill(child, signal.SIGKILL)


EXIT_AFTER = r"""
import atexit, sys, torch, stanchion
from stanchion.sdk import parallel
from stanchion.sdk.runtime import exit_process
rt = stanchion.join()
atexit.register(lambda: print("interpreter shutdown ran", flush=True))
rt.leave(broken=sys.argv[1] == "broken")
print("left", flush=True)  # flushed before the process ends either way
if sys.argv[2] == "exit_process":
    exit_process(3)
rt.end_safely_at_exit()  # what Guard.finish() ends with
if sys.argv[2] == "raise":
    raise RuntimeError("after the loop")
"""


@pytest.mark.parametrize(
    ("left", "end", "code", "shutdown"),
    [
        ("broken", "exit_process", 3, False),
        ("clean", "exit_process", 3, True),
        ("broken", "return", 0, False),
        ("broken", "raise", 1, False),
        ("clean", "return", 0, True),
    ],
)
def test_a_process_that_left_a_broken_group_ends_without_the_interpreters_shutdown(
    tmp_path, left, end, code, shutdown
):
    """A broken group's collectives may end in gloo's threads while the interpreter shuts down,
    which aborts the process (exit 134 after a job that finished): such a process skips that
    shutdown, with the exit code it would have had; one that left cleanly ends normally."""
    e = env(STANCHION_RUN_DIR=str(tmp_path / "run"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        e.pop(name, None)
    p = subprocess.run(
        [sys.executable, "-c", EXIT_AFTER, left, end],
        capture_output=True,
        text=True,
        timeout=120,
        env=e,
        cwd=REPO,
    )
    assert p.returncode == code, p.stderr[-2000:]
    assert "left" in p.stdout.split("\n")
    assert ("interpreter shutdown ran" in p.stdout) is shutdown, p.stdout
    if end == "raise":
        assert "RuntimeError: after the loop" in p.stderr  # the traceback is printed first
