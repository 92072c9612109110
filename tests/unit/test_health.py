"""Node health: NVML readings through a fake NVML module, the Xid watcher, the verdict and the collector.

The fake reuses nvidia-ml-py's real exception classes and constants, so the code under test sees the
same errors a driver would raise; only the C library behind them is missing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.health import (
    THROTTLE_REASONS,
    GpuSample,
    HealthThresholds,
    HostSample,
    NvmlBackend,
    NvmlQueryError,
    NvmlUnavailable,
    XidWatcher,
    assess,
    assess_async,
    decode_throttle_reasons,
    open_backend,
    verdict,
)
from agent.health_collector import HealthCollector

REPO = Path(__file__).resolve().parents[2]


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # constructs the matching subclass, e.g. NVMLError_GpuIsLost


NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST


class FakeGpu:
    """One device's raw NVML answers (NVML units). A field set to an int error code raises it."""

    def __init__(self, index: int, **raw: Any):
        self.index = index
        self.raw: dict[str, Any] = {
            "uuid": f"GPU-00000000-0000-0000-0000-00000000000{index}",
            "name": b"NVIDIA H100 80GB HBM3",  # bytes, as older bindings return
            "pci": SimpleNamespace(busId=f"00000000:{0x19 + index:02X}:00.0".encode()),
            "temperature": 45,
            "power": 350_000,  # mW
            "energy": 123_456_789,  # mJ
            "utilization": SimpleNamespace(gpu=87, memory=40),
            "memory": SimpleNamespace(used=20 * 2**30, total=80 * 2**30, free=60 * 2**30),
            "sm_clock": 1980,  # MHz
            "mem_clock": 2619,
            "throttle": pynvml.nvmlClocksEventReasonSwPowerCap,
            "ecc": {(0, 0): 3, (1, 0): 0, (0, 1): 12, (1, 1): 1},  # (error type, counter type) -> count
            "remapped_rows": (2, 1, 0, 0),
            "pcie_replays": 7,
            "events": True,
        }
        self.raw.update(raw)

    def get(self, key: str, *sub: Any) -> Any:
        value = self.raw[key]
        if isinstance(value, pynvml.NVMLError):
            raise value
        return value[sub] if sub else value


def err(code: int) -> pynvml.NVMLError:
    """A field value that makes the fake raise this NVML error."""
    return nvml_error(code)


class FakeEventSet:
    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()
        self.devices: list[FakeGpu] = []
        self.freed = False


class FakeNvml:
    """Stands in for the pynvml module: real exceptions and constants, scripted devices."""

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: int | None = None):
        for name in dir(pynvml):
            if name.startswith(("NVML", "nvmlEventType", "nvmlClocks")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = [FakeGpu(0), FakeGpu(1)] if gpus is None else gpus
        self.init_error = init_error
        self.count_error: int | None = None
        self.event_sets: list[FakeEventSet] = []
        self.sample_threads: list[str] = []
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        self.sample_threads.append(threading.current_thread().name)
        if self.count_error is not None:
            raise nvml_error(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        if self.gpus[i].raw.get("handle_error"):
            raise nvml_error(self.gpus[i].raw["handle_error"])
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.get("uuid")

    def nvmlDeviceGetName(self, h: FakeGpu) -> Any:
        return h.get("name")

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> Any:
        return h.get("pci")

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return h.get("temperature")

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return h.get("power")

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return h.get("energy")

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        return h.get("utilization")

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return h.get("memory")

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, clock: int) -> int:
        return h.get({pynvml.NVML_CLOCK_SM: "sm_clock", pynvml.NVML_CLOCK_MEM: "mem_clock"}[clock])

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:
        return h.get("throttle")

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, error_type: int, counter_type: int) -> int:
        value = h.get("ecc")
        return value if isinstance(value, int) else h.get("ecc", error_type, counter_type)

    def nvmlDeviceGetRemappedRows(self, h: FakeGpu) -> tuple[int, int, int, int]:
        return h.get("remapped_rows")

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeGpu) -> int:
        return h.get("pcie_replays")

    # Events
    def nvmlEventSetCreate(self) -> FakeEventSet:
        s = FakeEventSet()
        self.event_sets.append(s)
        return s

    def nvmlDeviceRegisterEvents(self, h: FakeGpu, event_types: int, s: FakeEventSet) -> None:
        assert event_types & pynvml.nvmlEventTypeXidCriticalError
        if not h.raw["events"]:
            raise nvml_error(NOT_SUPPORTED)
        s.devices.append(h)

    def nvmlEventSetWait_v2(self, s: FakeEventSet, timeout_ms: int) -> Any:
        try:
            event = s.events.get(timeout=timeout_ms / 1e3)
        except queue.Empty:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None
        if isinstance(event, pynvml.NVMLError):
            raise event
        return event

    def nvmlEventSetFree(self, s: FakeEventSet) -> None:
        s.freed = True

    def deliver_xid(self, gpu_index: int | None, xid: int) -> None:
        device = None if gpu_index is None else self.gpus[gpu_index]
        event = SimpleNamespace(
            device=device,
            eventType=pynvml.nvmlEventTypeXidCriticalError,
            eventData=xid,
            gpuInstanceId=0,
            computeInstanceId=0,
        )
        for s in self.event_sets:
            s.events.put(event)


