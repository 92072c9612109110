"""In-memory snapshots: restore is bit-exact for parameters and optimizer state, and the ring keeps
the newest snapshots in order."""

from __future__ import annotations

import pytest
import torch

from stanchion.sdk.snapshot import SnapshotRing


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def setup(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, torch.Generator().manual_seed(seed)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


def live_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list, list]:
    params = [p.detach().clone() for p in model.parameters()]
    optim = [
        {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {}
        for g in opt.param_groups
        for p in g["params"]
    ]
    return params, optim


def assert_same_state(a: tuple[list, list], b: tuple[list, list]) -> None:
    (pa, oa), (pb, ob) = a, b
    assert len(pa) == len(pb) and all(same_bits(x, y) for x, y in zip(pa, pb, strict=True))
    assert [sorted(s) for s in oa] == [sorted(s) for s in ob]
    for sa, sb in zip(oa, ob, strict=True):
        for k in sa:
            assert same_bits(sa[k], sb[k]), k


def test_restore_is_bit_exact_for_parameters_and_optimizer_state(seed):
    model, opt, gen = setup(seed)
    xs = [torch.randn(8, 5, generator=gen) for _ in range(4)]
    train_step(model, opt, xs[0])
    ring = SnapshotRing(keep=2)
    ring.take(1, model, opt, {"cursor": {"step": 1}})
    saved = live_state(model, opt)

    train_step(model, opt, xs[1])
    train_step(model, opt, xs[2])
    assert not same_bits(saved[0][0], next(model.parameters()))

    extra = ring.restore(ring.newest_at_or_before(1), model, opt)
    assert extra == {"cursor": {"step": 1}}
    assert_same_state(live_state(model, opt), saved)

    # The restored run continues exactly as the original did from step 1.
    train_step(model, opt, xs[1])
    after_one_more = live_state(model, opt)
    model2, opt2, _ = setup(seed)
    train_step(model2, opt2, xs[0])
    train_step(model2, opt2, xs[1])
    assert_same_state(after_one_more, live_state(model2, opt2))


def test_a_snapshot_is_a_copy(seed):
    model, opt, gen = setup(seed)
    train_step(model, opt, torch.randn(8, 5, generator=gen))
    ring = SnapshotRing(keep=1)
    extra = {"spikes": {"loss": [[1, 2.0]]}}
    ring.take(1, model, opt, extra)
    saved = live_state(model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for state in opt.state.values():
            state["exp_avg"].mul_(3.0)
    extra["spikes"]["loss"].append([2, 3.0])
    snap = ring.ring[0]
    assert all(same_bits(a, b) for a, b in zip(snap.params, saved[0], strict=True))
    assert snap.extra == {"spikes": {"loss": [[1, 2.0]]}}
    restored_extra = ring.restore(snap, model, opt)
    restored_extra["spikes"]["loss"].clear()  # the caller's copy, not the snapshot's
    assert snap.extra == {"spikes": {"loss": [[1, 2.0]]}}
    assert_same_state(live_state(model, opt), saved)


def test_restoring_a_snapshot_from_before_the_first_step_clears_optimizer_state(seed):
    model, opt, gen = setup(seed)
    initial = live_state(model, opt)
    ring = SnapshotRing(keep=2)
    ring.take(0, model, opt, {})
    xs = [torch.randn(8, 5, generator=gen) for _ in range(2)]
    train_step(model, opt, xs[0])
    train_step(model, opt, xs[1])
    assert len(opt.state) == len(list(model.parameters())) == 4

    ring.restore(ring.newest_at_or_before(0), model, opt)
    assert len(opt.state) == 0
    assert_same_state(live_state(model, opt), initial)

    # And the next step is the very first step again (fresh moments, step counter 1).
    train_step(model, opt, xs[0])
    model2, opt2, _ = setup(seed)
    train_step(model2, opt2, xs[0])
    assert_same_state(live_state(model, opt), live_state(model2, opt2))


def test_newest_at_or_before(seed):
    model, opt, _ = setup(seed)
    ring = SnapshotRing(keep=3)
    for step in (10, 20, 30):
        ring.take(step, model, opt, {"step": step})
    assert ring.newest_at_or_before(30).step == 30
    assert ring.newest_at_or_before(29).step == 20
    assert ring.newest_at_or_before(10).step == 10
    assert ring.newest_at_or_before(9) is None
    assert ring.newest_at_or_before(-1).step == 30  # -1: the newest
    assert SnapshotRing(keep=2).newest_at_or_before(-1) is None


def test_the_ring_keeps_the_newest(seed):
    model, opt, _ = setup(seed)
    ring = SnapshotRing(keep=2)
    for step in (5, 10, 15, 20):
        ring.take(step, model, opt, {})
    assert ring.steps() == [15, 20] and len(ring) == 2
    ring.clear()
    assert ring.steps() == [] and len(ring) == 0


def test_restore_drops_newer_snapshots(seed):
    model, opt, gen = setup(seed)
    ring = SnapshotRing(keep=4)
    for step in (10, 20, 30, 40):
        train_step(model, opt, torch.randn(8, 5, generator=gen))
        ring.take(step, model, opt, {"step": step})
    assert ring.restore(ring.newest_at_or_before(25), model, opt) == {"step": 20}
    assert ring.steps() == [10, 20]
    ring.restore(ring.ring[0], model, opt)
    assert ring.steps() == [10]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("snapshot_step", [0, 2])
def test_rollback_to_any_snapshot_replays_exactly_even_through_a_checkpoint(name, snapshot_step):
    """The trainer's optimizer, a snapshot at step 0 (the initial state) or at a later step; train
    on, restore, let a checkpoint read the restored state (DCP's get_state_dict, which every
    checkpoint calls, and which after a rollback to step 0 ran before the replay), then replay the
    same steps: bitwise the state of a run that never rolled back."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer.config import ModelConfig, OptimConfig
    from trainer.model import GPT
    from trainer.optim import build_optimizer, lr_at, set_lr

    mcfg = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=8)
    ocfg = OptimConfig(name=name, lr=1e-2, warmup_steps=2)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randint(0, 32, (2, 8), generator=gen) for _ in range(snapshot_step + 3)]

    def steps(model, opt, first, last):
        for i in range(first, last):
            opt.zero_grad(set_to_none=True)
            set_lr(opt, lr_at(i, ocfg, 10))
            _, loss = model(xs[i], xs[i])
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    model = GPT(mcfg)
    opt = build_optimizer(model, ocfg)
    steps(model, opt, 0, snapshot_step)
    ring = SnapshotRing(keep=2)
    ring.take(snapshot_step, model, opt, {"cursor": {"step": snapshot_step}})
    saved = live_state(model, opt)
    steps(model, opt, snapshot_step, len(xs))  # the steps a fault makes us undo

    assert ring.restore(ring.newest_at_or_before(snapshot_step), model, opt) == {
        "cursor": {"step": snapshot_step}
    }
    assert_same_state(live_state(model, opt), saved)
    get_state_dict(model, opt)  # a checkpoint of the restored step
    assert_same_state(live_state(model, opt), saved)
    steps(model, opt, snapshot_step, len(xs))

    reference_model = GPT(mcfg)
    reference = build_optimizer(reference_model, ocfg)
    steps(reference_model, reference, 0, len(xs))
    assert_same_state(live_state(model, opt), live_state(reference_model, reference))


def test_a_background_snapshot_holds_the_state_it_was_taken_at_and_reuses_the_evicted_buffers(seed):
    """Copied while the next step computes its gradients (which write neither parameters nor
    optimizer state); settled before that step's optimizer step, as the guard does."""
    model, opt, gen = setup(seed)
    ring = SnapshotRing(keep=2)
    states, buffers = [], []
    for step in range(1, 5):
        train_step(model, opt, torch.randn(8, 5, generator=gen))
        states.append(live_state(model, opt))
        ring.take(step, model, opt, {"step": step}, background=True)
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 5, generator=gen)).pow(2).mean().backward()  # the next step's backward
        ring.settle()
        buffers.append(ring.ring[-1].params[0].data_ptr())
    assert ring.steps() == [3, 4]
    for snap in ring.ring:
        assert all(same_bits(a, b) for a, b in zip(snap.params, states[snap.step - 1][0], strict=True))
        assert snap.extra == {"step": snap.step}
    # Steady state: the snapshot evicted lends its host buffers to the new one (steps 1 -> 3, 2 -> 4).
    assert buffers[2] == buffers[0] and buffers[3] == buffers[1] and buffers[0] != buffers[1]
    ring.restore(ring.newest_at_or_before(3), model, opt)
    assert_same_state(live_state(model, opt), states[2])


