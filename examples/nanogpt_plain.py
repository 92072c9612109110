"""A nanoGPT-shaped training script, without Stanchion: the baseline that examples/nanogpt.py adopts
the SDK into (docs/sdk.md shows the diff between the two).

    torchrun --standalone --nproc-per-node 2 examples/nanogpt_plain.py --max-iters 200

Byte-level language model on a text file (default: this repository's README), a small GPT with
causal self-attention, AdamW, a cosine learning-rate schedule with warm-up, gradient accumulation
and clipping, torch DDP.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    p.add_argument("--out-dir", default="runs/nanogpt")
    p.add_argument("--max-iters", "--steps", dest="max_iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    master = rank == 0
    device = torch.device("cpu")
    torch.manual_seed(args.seed + rank)

    data = torch.frombuffer(bytearray(args.data.read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

    def get_batch(which: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = train_data if which == "train" else val_data
        ix = torch.randint(len(d) - args.block_size - 1, (args.batch_size,))
        x = torch.stack([d[i : i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + args.block_size] for i in ix])
        return x.to(device), y.to(device)

    torch.manual_seed(args.seed)
    model = GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    model = DDP(model)

    def get_lr(it: int) -> float:
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / args.warmup_iters
        ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (
            args.learning_rate - args.min_lr
        )

    @torch.no_grad()
    def estimate_loss() -> float:
        model.eval()
        losses = torch.stack([model(*get_batch("val"))[1] for _ in range(4)]).mean()
        model.train()
        dist.all_reduce(losses)
        return float(losses) / world

    X, Y = get_batch("train")
    t0 = time.time()
    for iter_num in range(args.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % args.eval_interval == 0 and iter_num > 0:
            val = estimate_loss()
            if master:
                print(f"step {iter_num}: val loss {val:.4f}")
        for micro_step in range(args.grad_accum):
            model.require_backward_grad_sync = micro_step == args.grad_accum - 1
            _, loss = model(X, Y)
            loss = loss / args.grad_accum
            X, Y = get_batch("train")
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master and iter_num % 50 == 0:
            print(f"iter {iter_num}: loss {loss.item() * args.grad_accum:.4f}, {time.time() - t0:.1f}s")
    val = estimate_loss()
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        torch.save(model.module.state_dict(), os.path.join(args.out_dir, "ckpt.pt"))
        print(f"finished {args.max_iters} iterations: val loss {val:.4f}")
    dist.barrier()  # no rank tears its group down while DDP's reducer on another still uses it
    # DDP sits in a reference cycle, so only the garbage collector frees it, and with it the process
    # group's last reference: left to the interpreter's shutdown, a gloo thread still releasing the
    # last collective's tensors then aborts the process. Free it (and the group) while it runs.
    model = None
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
