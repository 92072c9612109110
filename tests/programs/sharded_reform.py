"""Run by tests/integration/test_sharded_reform.py: an FSDP2 model re-formed in place.

``train``: 2 gloo ranks (spawned here) train a sharded model for 6 steps; with ``--cut STEP`` that
step's backward pass fails partway (a gradient hook raises after the root module's gradients exist
and before the first block's), then every rank does what a surviving rank does in a broken
generation: it drops the broken groups (``sharded.release``), forms a new default group under a new
store prefix, moves the model's mesh to it (``sharded.rebind``), clears the gradients and computes
the step again. Rank 0 writes the full (unsharded) parameters and optimizer state to ``--out``.

``shrink``: rank 1 leaves after one step, and rank 0 alone forms a world of 1: ``rebind`` must
refuse, since the 2-shard mesh no longer fits. Rank 0 prints what it raised.

``own-comm``: the program set its own reduce-scatter; the audit's tap must refuse to replace it.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from stanchion.sdk import parallel, sharded
from stanchion.sdk.runtime import exit_process


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(8)  # parameters of the root module: the first gradients backward makes
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, cut: bool = False) -> torch.Tensor:
        x = self.blocks[0](x)
        if cut:
            x.register_hook(_fail)
        x = self.blocks[1](x)
        return self.head(self.norm(x)).sum(-1)


def _fail(_grad: torch.Tensor) -> None:
    raise RuntimeError("the step's backward pass is cut short here")


def join(rank: int, world: int, store: str, generation: int) -> None:
    prefixed = dist.PrefixStore(f"gen{generation}/", dist.FileStore(store, world))
    dist.init_process_group(
        "gloo", store=prefixed, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, generator=g)


def build(world: int) -> tuple[Net, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), mesh


def step(model: Net, optimizer: torch.optim.Optimizer, i: int, rank: int, *, cut: bool = False) -> None:
    x, y = batch(i, rank)
    torch.nn.functional.mse_loss(model(x, cut=cut), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reform(model: Net, mesh: object, rank: int, world: int, store: str, generation: int) -> None:
    sharded.release(model, mesh)
    parallel.leave_group(broken=True)
    join(rank, world, store, generation)
    sharded.rebind(model, mesh)


def train(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    join(rank, 2, args.store, 0)
    model, optimizer, mesh = build(2)
    for i in range(6):
        if i == args.cut:
            try:
                step(model, optimizer, i, rank, cut=True)
                raise AssertionError("the cut step completed")
            except RuntimeError as e:
                assert "cut short" in str(e), e
            reform(model, mesh, rank, 2, args.store, 1)
            optimizer.zero_grad(set_to_none=True)  # what the guard does at every step's start
        step(model, optimizer, i, rank)
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for k, v in entry.items():
            state[f"optim.{index}.{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    if rank == 0:
        torch.save(state, args.out)
    parallel.leave_group()
    exit_process(0)  # as a guard's program ends after a broken generation (Guard.finish)


def shrink(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    join(rank, 2, args.store, 0)
    model, optimizer, mesh = build(2)
    step(model, optimizer, 0, rank)
    dist.barrier()
    if rank == 1:
        os._exit(0)
    sharded.release(model, mesh)
    parallel.leave_group(broken=True)
    join(0, 1, args.store, 1)
    try:
        sharded.rebind(model, mesh)
        print("rebind accepted a world of 1", flush=True)
    except sharded.LayoutChanged as e:
        print(f"LayoutChanged: {e}", flush=True)


def own_comm(rank: int, args: argparse.Namespace) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class Mine(DefaultReduceScatter):
        pass

    join(rank, 2, args.store, 0)
    model, _, _ = build(2)
    model.blocks[1].set_custom_reduce_scatter(Mine())
    try:
        sharded.install_grad_digest(model)
        print("installed over the program's reduce-scatter", flush=True)
    except ValueError as e:
        if rank == 0:
            print(f"ValueError: {e}", flush=True)
    parallel.leave_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "shrink", "own-comm"])
    p.add_argument("--store", required=True)
    p.add_argument("--cut", type=int, default=-1)
    p.add_argument("--out", default="")
    a = p.parse_args()
    mp.spawn({"train": train, "shrink": shrink, "own-comm": own_comm}[a.mode], args=(a,), nprocs=2)