def test_every_read_of_the_ring_waits_for_the_copy_and_a_failed_copy_raises_there(seed, monkeypatch):
    from stanchion.sdk import snapshot

    model, opt, gen = setup(seed)
    train_step(model, opt, torch.randn(8, 5, generator=gen))
    ring = SnapshotRing(keep=2)
    ring.take(1, model, opt, {}, background=True)
    assert ring.newest_at_or_before(1).step == 1  # settled by the read itself

    def broken(t, reuse):
        raise RuntimeError("host memory exhausted")

    monkeypatch.setattr(snapshot, "_to_host", broken)
    ring.take(2, model, opt, {}, background=True)
    with pytest.raises(RuntimeError, match="host memory exhausted"):
        ring.settle()
    assert ring.steps() == [1]  # the failed snapshot was never counted as taken


def test_a_process_that_ends_while_a_snapshot_is_copied_exits_cleanly(tmp_path):
    """A copy still running at interpreter exit used to abort the process ("terminate called
    without an active exception", exit 134): the last step of a run can take a snapshot."""
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(
        "import torch\n"
        "from stanchion.sdk.snapshot import SnapshotRing\n"
        "m = torch.nn.Linear(6000, 6000)\n"
        "SnapshotRing(2).take(1, m, torch.optim.SGD(m.parameters(), lr=0.1), {}, background=True)\n"
    )
    from support import REPO, env

    p = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env(), cwd=REPO
    )
    assert p.returncode == 0 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-2000:])


