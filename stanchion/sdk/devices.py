"""What the datasheets say about accelerators: the dense bf16 peak that MFU is measured against.

MFU (model FLOP utilization) is the model's FLOP/s (6N + attention FLOPs per token, times tokens
per second) over the hardware's peak. Papers quote it against the dense bf16 peak from the
vendor's datasheet (without sparsity), whatever the training precision; so does Stanchion. Devices
not listed here (CPUs included) have no MFU: a figure against a guessed peak would mislead.
"""

from __future__ import annotations

BF16_DENSE_PEAK = {  # FLOP/s, keyed by a part of torch.cuda.get_device_name()
    "H200": 989.4e12,
    "H100 80GB HBM3": 989.4e12,  # SXM
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.0e12,
    "H100 PCIe": 756.0e12,
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "L4": 121.0e12,
}


def bf16_dense_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of ``device_name`` (torch's name for it), if known: the
    longest known name it contains wins ("H100 PCIe" before "H100")."""
    hits = [k for k in BF16_DENSE_PEAK if k in device_name]
    return BF16_DENSE_PEAK[max(hits, key=len)] if hits else None


def device_peak(device: object) -> float | None:
    """The dense bf16 peak of a torch device, None for a CPU or an unlisted GPU."""
    import torch

    dev = torch.device(device)  # type: ignore[call-overload]
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return bf16_dense_peak(torch.cuda.get_device_name(dev))
