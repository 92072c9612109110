"""`stanchion diag gpu`: exit codes, JSON, and the matmul self-test.

The command's NVML backend comes from `diag.open_nvml` and its self-tests from `diag.run_self_tests`;
tests replace them to play a GPU machine on a machine without one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.health import GpuSample, NvmlBackend, NvmlUnavailable
from diagnostics.commands import diag
from diagnostics.commands.diag import SelfTest, app

runner = CliRunner()


class FakeBackend:
    def __init__(self, gpus: list[GpuSample]):
        self.gpus = gpus
        self.closed = False

    def sample(self) -> list[GpuSample]:
        return self.gpus

    def close(self) -> None:
        self.closed = True


def healthy_gpu(index: int) -> GpuSample:
    return GpuSample(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{0x19 + index:02X}:00.0",
        driver_version="550.54.15",
        temperature_celsius=41.0,
        power_watts=120.5,
        utilization_ratio=0.0,
        memory_used_bytes=2**30,
        memory_total_bytes=80 * 2**30,
        throttle_reasons=frozenset({"low_util"}),
        ecc_double_volatile=0,
        remap_pending=False,
        remap_failure=False,
    )


def use_backend(monkeypatch: pytest.MonkeyPatch, gpus: list[GpuSample]) -> FakeBackend:
    backend = FakeBackend(gpus)
    monkeypatch.setattr(diag, "open_nvml", lambda: backend)
    return backend


def use_self_test(monkeypatch: pytest.MonkeyPatch, status: str, detail: str = "") -> None:
    monkeypatch.setattr(
        diag,
        "run_self_tests",
        lambda gpus: {g.index: SelfTest(status, detail, 1e-6, 1e-8, g.index) for g in gpus},
    )


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["gpu", *args])


def nvml_present() -> bool:
    try:
        NvmlBackend().close()
    except NvmlUnavailable:
        return False
    return True


@pytest.mark.skipif(nvml_present(), reason="this machine has an NVIDIA driver")
def test_on_a_machine_without_a_driver_exits_3_with_host_readings(tmp_path):
    result = invoke("--json", "--path", str(tmp_path))
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout)
    assert data["nvml_up"] is False and data["gpus"] == []
    assert "NVML" in data["nvml_error"]
    assert data["host"]["memory_total_bytes"] > 0
    assert data["host"]["disk_free_bytes"][str(tmp_path)] > 0
    assert data["verdict"] == "no_gpu" and data["reason"].startswith("no GPU found: NVML unavailable")
    assert data["exit_code"] == 3
    assert "no GPU found" in result.stderr


def test_nvml_unavailable_exits_3(monkeypatch):
    def unavailable() -> Any:
        raise NvmlUnavailable("NVML Shared Library Not Found")

    monkeypatch.setattr(diag, "open_nvml", unavailable)
    result = invoke()
    assert result.exit_code == 3
    assert "verdict: no_gpu: no GPU found: NVML unavailable" in result.stdout  # data on stdout
    assert "healthy" not in result.stdout
    assert "cpu %" in result.stdout
    assert "no GPU found: NVML unavailable (NVML Shared Library Not Found)" in result.stderr


def test_no_devices_exits_3(monkeypatch):
    use_backend(monkeypatch, [])
    result = invoke("--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["nvml_up"] is True
    assert "NVML sees no device" in result.stderr


def test_healthy_gpus_with_self_test_skipped_on_purpose_exit_0(monkeypatch):
    backend = use_backend(monkeypatch, [healthy_gpu(0), healthy_gpu(1)])
    result = invoke("--json", "--no-self-test")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "healthy" and data["nvml_up"] is True
    assert [g["uuid"] for g in data["gpus"]] == [healthy_gpu(0).uuid, healthy_gpu(1).uuid]
    assert data["gpus"][0]["power_watts"] == 120.5
    assert data["gpus"][0]["throttle_reasons"] == ["low_util"]
    assert data["gpus"][0]["self_test"]["status"] == "not_run"
    assert result.stderr == ""
    assert backend.closed


def test_healthy_gpus_and_passing_self_tests_exit_0(monkeypatch):
    use_backend(monkeypatch, [healthy_gpu(0)])
    use_self_test(monkeypatch, "pass", "max relative error 1.0e-08 <= 1e-04")
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "GPU-00000000" in result.stdout and "pass" in result.stdout
    assert "verdict: healthy: all checks passed on 1 GPUs" in result.stdout


@pytest.mark.parametrize("status", ["fail", "error"])
def test_a_failed_self_test_exits_1(monkeypatch, status):
    use_backend(monkeypatch, [healthy_gpu(0)])
    use_self_test(monkeypatch, status, "max relative error 3.0e-01 > 1e-04")
    result = invoke("--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["gpus"][0]["self_test"]["status"] == status
    assert f"GPU 0 self-test {status}" in result.stderr


def test_unhealthy_gpu_exits_1(monkeypatch):
    lost = GpuSample(index=1, uuid="GPU-lost", lost=True)
    use_backend(monkeypatch, [healthy_gpu(0), lost])
    use_self_test(monkeypatch, "pass")
    result = invoke("--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["verdict"] == "unhealthy" and "GPU 1 (GPU-lost) is lost" in data["reason"]
    assert "not fit to train" in result.stderr


def test_degraded_gpu_exits_0_and_says_why(monkeypatch):
    hot = GpuSample(**{**healthy_gpu(0).to_dict(), "temperature_celsius": 88.0, "throttle_reasons": None})
    use_backend(monkeypatch, [hot])
    use_self_test(monkeypatch, "pass")
    result = invoke()
    assert result.exit_code == 0
    assert "verdict: degraded: GPU 0" in result.stdout and "88 °C" in result.stdout


def test_without_cuda_the_self_test_is_skipped_and_exits_5(monkeypatch):
    # The honest outcome: NVML sees GPUs but nothing checked that they compute correctly.
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    use_backend(monkeypatch, [healthy_gpu(0)])
    result = invoke("--json")
    assert result.exit_code == 5, result.output
    test = json.loads(result.stdout)["gpus"][0]["self_test"]
    assert test["status"] == "skipped" and test["detail"].startswith("no CUDA device")
    assert "self-test did not run: no CUDA device" in result.stderr
    assert "--no-self-test" in result.stderr


def test_help_documents_the_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for words in ("0 healthy or degraded", "1 unhealthy", "3 no GPU found", "5 GPUs found but the self-test"):
        assert words in text


# ---------------------------------------------------------------------------------------------
# The self-test's arithmetic, on the CPU


def test_matmul_self_test_passes_on_a_correct_device():
    a, b, reference = diag.self_test_inputs(n=128, seed=1)
    result = diag.matmul_self_test("cpu", a, b, reference)
    assert result.status == "pass", result.detail
    assert result.max_rel_error < 1e-5


def test_matmul_self_test_catches_a_wrong_result():
    a, b, reference = diag.self_test_inputs(n=128, seed=1)
    corrupted = reference.clone()
    corrupted[3, 7] += 0.05 * float(reference.abs().max())  # one wrong element, as a bad SM would give
    result = diag.matmul_self_test("cpu", a, b, corrupted)
    assert result.status == "fail" and "> 1e-04" in result.detail

    a[0, 0] = float("nan")
    assert diag.matmul_self_test("cpu", a, b, reference).status == "fail"


def test_matmul_self_test_fails_a_tf32_result():
    # A GPU that silently multiplied in TF32 differs from fp32 as much as these two do.
    import torch

    def tf32(x: torch.Tensor) -> torch.Tensor:  # round to nearest, keep 10 of 23 mantissa bits
        bits = x.view(torch.int32)
        return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)

    a, b, _ = diag.self_test_inputs(n=128, seed=1)
    tf32_product = tf32(a).double() @ tf32(b).double()
    assert diag.matmul_self_test("cpu", a, b, tf32_product).status == "fail"


def test_self_test_inputs_are_seeded():
    a1, b1, _ = diag.self_test_inputs(n=16, seed=3)
    a2, b2, _ = diag.self_test_inputs(n=16, seed=3)
    assert a1.equal(a2) and b1.equal(b2) and not a1.equal(b1)


# ---------------------------------------------------------------------------------------------
# Real hardware (run on a GPU machine: pytest -m gpu)


@pytest.mark.gpu
def test_real_gpus_pass_diag():
    torch = pytest.importorskip("torch")
    if not nvml_present() or not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA driver and CUDA")
    result = invoke("--json")
    data = json.loads(result.stdout)
    assert data["gpus"], result.output
    for g in data["gpus"]:
        assert g["self_test"]["status"] == "pass", g["self_test"]
    assert result.exit_code in (0, 1)  # 1 only if the node really is unhealthy
    assert result.exit_code == 0 or data["verdict"] == "unhealthy", data["reason"]
