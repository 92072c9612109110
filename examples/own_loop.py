"""A team's own training loop, adopting Stanchion: its own model, data, AdamW and LR schedule.

Run it as any torch.distributed program::

    torchrun --standalone --nproc-per-node 2 examples/own_loop.py --steps 300
    stanchion up --entrypoint examples/own_loop.py --nodes 2 --spares 1 --steps 200 --chaos 3

Nothing here comes from Stanchion's built-in trainer. The lines that adopt Stanchion are marked
``# stanchion``; without them this is a plain data-parallel loop. What the program owes the guard:

- its data is a function of (data index, data-parallel rank, micro-batch): ``batch_at`` below. That
  is what lets a rollback replay the same batches, a skip window jump past poisoned ones, a
  replacement rank continue where the rank it replaces stopped, and the audit recompute a
  neighbour's micro-batch;
- its results are bitwise reproducible (seeded initialisation, deterministic algorithms, a fixed
  number of threads), so replicas can be compared exactly;
- everything else it needs to resume (here the LR scheduler) is registered with the guard.
"""

from __future__ import annotations

import argparse
import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import stanchion  # stanchion

VOCAB = 64  # tokens of the synthetic language
CONTEXT = 16  # tokens the model sees to predict the next one


class TinyLM(nn.Module):
    """A small next-token model: embeddings of the context, an MLP, a softmax head."""

    def __init__(self, dim: int = 32, hidden: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(
            nn.Linear(CONTEXT * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(tokens).flatten(1)))


class MarkovText:
    """Synthetic text: a seeded Markov chain over VOCAB tokens. A batch is a pure function of
    (data index, rank, micro-batch), so any rank can produce any other rank's batch."""

    def __init__(self, seed: int, batch_size: int):
        g = torch.Generator().manual_seed(seed)
        # Peaked transitions: each token has a few likely successors, so there is something to learn.
        self.transitions = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=g), dim=1)
        self.seed, self.batch_size = seed, batch_size

    def batch(self, index: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = hashlib.sha256(f"{self.seed}/{index}/{rank}/{micro}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        tokens = torch.empty(self.batch_size, CONTEXT + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (self.batch_size,), generator=g)
        for t in range(1, CONTEXT + 1):
            tokens[:, t] = torch.multinomial(self.transitions[tokens[:, t - 1]], 1, generator=g).squeeze(1)
        return tokens[:, :-1], tokens[:, -1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (fixes the LR schedule)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per rank per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--run-dir", default=None, help="checkpoints and records (default runs/default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = TinyLM()  # built before join(): a standby rank has it ready when it is called
    data = MarkovText(args.seed, args.batch_size)

    rt = stanchion.join(run_dir=args.run_dir, seed=args.seed)  # stanchion
    model.to(rt.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def batch_at(index: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.batch(index, rank, micro)
        return x.to(rt.device), y.to(rt.device)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(m(x), y)

    def evaluate() -> float:  # held-out batches (a data index no training step reads)
        model.eval()
        with torch.no_grad():
            total = torch.stack([loss_fn(model, batch_at(-1 - i, rt.rank, 0)) for i in range(4)]).mean()
        model.train()
        with stanchion.collective("evaluation all-reduce"):  # marked: a lost peer re-forms the group
            dist.all_reduce(total)
        return float(total) / rt.world_size

    guard = stanchion.guard(  # stanchion
        rt,
        model,
        optimizer,
        steps=args.steps,
        schedulers=[scheduler],
        batch_at=batch_at,
        loss_fn=loss_fn,
        evaluate=evaluate,
        checkpoint_every=args.checkpoint_every,
        grad_clip=1.0,
        tokens_per_step=args.batch_size * args.accum * rt.world_size * CONTEXT,
        activations=[model.mlp],
    )
    for _ in guard:  # stanchion: steps honour rollbacks, skipped windows and stop requests
        with guard.step() as s:  # stanchion
            for micro in range(args.accum):
                loss = loss_fn(model, batch_at(s.data_index, rt.rank, micro))
                s.backward(loss, accum=args.accum)  # stanchion: instead of loss.backward()
        guard.maybe_checkpoint()  # stanchion
    outcome = guard.finish()  # stanchion
    if rt.is_main and outcome == "finished":
        print(f"finished at step {guard.cursor.step}: validation loss {guard.final_val_loss:.4f}")


if __name__ == "__main__":
    main()
