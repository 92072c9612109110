"""The optimizer's state exists, explicit, from step 0 (trainer.optim.reset_state).

torch creates optimizer state lazily in the first step(), and torch.distributed.checkpoint's
get_state_dict, which every checkpoint calls, fills an empty state in its own way: a zero-gradient,
zero-learning-rate step that leaves every step counter at 1. A checkpoint taken at step 0 (after a
rollback to the initial snapshot) thereby changed the bias correction of every following step. These
tests pin the explicit initial state: it trains bitwise like torch's lazy one, and nothing that reads
it changes it."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from stanchion.sdk.fingerprint import state_digest
from trainer.config import ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, reset_state

# (optimizer name, device_type given to build_optimizer): "cuda" pins fused AdamW, which also runs on CPU.
KINDS = [("adamw", "cpu"), ("adamw", "cuda"), ("adafactor", "cpu")]


def tiny_model() -> GPT:
    return GPT(ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=8))


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 32, (2, 8), generator=gen) for _ in range(n)]


def train(model: GPT, opt: torch.optim.Optimizer, xs: list[torch.Tensor]) -> None:
    for x in xs:
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(
    model: GPT, opt: torch.optim.Optimizer | None = None
) -> list[tuple[str, torch.dtype, str, bytes]]:
    """Every parameter and optimizer-state tensor, bitwise, with its dtype and device."""
    out = [(f"param/{n}", p.dtype, str(p.device), bits(p)) for n, p in model.named_parameters()]
    if opt is None:
        return out
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for k, v in sorted(opt.state.get(p, {}).items()):
            out.append((f"optim/{i}/{k}", v.dtype, str(v.device), bits(v)))
    return out


@pytest.mark.parametrize(("name", "device_type"), KINDS)
def test_the_explicit_initial_state_trains_bitwise_like_the_lazy_one(name: str, device_type: str) -> None:
    cfg = OptimConfig(name=name, lr=1e-2)
    lazy_model, eager_model = tiny_model(), tiny_model()
    initial = snapshot(eager_model)
    eager = build_optimizer(eager_model, cfg, device_type=device_type)
    lazy = build_optimizer(lazy_model, cfg, device_type=device_type)
    lazy.state.clear()  # what torch gives: no state until the first step

    n_params = len(list(eager_model.parameters()))
    assert len(eager.state) == n_params, "every parameter has its state before the first step"
    assert all(p.grad is None for p in eager_model.parameters())
    assert snapshot(eager_model) == initial, "building the optimizer moved a parameter"
    assert [g["lr"] for g in eager.param_groups] == [cfg.lr, cfg.lr]
    for state in eager.state.values():
        assert all(not bool(v.any()) for v in state.values())  # step 0, zero moments

    xs = batches(4)
    for i, x in enumerate(xs):
        train(lazy_model, lazy, [x])
        train(eager_model, eager, [x])
        assert snapshot(eager_model, eager) == snapshot(lazy_model, lazy), f"differs after step {i + 1}"


@pytest.mark.parametrize(("name", "device_type"), KINDS)
def test_a_checkpoint_reading_the_initial_state_leaves_it_alone(name: str, device_type: str) -> None:
    """A checkpoint's fingerprint is taken before DCP reads the state: they must describe one state."""
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2), device_type=device_type)
    before, digest = snapshot(model, opt), state_digest(model, opt)
    get_state_dict(model, opt)  # what CheckpointManager.save and .load call
    assert snapshot(model, opt) == before
    assert state_digest(model, opt) == digest


@pytest.mark.parametrize(("name", "device_type"), KINDS)
def test_reset_state_after_training_is_the_state_of_a_new_optimizer(name: str, device_type: str) -> None:
    cfg = OptimConfig(name=name, lr=1e-2)
    model = tiny_model()
    opt = build_optimizer(model, cfg, device_type=device_type)
    fresh = snapshot(model, opt)
    xs = batches(3)
    train(model, opt, xs)
    model.init_weights(0)  # GPT() initialises with seed 0
    reset_state(opt)
    assert snapshot(model, opt) == fresh
    train(model, opt, xs)
    reference_model = tiny_model()
    reference = build_optimizer(reference_model, cfg, device_type=device_type)
    train(reference_model, reference, xs)
    assert snapshot(model, opt) == snapshot(reference_model, reference)


def test_reset_state_keeps_a_tensor_learning_rate_and_refuses_live_gradients() -> None:
    model = tiny_model()
    lr = torch.tensor(0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    reset_state(opt)
    assert opt.param_groups[0]["lr"] is lr and torch.equal(lr, torch.tensor(0.02))
    assert len(opt.state) == len(list(model.parameters()))

    _, loss = model(batches(1)[0], batches(1)[0])
    loss.backward()
    with pytest.raises(RuntimeError, match="gradients"):
        reset_state(opt)