def host(**disk: int | None) -> HostSample:
    return HostSample(0.5, 8 * 2**30, 64 * 2**30, 1.5, disk)


def gpu(index: int = 0, **fields: Any) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", name="NVIDIA H100", temperature_celsius=50.0, **fields)


def exposition(collector: HealthCollector) -> str:
    registry = CollectorRegistry()  # never the global one
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} from an exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


# ---------------------------------------------------------------------------------------------
# Readings


def test_sample_reads_every_field_in_base_units():
    backend = NvmlBackend(FakeNvml())
    g0, g1 = backend.sample()
    assert (g0.index, g1.index) == (0, 1)
    assert g0.uuid == "GPU-00000000-0000-0000-0000-000000000000"
    assert g0.name == "NVIDIA H100 80GB HBM3"  # bytes decoded
    assert g0.pci_bus_id == "00000000:19:00.0"
    assert g0.driver_version == "550.54.15"
    assert g0.lost is False
    assert g0.temperature_celsius == 45.0
    assert g0.power_watts == pytest.approx(350.0)  # from 350000 mW
    assert g0.energy_joules == pytest.approx(123_456.789)  # from mJ
    assert g0.utilization_ratio == pytest.approx(0.87)  # from 87 %
    assert (g0.memory_used_bytes, g0.memory_total_bytes) == (20 * 2**30, 80 * 2**30)
    assert g0.sm_clock_hertz == pytest.approx(1.98e9)  # from 1980 MHz
    assert g0.memory_clock_hertz == pytest.approx(2.619e9)
    assert g0.throttle_reasons == frozenset({"power"})
    assert (g0.ecc_single_volatile, g0.ecc_double_volatile) == (3, 0)
    assert (g0.ecc_single_aggregate, g0.ecc_double_aggregate) == (12, 1)
    assert (g0.remapped_rows_correctable, g0.remapped_rows_uncorrectable) == (2, 1)
    assert (g0.remap_pending, g0.remap_failure) == (False, False)
    assert g0.pcie_replays == 7
    backend.close()


def test_throttle_bits_are_nvml_constants():
    n = pynvml
    assert decode_throttle_reasons(n.nvmlClocksEventReasonGpuIdle) == {"low_util"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonSwPowerCap) == {"power"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonHwSlowdown) == {"hw_slowdown"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonSyncBoost) == {"sync_boost"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonSwThermalSlowdown) == {"thermal"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonHwThermalSlowdown) == {"thermal"}
    assert decode_throttle_reasons(n.nvmlClocksEventReasonHwPowerBrakeSlowdown) == {"board_limit"}
    assert decode_throttle_reasons(n.nvmlClocksThrottleReasonBoardLimit) == {"board_limit"}
    assert decode_throttle_reasons(n.nvmlClocksThrottleReasonReliability) == {"reliability"}
    assert decode_throttle_reasons(n.nvmlClocksThrottleReasonAll) == set(THROTTLE_REASONS)
    assert decode_throttle_reasons(n.nvmlClocksEventReasonNone) == frozenset()


