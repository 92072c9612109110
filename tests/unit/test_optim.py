"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from trainer.config import ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, decay_split, lr_at, set_lr


def tiny_model(**changes) -> GPT:
    cfg = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=8)
    return GPT(dataclasses.replace(cfg, **changes))


def test_only_linear_matrix_weights_decay():
    model = tiny_model(norm="layernorm", bias=True, tie_embeddings=False)
    decay, no_decay = decay_split(model)
    decay_names = [n for n, _ in decay]
    no_decay_names = [n for n, _ in no_decay]
    assert "blocks.0.attn.q_proj.weight" in decay_names
    assert "blocks.1.mlp.down_proj.weight" in decay_names
    assert "lm_head.weight" in decay_names  # untied: an ordinary projection
    assert all(n.endswith("_proj.weight") or n == "lm_head.weight" for n in decay_names)
    assert "tok_emb.weight" in no_decay_names
    assert "blocks.0.attn.q_proj.bias" in no_decay_names
    assert "blocks.0.norm1.weight" in no_decay_names and "blocks.0.norm1.bias" in no_decay_names
    assert "norm_f.weight" in no_decay_names
    # named_parameters order, every parameter exactly once.
    order = [n for n, _ in model.named_parameters()]
    assert sorted(decay_names + no_decay_names) == sorted(order)
    assert decay_names == [n for n in order if n in set(decay_names)]


def test_tied_embedding_appears_once_and_is_not_decayed():
    model = tiny_model(tie_embeddings=True)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    by_group = {g["group"]: g for g in opt.param_groups}
    assert by_group["decay"]["weight_decay"] == 0.1
    assert by_group["no_decay"]["weight_decay"] == 0.0
    assert any(p is model.tok_emb.weight for p in by_group["no_decay"]["params"])
    assert not any(p is model.lm_head.weight for p in by_group["decay"]["params"])
    assert opt.defaults["foreach"] is True


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizers_build_and_step(name):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2))
    expected = torch.optim.AdamW if name == "adamw" else torch.optim.Adafactor
    assert isinstance(opt, expected)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["blocks.0.attn.q_proj.weight"], model.blocks[0].attn.q_proj.weight)


def test_set_lr_updates_every_group():
    opt = build_optimizer(tiny_model(), OptimConfig())
    set_lr(opt, 1.5e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.5e-4, 1.5e-4]


LR, MIN_LR, WARMUP, TOTAL = 1.0, 0.1, 10, 100


def cfg(schedule: str, **changes) -> OptimConfig:
    return OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, schedule=schedule, **changes)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "plateau_linear", "constant"])
def test_warmup_is_shared_by_every_schedule(schedule):
    c = cfg(schedule)
    assert lr_at(0, c, TOTAL) == pytest.approx(LR / WARMUP)
    assert lr_at(4, c, TOTAL) == pytest.approx(LR * 5 / WARMUP)
    assert lr_at(WARMUP - 1, c, TOTAL) == LR
    assert lr_at(WARMUP, c, TOTAL) == LR  # decay starts from the peak


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_boundaries(schedule):
    c = cfg(schedule)
    assert lr_at(TOTAL - 1, c, TOTAL) > MIN_LR
    assert lr_at(TOTAL - 1, c, TOTAL) < MIN_LR + 0.02
    assert lr_at(TOTAL, c, TOTAL) == MIN_LR
    assert lr_at(TOTAL + 50, c, TOTAL) == MIN_LR
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_at(mid, c, TOTAL) == pytest.approx((LR + MIN_LR) / 2)


def test_linear_is_a_straight_line():
    c = cfg("linear")
    assert lr_at(WARMUP + 9, c, TOTAL) == pytest.approx(LR - (LR - MIN_LR) * 9 / (TOTAL - WARMUP))


def test_plateau_linear_boundaries():
    c = cfg("plateau_linear", decay_start_fraction=0.8)
    decay_start = 80
    assert lr_at(decay_start - 1, c, TOTAL) == LR
    assert lr_at(decay_start, c, TOTAL) == LR
    assert lr_at(decay_start + 10, c, TOTAL) == pytest.approx(LR - (LR - MIN_LR) * 10 / 20)
    assert MIN_LR < lr_at(TOTAL - 1, c, TOTAL) < MIN_LR + 0.05
    assert lr_at(TOTAL, c, TOTAL) == MIN_LR
    assert lr_at(TOTAL + 1, c, TOTAL) == MIN_LR


def test_plateau_decay_never_starts_inside_warmup():
    c = cfg("plateau_linear", decay_start_fraction=0.0)
    assert lr_at(WARMUP - 1, c, TOTAL) == LR
    assert lr_at(WARMUP, c, TOTAL) == LR
    assert lr_at(WARMUP + 1, c, TOTAL) < LR


def test_constant_stays_at_lr_for_ever():
    c = cfg("constant")
    for step in (WARMUP, TOTAL - 1, TOTAL, TOTAL * 3):
        assert lr_at(step, c, TOTAL) == LR


@pytest.mark.parametrize("schedule", ["cosine", "linear", "plateau_linear", "constant"])
def test_after_warmup_never_increases_and_never_below_min(schedule):
    c = cfg(schedule)
    lrs = [lr_at(s, c, TOTAL) for s in range(WARMUP, TOTAL + 20)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    assert min(lrs) >= MIN_LR


def test_no_warmup_starts_at_peak():
    c = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=0, schedule="cosine")
    assert lr_at(0, c, TOTAL) == LR


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg("cosine"), TOTAL)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, cfg("cosine"), 0)
