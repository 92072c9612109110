"""Optimizer construction and learning-rate schedules.

Weight decay goes only on the matrix weights of Linear layers. Norm weights, biases and embeddings
are left alone (GPT-3, nanoGPT): decaying a norm gain or a bias pulls it toward zero for no benefit,
and embedding rows of rare tokens would shrink between their rare updates.

The schedule is a pure function of (step, config, total_steps), so a resumed run or an in-place
rollback recomputes exactly the learning rate the uninterrupted run would have used.

The optimizer's per-parameter state exists from the start (:func:`reset_state`): torch creates it
lazily, in the first ``step()``, and anything that asks for an optimizer state dict before then
creates it its own way. ``torch.distributed.checkpoint``'s ``get_state_dict`` runs a zero-gradient,
zero-learning-rate step to materialise it, which leaves every step counter at 1 with zero moments:
a checkpoint taken at step 0 (after a rollback to the initial snapshot) silently changed the bias
correction of every following step. With the state explicit at step 0 there is nothing lazy left:
snapshots, checkpoints, fingerprints and healing all see, copy and restore the same tensors.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from trainer.config import OptimConfig

log = logging.getLogger(__name__)


def decay_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decay, no_decay) lists of (name, parameter), both in ``named_parameters()`` order.

    Decayed: the ``weight`` of every ``nn.Linear`` unless that tensor is also an embedding table
    (a tied lm_head). Everything else is not decayed. ``named_parameters()`` yields a shared tensor
    once, so a tied weight lands in exactly one list. Frozen parameters are left out.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in linear_ids and id(param) not in embedding_ids:
            decay.append((name, param))
        else:
            no_decay.append((name, param))
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW (default) or Adafactor over two parameter groups: "decay" and "no_decay".

    Groups keep ``named_parameters()`` order, so the optimizer state has the same layout on every
    rank and every run. The implementation is pinned rather than left to torch's heuristics, so
    every run takes the same code path (which matters for bitwise fingerprints): AdamW uses
    ``foreach=True`` on CPU and ``fused=True`` on CUDA; Adafactor, which has no fused kernel, uses
    ``foreach=True`` everywhere.

    Adafactor (cfg.name == "adafactor"): factored second moments and no first moment, so its state
    is a fraction of AdamW's. The seed paper reports it trains well below roughly 7B parameters and
    loses stability above that; prefer AdamW for large models. Torch's Adafactor takes ``lr`` as
    the maximum relative step size (scaled by each parameter's RMS) and its own ``beta2_decay`` /
    ``eps`` defaults, so cfg.beta1, cfg.beta2 and cfg.eps do not apply to it.
    """
    decay, no_decay = decay_split(model)
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay, "group": "decay"},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "group": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    n_decay = sum(p.numel() for _, p in decay)
    n_no_decay = sum(p.numel() for _, p in no_decay)
    if cfg.name == "adamw":
        impl = {"fused": True} if device_type == "cuda" else {"foreach": True}
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl
        )
    elif cfg.name == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    else:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; expected 'adamw' or 'adafactor'")
    log.info(
        "optimizer %s: %d decayed tensors (%d params), %d not decayed (%d params)",
        cfg.name,
        len(decay),
        n_decay,
        len(no_decay),
        n_no_decay,
    )
    reset_state(optimizer)
    return optimizer


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter the optimizer state of a run that has taken no step yet.

    The state is created by the optimizer's own lazy initialisation (so its keys, dtypes, devices
    and layouts are exactly what its first real step would create): one step with zero gradients
    and a learning rate of 0, which leaves the parameters bitwise unchanged, the moments at zero
    (zero in, zero out) and the step counters at 1. The counters are then set back to 0. AdamW and
    Adafactor initialise every state tensor to zero, so zeroing all of them is their initial state;
    a step from here is bitwise the step a lazily initialised optimizer takes
    (tests/unit/test_optim_state.py).

    Gradients must be absent (between steps); the learning rates are left as they were.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("reset_state: parameters hold gradients; call it between steps")
    optimizer.state.clear()
    # A tensor learning rate is filled in place by set_lr: keep a copy of its value.
    lrs = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        set_lr(optimizer, 0.0)
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr
        for p in params:
            p.grad = None
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = type(value)(0)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    Warm-up (W = cfg.warmup_steps > 0): steps 0..W-1 get lr * (step + 1) / W, so step 0 already
    moves (lr / W) and step W-1 reaches cfg.lr. Then, from step W:

    - "constant": cfg.lr for ever.
    - "cosine": cfg.lr at step W, half-cosine down to cfg.min_lr at step total_steps.
    - "linear": cfg.lr at step W, straight line down to cfg.min_lr at step total_steps.
    - "plateau_linear": cfg.lr until step D = max(W, round(decay_start_fraction * total_steps)),
      then a straight line from cfg.lr at D to cfg.min_lr at total_steps.

    Steps >= total_steps get cfg.min_lr (cfg.lr for "constant"). After warm-up the value never
    goes below cfg.min_lr and never increases.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= total_steps:
        return cfg.min_lr
    if cfg.schedule == "plateau_linear":
        decay_start = max(warmup, round(cfg.decay_start_fraction * total_steps))
        if step < decay_start:
            return cfg.lr
    else:
        decay_start = warmup
    # step is in [decay_start, total_steps), so the span is at least 1.
    progress = (step - decay_start) / (total_steps - decay_start)  # in [0, 1)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule in ("linear", "plateau_linear"):
        factor = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")
    return max(cfg.min_lr, cfg.min_lr + factor * (cfg.lr - cfg.min_lr))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate. A tensor lr (capturable / compiled optimizers) is filled in
    place so captured graphs keep pointing at the same tensor."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