def test_reserved_buffers_hold_every_snapshot_from_the_first_and_a_clear_keeps_them(seed):
    """Preallocated host buffers: the first snapshots of a run copy into buffers reserved (on a
    thread) before them, so no snapshot step allocates; buffers a clear or a restore drops are kept
    for the next snapshots, never more than the ring holds."""
    model, opt, gen = setup(seed)
    train_step(model, opt, torch.randn(8, 5, generator=gen))  # AdamW's state exists
    ring = SnapshotRing(keep=2)
    ring.reserve(model, opt)
    ring._join_reserve()
    reserved = sorted(s.params[0].data_ptr() for s in ring._spare)
    reserved_moments = sorted(s.optim[0]["exp_avg"].data_ptr() for s in ring._spare)
    assert len(reserved) == 2 and all(float(t.abs().sum()) == 0 for s in ring._spare for t in s.params)
    states = []
    for step in (1, 2):
        train_step(model, opt, torch.randn(8, 5, generator=gen))
        states.append(live_state(model, opt))
        ring.take(step, model, opt, {"step": step}, background=True)
        ring.settle()
    assert sorted(s.params[0].data_ptr() for s in ring.ring) == reserved  # nothing newly allocated
    assert sorted(s.optim[0]["exp_avg"].data_ptr() for s in ring.ring) == reserved_moments
    for snap, state in zip(ring.ring, states, strict=True):
        assert all(same_bits(a, b) for a, b in zip(snap.params, state[0], strict=True))
    ring.restore(ring.newest_at_or_before(1), model, opt)  # drops step 2: its buffers become spare
    assert_same_state(live_state(model, opt), states[0])
    ring.clear()
    assert sorted(s.params[0].data_ptr() for s in ring._spare) == reserved
    ring.reserve(model, opt)  # nothing missing: no thread, no allocation
    assert ring._reserving is None
    train_step(model, opt, torch.randn(8, 5, generator=gen))
    ring.take(3, model, opt, {"step": 3})
    assert ring.ring[-1].params[0].data_ptr() in reserved
    assert_same_state(live_state(model, opt), (ring.ring[-1].params, ring.ring[-1].optim))


def test_an_unverified_snapshot_is_no_rollback_target_until_its_verdict(seed):
    """A snapshot taken beside a folded fingerprint check waits for the next step's verdict: only
    an agreement makes it a rollback target; a disagreement drops it and keeps its buffers."""
    model, opt, gen = setup(seed)
    ring = SnapshotRing(keep=2)
    ring.take(1, model, opt, {"step": 1})
    train_step(model, opt, torch.randn(8, 5, generator=gen))
    ring.take(2, model, opt, {"step": 2}, background=True, verified=False)
    assert ring.newest_at_or_before(-1).step == 1 and ring.newest_at_or_before(2).step == 1
    ring.verify(2)
    assert ring.newest_at_or_before(-1).step == 2
    ring.take(3, model, opt, {"step": 3}, verified=False)
    buffers = ring.ring[-1].params[0].data_ptr()
    ring.reject_unverified()
    assert ring.steps() == [2] and ring.newest_at_or_before(-1).step == 2
    ring.take(4, model, opt, {"step": 4}, verified=False)
    assert ring.ring[-1].params[0].data_ptr() == buffers  # the rejected snapshot's buffers, reused
    assert ring.steps() == [2, 4]  # the verified one was not evicted: the ring had room


def test_a_pinned_snapshot_outlives_newer_ones_until_a_restore(seed):
    """The rollback target of an alarm stays while snapshots go on every step (the coordinator's
    rollback takes a few steps to arrive); eviction takes the oldest unpinned one instead."""
    model, opt, gen = setup(seed)
    ring = SnapshotRing(keep=3)
    states = {}
    for step in range(1, 4):
        train_step(model, opt, torch.randn(8, 5, generator=gen))
        states[step] = live_state(model, opt)
        ring.take(step, model, opt, {"step": step})
    ring.pin(2)
    for step in range(4, 9):
        train_step(model, opt, torch.randn(8, 5, generator=gen))
        ring.take(step, model, opt, {"step": step})
    assert ring.steps() == [2, 7, 8]
    assert ring.restore(ring.newest_at_or_before(2), model, opt) == {"step": 2}
    assert_same_state(live_state(model, opt), states[2])
    for step in range(3, 6):  # the pin went with the restore: the ring keeps the newest again
        ring.take(step, model, opt, {"step": step})
    assert ring.steps() == [3, 4, 5]
    ring.pin(4)
    ring.pin(-1)  # a new pin replaces the old one: the newest verified
    ring.take(6, model, opt, {"step": 6})
    ring.take(7, model, opt, {"step": 7})
    assert ring.steps() == [5, 6, 7]
