"""FSDP2 (or HSDP) on a DeviceMesh, adopting Stanchion.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py                 # FSDP: 2 shards
    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py --replicate 2   # HSDP: 2 replicas
    stanchion up --entrypoint examples/fsdp2.py --nodes 2 --spares 1 --steps 100 --chaos 3

The model is sharded with ``fully_shard`` on a mesh whose dimensions are named; the guard is told
the mesh and which dimension holds replicas, so its replica fingerprints compare the ranks that
hold the same shard (none under plain FSDP, where every rank holds its own). FSDP reduces the
gradients itself; the guard adds the per-step agreement, non-finite skips, spike detection,
snapshots and rollback, and DCP checkpoints of the sharded state (resharded on load).

When a peer is lost the survivors re-form in place with their shards, and the replacement heals its
shard from the rank holding the same one in another replica (HSDP: no step lost); with no replica
of the lost shard (plain FSDP) every rank restores the newest checkpoint. The ring audit reads a
rank's own gradients at FSDP's reduce-scatters. See docs/sdk.md.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stanchion

WIDTH = 64


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class Regressor(nn.Module):
    """A residual MLP fitting a fixed random teacher network: a task with an exact answer."""

    def __init__(self, width: int = WIDTH, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x).sum(-1)  # one column: a sum, not a view (FSDP hooks the output)


def batch_at(index: int, rank: int, micro: int, *, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs drawn from a generator keyed by (index, rank, micro); targets from a fixed teacher."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + rank * 31 + micro)
    x = torch.randn(size, WIDTH, generator=g)
    teacher = torch.Generator().manual_seed(seed)
    w = torch.randn(WIDTH, generator=teacher) / math.sqrt(WIDTH)
    return x, torch.tanh(x @ w) + 0.1 * torch.sin(3 * x[:, 0])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--replicate", type=int, default=1, help="replica groups (HSDP); 1: plain FSDP")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--run-dir", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = Regressor()  # built before join(): a standby has it ready

    def layout(world: int) -> None:  # refused before any group forms, with a message saying why
        if world % args.replicate:
            raise ValueError(f"--replicate {args.replicate} does not divide {world} ranks")

    rt = stanchion.join(run_dir=args.run_dir, seed=args.seed, validate=layout)
    shards = rt.world_size // args.replicate
    if args.replicate > 1:
        mesh = init_device_mesh(
            rt.device.type, (args.replicate, shards), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(rt.device.type, (shards,), mesh_dim_names=("shard",))
    model.to(rt.device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    def batch(index: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch_at(index, rank, micro, seed=args.seed, size=args.batch_size)
        return x.to(rt.device), y.to(rt.device)

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    def evaluate() -> float:  # every rank runs the same forwards: FSDP gathers in each of them
        with torch.no_grad():
            loss = torch.stack([loss_fn(model, batch(-1 - i, rt.rank, 0)) for i in range(2)]).mean()
        with stanchion.collective("evaluation all-reduce"):
            dist.all_reduce(loss)
        return float(loss) / rt.world_size

    guard = stanchion.guard(
        rt,
        model,
        optimizer,
        steps=args.steps,
        schedulers=[scheduler],
        batch_at=batch,
        loss_fn=loss_fn,
        evaluate=evaluate,
        mesh=mesh,
        replicate_dim="replicate" if args.replicate > 1 else None,
        checkpoint_every=args.checkpoint_every,
        grad_clip=1.0,
    )
    for _ in guard:
        with guard.step() as s:
            s.backward(loss_fn(model, batch(s.data_index, rt.rank, 0)))
        guard.maybe_checkpoint()
    if guard.finish() == "finished" and rt.is_main:
        print(f"finished at step {guard.cursor.step}: validation loss {guard.final_val_loss:.5f}")


if __name__ == "__main__":
    main()