def test_not_supported_fields_are_none_and_left_out_of_metrics(caplog):
    fake = FakeNvml(
        [
            FakeGpu(
                0,
                power=err(NOT_SUPPORTED),
                energy=err(NOT_SUPPORTED),
                throttle=err(NOT_SUPPORTED),
                ecc=err(NOT_SUPPORTED),
                remapped_rows=err(NOT_SUPPORTED),
                pcie_replays=err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
            )
        ]
    )
    caplog.set_level(logging.WARNING)
    (g,) = NvmlBackend(fake).sample()
    assert g.power_watts is None and g.energy_joules is None and g.throttle_reasons is None
    assert g.ecc_single_volatile is None and g.ecc_double_aggregate is None
    assert g.remapped_rows_correctable is None and g.remap_failure is None and g.pcie_replays is None
    assert g.temperature_celsius == 45.0  # the rest still reads
    assert not caplog.records  # unsupported is normal, not a warning

    text = exposition(HealthCollector(NvmlBackend(fake)))
    for name in (
        "stanchion_gpu_power_watts",
        "stanchion_gpu_energy_joules_total",
        "stanchion_gpu_throttle_active",
        "stanchion_gpu_ecc_errors_total",
        "stanchion_gpu_remapped_rows_total",
        "stanchion_gpu_row_remap_failure",
        "stanchion_gpu_pcie_replays_total",
    ):
        assert not re.search(rf"^{name}\{{", text, re.M), name
    assert value(text, "stanchion_gpu_temperature_celsius", gpu="0", UUID=fake.gpus[0].raw["uuid"]) == 45.0


def test_other_field_errors_read_as_none_and_warn_once(caplog):
    fake = FakeNvml([FakeGpu(0, temperature=err(pynvml.NVML_ERROR_NO_PERMISSION))])
    backend = NvmlBackend(fake)
    caplog.set_level(logging.WARNING, logger="agent.health")
    for _ in range(3):
        (g,) = backend.sample()
        assert g.temperature_celsius is None and g.power_watts == 350.0
    assert len([r for r in caplog.records if "temperature" in r.getMessage()]) == 1


@pytest.mark.parametrize("where", ["handle", "field"])
def test_lost_gpu_is_a_sample_and_unhealthy(where):
    fake = FakeNvml()
    backend = NvmlBackend(fake)
    backend.sample()  # learns the UUIDs while GPU 1 still answers
    if where == "handle":
        fake.gpus[1].raw["handle_error"] = GPU_IS_LOST
    else:
        fake.gpus[1].raw["temperature"] = err(GPU_IS_LOST)
    g0, g1 = backend.sample()
    assert not g0.lost and g1.lost
    assert g1.uuid == "GPU-00000000-0000-0000-0000-000000000001"  # remembered
    assert g1.temperature_celsius is None
    v, reason = verdict([g0, g1], host(), {})
    assert v == "unhealthy" and "GPU 1" in reason and "lost" in reason

    text = exposition(HealthCollector(backend))
    assert value(text, "stanchion_gpu_lost", gpu="1", UUID=fake.gpus[1].raw["uuid"]) == 1
    assert value(text, "stanchion_gpu_lost", gpu="0", UUID=fake.gpus[0].raw["uuid"]) == 0
    assert value(text, "stanchion_node_health", verdict="unhealthy") == 1


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_driver_is_nvml_unavailable(code):
    with pytest.raises(NvmlUnavailable):
        NvmlBackend(FakeNvml(init_error=code))


