"""`stanchion bench device`: the datasheet peaks it names, its usage errors, and one real run on
the CPU (shape and consistency only: no assertion depends on how fast this machine is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diagnostics.commands.bench import app
from stanchion.sdk.devices import bf16_dense_peak

runner = CliRunner()


def test_the_longest_known_device_name_decides_the_peak():
    assert bf16_dense_peak("NVIDIA H100 PCIe") == 756.0e12
    assert bf16_dense_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_dense_peak("NVIDIA H200") == 989.4e12
    assert bf16_dense_peak("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert bf16_dense_peak("cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_a_gpu_asked_for_where_there_is_none_is_a_usage_error():
    r = runner.invoke(app, ["device", "--device", "cuda"])
    assert r.exit_code == 2 and "torch sees no CUDA device" in r.output and "--device cpu" in r.output
    r = runner.invoke(app, ["device", "--device", "tpu"])
    assert r.exit_code == 2 and "--device tpu: unknown device" in r.output


def test_a_run_on_the_cpu_times_all_three_operations(tmp_path: Path):
    out = tmp_path / "device.json"
    r = runner.invoke(
        app, ["device", "--device", "cpu", "--tensor-mb", "4", "--repeats", "2", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    res = result["results"]
    assert result["command"] == f"stanchion bench device --device cpu --tensor-mb 4 --repeats 2 --out {out}"
    assert res["device"] == "cpu" and res["tensor_bytes"] == 4 * 2**20
    assert set(res["gb_per_s"]) == {"fingerprint", "memcpy", "snapshot_to_host"}
    for name, rate in res["gb_per_s"].items():
        # GB/s is the tensor's bytes over the median seconds, per operation.
        assert rate == pytest.approx(4 * 2**20 / 1e9 / res["seconds"][name], rel=1e-3)
    ratio = res["gb_per_s"]["fingerprint"] / res["gb_per_s"]["memcpy"]
    assert result["fingerprint_vs_memcpy"] == pytest.approx(ratio, rel=1e-3)
    assert result["goals"][0]["met"] is (ratio >= 1.0)


def test_mfu_is_the_models_flops_over_every_devices_peak_and_absent_without_one():
    from stanchion.sdk.devices import device_peak
    from stanchion.sdk.guard import mfu

    assert mfu(6e9, 1000.0, 2 * 989.4e12) == {"mfu": 6e9 * 1000.0 / (2 * 989.4e12)}
    assert mfu(6e9, 1000.0, None) == {} and mfu(0.0, 1000.0, 989.4e12) == {}
    assert device_peak("cpu") is None  # no datasheet peak for a CPU: no MFU on one
