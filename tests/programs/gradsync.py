"""Run by tests/unit/test_gradsync.py under torchrun: GradSync's overlapped buckets against the
same buckets started after the backward pass, with three ranks (where the layout changes sums)."""

import json

import torch
import torch.distributed as dist

from stanchion.sdk.parallel import GradSync

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # 2 MiB: 2 buckets or more
sync = GradSync(list(model.parameters()))


def grads(seed: int, *, armed: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(seed * 10 + rank))
    sync.reset()
    if armed:
        sync.arm()
    model(x).square().mean().backward()
    sync.disarm()
    started = len(sync._pending)
    sync.all_reduce_mean(world)
    return [p.grad.clone() for p in model.parameters()], started


plain, started_plain = grads(1, armed=False)
overlapped, started_armed = grads(1, armed=True)
# An unannounced second backward pass after the buckets started: they start again at the end.
model.zero_grad(set_to_none=True)
sync.reset()
sync.arm()
x = torch.randn(16, 256, generator=torch.Generator().manual_seed(20 + rank))
model(x).square().mean().backward()
sync.disarm()
model(x).square().mean().backward()  # the gradients double after their buckets started
sync.all_reduce_mean(world)
doubled = [p.grad.clone() for p in model.parameters()]
reference, _ = grads(2, armed=False)
print(
    json.dumps(
        {
            "buckets": len(sync.buckets),
            "started_during_backward": [started_plain, started_armed],
            "overlap_equals_plain": all(torch.equal(a, b) for a, b in zip(plain, overlapped, strict=True)),
            "restarted_stale_equal": all(
                torch.equal(a, 2 * b) for a, b in zip(doubled, reference, strict=True)
            ),
        }
    )
    if rank == 0
    else "",
    flush=True,
)
dist.destroy_process_group()