def test_missing_nvidia_ml_py_is_nvml_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlUnavailable, match="not installed"):
        NvmlBackend()


def test_no_driver_logs_one_line_and_exports_nvml_up_0(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="agent.health")
    backend = open_backend(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert backend is None
    collector = HealthCollector(backend, directories=[tmp_path])
    text = exposition(collector) + exposition(collector)  # two scrapes
    assert [r.getMessage() for r in caplog.records] == [
        "NVML unavailable (NVML Shared Library Not Found): GPU health checks are off, host checks only"
    ]
    assert "stanchion_nvml_up 0.0" in text
    assert 'stanchion_node_health{verdict="healthy"} 1.0' in text
    assert "stanchion_host_memory_total_bytes " in text
    assert f'stanchion_host_disk_free_bytes{{path="{tmp_path}"}}' in text
    assert not re.search(r"^stanchion_gpu_\w+\{", text, re.M)


def test_broken_driver_is_unhealthy_until_it_recovers(caplog):
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    caplog.set_level(logging.WARNING, logger="agent.health")
    backend = NvmlBackend(fake)  # not NvmlUnavailable: a driver is there, and broken
    with pytest.raises(NvmlQueryError):
        backend.sample()
    health = assess(backend)
    assert not health.nvml_up and health.verdict == "unhealthy"
    assert "version mismatch" in health.reason
    assert len(caplog.records) == 1  # logged at start-up only, not on every scrape
    fake.init_error = None
    assert assess(backend).nvml_up


def test_device_count_failure_makes_nvml_down():
    fake = FakeNvml()
    backend = NvmlBackend(fake)
    fake.count_error = pynvml.NVML_ERROR_UNKNOWN
    text = exposition(HealthCollector(backend))
    assert "stanchion_nvml_up 0.0" in text
    assert 'stanchion_node_health{verdict="unhealthy"} 1.0' in text


def test_assess_async_samples_off_the_event_loop():
    fake = FakeNvml()
    health = asyncio.run(assess_async(NvmlBackend(fake)))
    assert health.nvml_up and len(health.gpus) == 2
    assert fake.sample_threads and threading.main_thread().name not in fake.sample_threads


# ---------------------------------------------------------------------------------------------
# Verdict


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 92, 94, 95])
def test_each_bad_xid_is_unhealthy(xid):
    v, reason = verdict([gpu(0)], host(), {(0, "GPU-0", xid): 1})
    assert v == "unhealthy"
    assert f"Xid {xid}" in reason and "GPU 0" in reason


@pytest.mark.parametrize("xid", [13, 31, 43, 45])
def test_xids_a_program_causes_leave_the_node_healthy(xid):
    # 13 graphics engine exception and 31 MMU fault come from user code (an illegal address);
    # 45 is preemptive cleanup, raised whenever the agent kills a worker that holds the GPU.
    assert verdict([gpu(0)], host(), {(0, "GPU-0", xid): 5})[0] == "healthy"


def test_other_xids_are_degraded():
    v, reason = verdict([gpu(0)], host(), {(0, "GPU-0", 119): 2})
    assert v == "degraded" and "Xid 119 on GPU 0 (GPU-0), 2x" in reason


@pytest.mark.parametrize(
    ("fields", "expected", "words"),
    [
        ({"ecc_double_volatile": 1}, "unhealthy", "double-bit ECC"),
        ({"ecc_double_volatile": 0, "ecc_double_aggregate": 4}, "healthy", "all checks passed"),
        ({"remap_failure": True}, "unhealthy", "row remapping failed"),
        ({"remap_pending": True}, "degraded", "remap pending"),
        ({"ecc_single_volatile": 101}, "degraded", "single-bit ECC"),
        ({"ecc_single_volatile": 100}, "healthy", "all checks passed"),
        ({"throttle_reasons": frozenset({"thermal"})}, "degraded", "throttled (thermal)"),
        ({"throttle_reasons": frozenset({"power", "low_util"})}, "healthy", "all checks passed"),
    ],
)
def test_gpu_findings(fields, expected, words):
    v, reason = verdict([gpu(0, **fields)], host(), {})
    assert v == expected and words in reason


