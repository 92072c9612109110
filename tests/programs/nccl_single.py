"""Run by tests/integration/test_nccl.py on a machine with an NVIDIA GPU: the NCCL paths of
stanchion/sdk/parallel.py on one rank (one GPU cannot host two NCCL ranks).

1. A collective is awaited by polling its completion (``parallel.wait``) and its result is right.
2. A collective held back on the device (a spinning kernel ahead of it on the stream) is given up
   at the job's collective timeout as CollectiveFailed; the communicator is aborted
   (``leave_group(broken=True)``) while the kernel still runs; a new group forms in the same
   process and its collective completes: the in-place re-forming a survivor does.
Prints one line per check.
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from stanchion.sdk import parallel
from stanchion.sdk.runtime import exit_process


def form() -> None:
    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )


def main() -> None:
    parallel.prepare_environment()
    torch.cuda.set_device(0)
    form()
    t = torch.full((1024,), 3.0, device="cuda")
    parallel.wait(dist.all_reduce(t, async_op=True), "all-reduce")
    assert torch.equal(t.cpu(), torch.full((1024,), 3.0)), t
    print("awaited: ok", flush=True)

    parallel.wait_policy.timeout_s = 0.5
    torch.cuda._sleep(int(5e9))  # a few seconds of spinning on the stream the collective follows
    work = dist.all_reduce(t, async_op=True)
    t0 = time.monotonic()
    try:
        parallel.wait(work, "held-back all-reduce")
        raise AssertionError("the held-back collective completed within its timeout")
    except parallel.CollectiveFailed as e:
        assert "not complete after 0.5 s" in str(e), e
    print(f"given up after {time.monotonic() - t0:.2f} s: ok", flush=True)
    t0 = time.monotonic()
    parallel.leave_group(broken=True)
    print(f"aborted in {time.monotonic() - t0:.2f} s: ok", flush=True)

    torch.cuda.synchronize()
    parallel.wait_policy.timeout_s = 60.0
    form()
    u = torch.full((8,), 5.0, device="cuda")
    parallel.wait(dist.all_reduce(u, async_op=True), "all-reduce after re-forming")
    assert torch.equal(u.cpu(), torch.full((8,), 5.0)), u
    print("re-formed: ok", flush=True)
    parallel.leave_group()
    exit_process(0)  # as a guard's program ends after a broken generation (Guard.finish)


if __name__ == "__main__":
    main()
