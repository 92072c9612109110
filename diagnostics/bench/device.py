"""`stanchion bench device`: the integrity checks' device paths on this machine's accelerator.

Three operations on the same fp32 tensor, on the device training uses (a GPU when there is one):
the replica fingerprint (an integer sum of the raw bits, computed where the tensor lives), a
device-to-device memcpy of it (the bandwidth reference: it reads and writes each byte once), and
an in-memory snapshot of a model holding it as its one parameter (``SnapshotRing.take``: the copy
to pinned host memory that a rollback restores from, reusing its buffer as in steady state).
Each time ends with a device synchronisation; repetitions go round-robin over the three.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from diagnostics.bench.common import GB, envelope, goal, median, ratio
from stanchion.sdk.devices import bf16_dense_peak


def device_throughput(nbytes: int, *, repeats: int, device: str) -> dict[str, Any]:
    """GB/s (1e9 bytes of the tensor per median second) of the fingerprint, the memcpy and the
    snapshot on ``device``, and the snapshot's median seconds."""
    import torch

    from stanchion.sdk.fingerprint import tensor_fingerprint
    from stanchion.sdk.snapshot import SnapshotRing

    dev = torch.device(device)
    sync: Callable[[], None] = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    gen = torch.Generator(device=dev).manual_seed(0)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).normal_(generator=gen)
    dst = torch.zeros_like(src)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(src, requires_grad=False)  # the same memory, as a parameter
    optimizer = torch.optim.SGD([model.weight], lr=0.0)  # no state: the snapshot copies the tensor
    ring = SnapshotRing(keep=1)
    cases: dict[str, Callable[[], Any]] = {
        "fingerprint": lambda: tensor_fingerprint(src),
        "memcpy": lambda: dst.copy_(src),
        "snapshot_to_host": lambda: ring.take(0, model, optimizer, {}),
    }
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(repeats + 1):  # the first pass is warm-up (and allocates the host buffer)
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rep:
                seconds[name].append(time.perf_counter() - t0)
    gb = nbytes / GB
    rates = {k: gb / median(v) for k, v in seconds.items()}
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "tensor_bytes": nbytes,
        "repeats": repeats,
        "gb_per_s": rates,
        "seconds": {k: median(v) for k, v in seconds.items()},
        "fingerprint_vs_memcpy": ratio(rates["fingerprint"], rates["memcpy"]),
    }


def bench_device(*, command: str, device: str, tensor_mb: int, repeats: int) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    r = device_throughput(tensor_mb * 2**20, repeats=repeats, device=device)
    peak = bf16_dense_peak(r["device_name"])
    return envelope(
        "device",
        command,
        {"device": device, "tensor_mb": tensor_mb, "repeats": repeats},
        {**r, "bf16_dense_peak_flops_per_s": peak},
        goals=[
            goal(
                "fingerprint throughput >= memcpy on the device",
                r["fingerprint_vs_memcpy"],
                ">= 1.0",
                None if r["fingerprint_vs_memcpy"] is None else r["fingerprint_vs_memcpy"] >= 1.0,
                "fingerprint GB/s / memcpy GB/s, medians of the same run",
            )
        ],
        notes=[
            "GB/s = tensor bytes / median seconds (1 GB = 1e9 bytes); memcpy reads and writes each byte once",
            "snapshot_to_host: SnapshotRing.take of a model whose one parameter is the tensor, into "
            "pinned host memory on a GPU",
        ],
        load_at_start=load_at_start,
        headline=["fingerprint_vs_memcpy"],
    )