@pytest.mark.parametrize(
    ("celsius", "expected"), [(84.0, "healthy"), (85.0, "degraded"), (95.0, "unhealthy")]
)
def test_temperature(celsius, expected):
    g = GpuSample(index=0, uuid="GPU-0", temperature_celsius=celsius)
    assert verdict([g], host(), {})[0] == expected


def test_disk_below_minimum_is_unhealthy():
    t = HealthThresholds(min_disk_free_bytes=10 * 2**30)
    v, reason = verdict([gpu(0)], host(**{"/ckpt": 2 * 2**30, "/run": 50 * 2**30}), {}, t)
    assert v == "unhealthy" and reason == "2.0 GiB free in /ckpt (minimum 10.0 GiB)"
    assert verdict([gpu(0)], host(**{"/ckpt": None}), {}, t)[0] == "degraded"


def test_no_nvml_is_healthy_unless_gpus_are_required():
    assert verdict(None, host(), {}) == ("healthy", "no NVML; host checks only")
    v, reason = verdict(None, host(), {}, HealthThresholds(require_gpus=True))
    assert v == "unhealthy" and "required" in reason
    assert verdict([], host(), {})[0] == "healthy"
    assert verdict([], host(), {}, HealthThresholds(require_gpus=True))[0] == "unhealthy"


def test_fewer_gpus_than_expected_is_unhealthy():
    v, reason = verdict([gpu(0)], host(), {}, HealthThresholds(expected_gpus=8))
    assert v == "unhealthy" and reason == "found 1 GPUs, expected 8"


def test_nvml_error_is_unhealthy():
    assert verdict(None, host(), {}, nvml_error="boom") == ("unhealthy", "NVML query failed: boom")


def test_reason_lists_every_finding_worst_first():
    gpus = [gpu(0, remap_pending=True), gpu(1, ecc_double_volatile=2)]
    v, reason = verdict(gpus, host(), {})
    assert v == "unhealthy"
    assert reason.index("double-bit") < reason.index("remap pending")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature_degraded_c": 96.0},
        {"min_disk_free_bytes": -1},
        {"degraded_throttle_reasons": frozenset({"cosmic_rays"})},
        {"ignored_xids": frozenset({79})},
        {"expected_gpus": -1},
    ],
)
def test_thresholds_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        HealthThresholds(**kwargs)


# ---------------------------------------------------------------------------------------------
# Xid events


def wait_for_counts(watcher: XidWatcher, expected: dict, deadline_s: float = 5.0) -> dict:
    """Poll until the watcher's thread has counted the delivered events (the bound is a safety net)."""
    end = time.monotonic() + deadline_s
    while (counts := watcher.counts()) != expected and time.monotonic() < end:
        time.sleep(0.005)
    return counts


def test_xid_watcher_counts_events_from_its_thread():
    fake = FakeNvml()
    watcher = XidWatcher(NvmlBackend(fake), wait_timeout_ms=20)
    assert watcher.start()
    u0, u1 = (g.raw["uuid"] for g in fake.gpus)
    fake.deliver_xid(0, 79)
    fake.deliver_xid(0, 79)
    fake.deliver_xid(1, 13)
    fake.deliver_xid(None, 48)  # an event NVML could not tie to a device
    expected = {(0, u0, 79): 2, (1, u1, 13): 1, (-1, "unknown", 48): 1}
    assert wait_for_counts(watcher, expected) == expected
    watcher.stop()
    assert fake.event_sets[0].freed

    health = assess(NvmlBackend(fake), xid_watcher=watcher)
    assert health.verdict == "unhealthy" and "Xid 79 (GPU has fallen off the bus)" in health.reason
    text = exposition(HealthCollector(NvmlBackend(fake), xid_watcher=watcher))
    assert value(text, "stanchion_gpu_xid_errors_total", gpu="0", UUID=u0, xid="79") == 2
    assert value(text, "stanchion_gpu_xid_errors_total", gpu="1", UUID=u1, xid="13") == 1


