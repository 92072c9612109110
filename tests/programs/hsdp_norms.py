"""Run by tests/integration/test_hsdp.py under torchrun on 4 ranks: the guard's gradient norm of an
HSDP model (a 2 x 2 mesh: 2 replicas of 2 shards) against the same model unsharded.

Every rank computes the gradients of its own batch twice: through the HSDP model under the guard
(FSDP2 reduce-scatters over the shard dimension and all-reduces over the replicate dimension, the
guard sums the shards' squared norms), and through an unsharded copy whose gradients are averaged
over all four ranks by hand. Rank 0 prints both norms, per layer group and in total, as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stanchion

p = argparse.ArgumentParser()
p.add_argument("--run-dir", required=True)
args = p.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
reference = copy.deepcopy(model)

rt = stanchion.join(run_dir=args.run_dir, seed=0)
mesh = init_device_mesh("cpu", (2, rt.world_size // 2), mesh_dim_names=("replicate", "shard"))
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the norm is the point, not the update


def batch(index: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * index + 10 * rank + micro)
    return torch.randn(32, 16, generator=g), torch.randn(32, generator=g)


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(m(b[0]).squeeze(-1), b[1])


guard = stanchion.guard(
    rt,
    model,
    optimizer,
    steps=1,
    mesh=mesh,
    replicate_dim="replicate",
    checkpoint_every=0,
    protections=stanchion.Protections(startup_check=False),
)
for _ in guard:
    with guard.step() as s:
        s.backward(loss_fn(model, batch(s.data_index, rt.rank, 0)))

# The unsharded reference: this rank's gradients, averaged over every data-parallel rank.
loss_fn(reference, batch(0, rt.rank, 0)).backward()
squares = {}
for name, param in reference.named_parameters():
    dist.all_reduce(param.grad)
    param.grad /= rt.world_size
    group = name.split(".", 1)[0]
    squares[group] = squares.get(group, 0.0) + float(param.grad.double().pow(2).sum())

assert guard.finish() == "finished"  # leaves the process group
record = json.loads(rt.paths.progress.read_text().splitlines()[-1])
if rt.rank == 0:
    print(
        json.dumps(
            {
                "guard": {"total": record["grad_norm"], "layers": record["layer_grad_norms"]},
                "reference": {
                    "total": math.sqrt(sum(squares.values())),
                    "layers": {k: math.sqrt(v) for k, v in squares.items()},
                },
            }
        ),
        flush=True,
    )
