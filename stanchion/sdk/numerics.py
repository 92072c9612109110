"""The settings a rank's arithmetic depends on, recorded with every checkpoint and compared on resume.

Stanchion's guarantees are bit-exact (replica fingerprints, a resume that continues the same run, a
replay that reproduces a step), and bit-exactness holds only between runs that compute the same way:
the same deterministic-algorithm settings, cuBLAS workspace, TF32 and matmul precision, thread
count, parameter dtypes and autocast precision. A resume under other settings is allowed (a job may
move to other hardware) but is no longer the same run: the guard says so in a ``numerics_changed``
event naming each difference, instead of letting a later fingerprint or golden comparison find out.

``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS starts, which is why :func:`stanchion.join`
sets it (``:4096:8``, unless the environment already names one) before it touches a device:
without it, cuBLAS matmuls on a GPU are not reproducible even with deterministic algorithms on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented reproducible workspace configuration


def prepare_environment(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Settings that only take effect before the device's libraries start: set them at join."""
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def settings(device: torch.device, params: Iterable[torch.Tensor], precision: str | None) -> dict[str, Any]:
    """What this process computes with, as plain JSON values."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else device.type,
        "precision": precision or "as the parameters",
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
    }


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Each setting that differs, as ``name: saved -> now`` (a setting one side lacks is skipped:
    a checkpoint written before it was recorded says nothing about it)."""
    return [
        f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]
    ]