def test_xid_watcher_survives_nvml_errors_while_waiting():
    fake = FakeNvml()
    watcher = XidWatcher(NvmlBackend(fake), wait_timeout_ms=20)
    watcher.start()
    fake.event_sets[0].events.put(nvml_error(pynvml.NVML_ERROR_UNKNOWN))
    fake.deliver_xid(1, 74)
    expected = {(1, fake.gpus[1].raw["uuid"], 74): 1}
    assert wait_for_counts(watcher, expected) == expected
    watcher.stop()


def test_xid_watcher_skips_gpus_without_events():
    fake = FakeNvml([FakeGpu(0, events=False), FakeGpu(1)])
    watcher = XidWatcher(NvmlBackend(fake), wait_timeout_ms=20)
    assert watcher.start()
    assert fake.event_sets[0].devices == [fake.gpus[1]]
    fake.deliver_xid(1, 94)
    expected = {(1, fake.gpus[1].raw["uuid"], 94): 1}
    assert wait_for_counts(watcher, expected) == expected
    watcher.stop()

    none_supported = FakeNvml([FakeGpu(0, events=False)])
    watcher = XidWatcher(NvmlBackend(none_supported))
    assert watcher.start() is False
    assert none_supported.event_sets[0].freed
    watcher.stop()


def test_xid_wait_once_without_a_thread():
    fake = FakeNvml()
    watcher = XidWatcher(NvmlBackend(fake))
    assert watcher.register()  # no thread: each wait is driven by the test
    assert watcher.wait_once(1) is None  # timeout
    fake.deliver_xid(1, 63)
    key = (1, fake.gpus[1].raw["uuid"], 63)
    assert watcher.wait_once(1000) == key
    assert watcher.counts() == {key: 1}
    watcher.stop()
    assert fake.event_sets[0].freed


# ---------------------------------------------------------------------------------------------
# Collector


def node_health_metric_names() -> set[str]:
    """Every metric name in the "node health" table of docs/metrics.md."""
    doc = (REPO / "docs" / "metrics.md").read_text()
    section = doc.split("## Agent: node health")[1].split("\n## ")[0]
    return set(re.findall(r"`(stanchion_\w+)`", section))


def test_collector_exports_exactly_the_documented_names_and_labels(tmp_path):
    fake = FakeNvml()
    backend = NvmlBackend(fake)
    watcher = XidWatcher(backend, wait_timeout_ms=20)
    watcher.start()
    fake.deliver_xid(0, 79)
    wait_for_counts(watcher, {(0, fake.gpus[0].raw["uuid"], 79): 1})
    text = exposition(HealthCollector(backend, watcher, directories=[tmp_path / "ckpt"]))
    watcher.stop()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = {s.name for f in families.values() for s in f.samples}
    assert exported == node_health_metric_names()

    ids = {"gpu": "0", "UUID": fake.gpus[0].raw["uuid"]}
    assert value(text, "stanchion_nvml_up") == 1
    assert value(text, "stanchion_node_health", verdict="unhealthy") == 1  # the Xid 79
    assert value(text, "stanchion_node_health", verdict="healthy") == 0
    info = {
        "model_name": "NVIDIA H100 80GB HBM3",
        "driver_version": "550.54.15",
        "pci_bus_id": "00000000:19:00.0",
    }
    assert value(text, "stanchion_gpu_info", **ids, **info) == 1
    assert value(text, "stanchion_gpu_temperature_celsius", **ids) == 45
    assert value(text, "stanchion_gpu_power_watts", **ids) == 350
    assert value(text, "stanchion_gpu_energy_joules_total", **ids) == pytest.approx(123456.789)
    assert value(text, "stanchion_gpu_utilization_ratio", **ids) == pytest.approx(0.87)
    assert value(text, "stanchion_gpu_memory_used_bytes", **ids) == 20 * 2**30
    assert value(text, "stanchion_gpu_memory_total_bytes", **ids) == 80 * 2**30
    assert value(text, "stanchion_gpu_sm_clock_hertz", **ids) == 1.98e9
    assert value(text, "stanchion_gpu_memory_clock_hertz", **ids) == 2.619e9
    assert value(text, "stanchion_gpu_throttle_active", **ids, reason="power") == 1
    assert value(text, "stanchion_gpu_throttle_active", **ids, reason="thermal") == 0
    assert value(text, "stanchion_gpu_ecc_errors_total", **ids, bit="double", scope="aggregate") == 1
    assert value(text, "stanchion_gpu_ecc_errors_total", **ids, bit="single", scope="volatile") == 3
    assert value(text, "stanchion_gpu_remapped_rows_total", **ids, type="correctable") == 2
    assert value(text, "stanchion_gpu_remapped_rows_total", **ids, type="uncorrectable") == 1
    assert value(text, "stanchion_gpu_row_remap_failure", **ids) == 0
    assert value(text, "stanchion_gpu_pcie_replays_total", **ids) == 7
    assert value(text, "stanchion_gpu_lost", **ids) == 0
    assert value(text, "stanchion_gpu_xid_errors_total", **ids, xid="79") == 1
    assert 0 <= value(text, "stanchion_host_cpu_utilization_ratio") <= 1
    assert value(text, "stanchion_host_load1") >= 0
    assert (
        0
        < value(text, "stanchion_host_memory_used_bytes")
        <= value(text, "stanchion_host_memory_total_bytes")
    )
    # A checkpoint directory that does not exist yet reports its file system's free space.
    assert value(text, "stanchion_host_disk_free_bytes", path=str(tmp_path / "ckpt")) > 0
    assert families["stanchion_gpu_ecc_errors"].type == "counter"
    assert families["stanchion_gpu_row_remap_failure"].type == "gauge"


def test_registering_the_collector_does_not_query_nvml():
    fake = FakeNvml()
    CollectorRegistry(auto_describe=True).register(HealthCollector(NvmlBackend(fake)))
    assert fake.sample_threads == []


def test_exposition_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool is not None, (
        "promtool is missing: run `make test` (it installs Debian's prometheus package)"
    )
    fake = FakeNvml([FakeGpu(0), FakeGpu(1, temperature=err(GPU_IS_LOST))])
    backend = NvmlBackend(fake)
    watcher = XidWatcher(backend, wait_timeout_ms=20)
    watcher.start()
    fake.deliver_xid(0, 48)
    wait_for_counts(watcher, {(0, fake.gpus[0].raw["uuid"], 48): 1})
    text = exposition(HealthCollector(backend, watcher, directories=[tmp_path]))
    watcher.stop()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


# ---------------------------------------------------------------------------------------------
# Real hardware (run on a GPU machine: pytest -m gpu)


@pytest.mark.gpu
def test_real_nvml_readings_are_in_base_units():
    try:
        backend = NvmlBackend()
    except NvmlUnavailable as e:
        pytest.skip(f"no NVIDIA driver: {e}")
    with backend:
        gpus = backend.sample()
    if not gpus:
        pytest.skip("NVML sees no GPU")
    for g in gpus:
        assert g.uuid.startswith(("GPU-", "MIG-")) and not g.lost
        assert g.temperature_celsius is None or 10 <= g.temperature_celsius <= 110
        assert g.power_watts is None or 1 <= g.power_watts <= 2000
        assert g.utilization_ratio is None or 0 <= g.utilization_ratio <= 1
        assert g.sm_clock_hertz is None or 1e8 <= g.sm_clock_hertz <= 5e9
        assert g.memory_total_bytes is None or g.memory_total_bytes >= 2**30
