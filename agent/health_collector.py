"""Prometheus collector for node health: the "node health" metrics of docs/metrics.md, read at scrape time.

No polling thread and no cached values: every scrape calls :func:`agent.health.assess` (NVML, psutil,
the Xid watcher's counts) on prometheus-client's HTTP thread, which may block, being off the event
loop. A field NVML does not support on a GPU is left out, not exported as 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.health import (
    THROTTLE_REASONS,
    VERDICTS,
    HealthThresholds,
    NodeHealth,
    XidWatcher,
    assess,
    sample_host,
)

GPU_LABELS = ["gpu", "UUID"]  # spelled as dcgm-exporter spells them, so the two can be joined

# (attribute of GpuSample, metric name, help) for the plain per-GPU gauges
_GPU_GAUGES: Sequence[tuple[str, str, str]] = (
    ("temperature_celsius", "stanchion_gpu_temperature_celsius", "GPU die temperature."),
    ("power_watts", "stanchion_gpu_power_watts", "GPU power draw."),
    (
        "utilization_ratio",
        "stanchion_gpu_utilization_ratio",
        "Fraction of the last sample period a kernel ran.",
    ),
    ("memory_used_bytes", "stanchion_gpu_memory_used_bytes", "GPU memory in use."),
    ("memory_total_bytes", "stanchion_gpu_memory_total_bytes", "GPU memory in total."),
    ("sm_clock_hertz", "stanchion_gpu_sm_clock_hertz", "Current SM clock."),
    ("memory_clock_hertz", "stanchion_gpu_memory_clock_hertz", "Current memory clock."),
)


class HealthCollector(Collector):
    """Exports ``stanchion_nvml_up``, ``stanchion_node_health``, ``stanchion_gpu_*`` and
    ``stanchion_host_*``.

    ``backend`` is an :class:`agent.health.NvmlBackend` (or a fake with ``sample()``), or ``None``
    where NVML is unavailable: then ``stanchion_nvml_up`` is 0 and only host metrics follow.
    ``directories`` are the run and checkpoint directories whose free space is exported and judged.
    """

    def __init__(
        self,
        backend: object | None,
        xid_watcher: XidWatcher | None = None,
        directories: Iterable[str | os.PathLike[str]] = (),
        thresholds: HealthThresholds = HealthThresholds(),
    ):
        self.backend = backend
        self.xid_watcher = xid_watcher
        self.directories = tuple(str(d) for d in directories)
        self.thresholds = thresholds
        sample_host()  # prime psutil's CPU counter: the first non-blocking reading is always 0

    def describe(self) -> Iterator[Metric]:
        """The families without samples: registration stays cheap and name clashes are caught."""
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        health = assess(self.backend, self.directories, self.xid_watcher, self.thresholds)
        yield from self.families(health)

    def families(self, health: NodeHealth) -> Iterable[Metric]:
        """The metric families for one assessment (separate from collect() so it can be tested)."""
        m = self._families()
        m["nvml_up"].add_metric([], 1 if health.nvml_up else 0)
        for v in VERDICTS:
            m["node_health"].add_metric([v], 1 if v == health.verdict else 0)

        for g in health.gpus:
            ids = [str(g.index), g.uuid]
            m["info"].add_metric(ids + [g.name or "", g.driver_version or "", g.pci_bus_id or ""], 1)
            m["lost"].add_metric(ids, 1 if g.lost else 0)
            for attr, name, _ in _GPU_GAUGES:
                if (value := getattr(g, attr)) is not None:
                    m[name].add_metric(ids, value)
            if g.energy_joules is not None:
                m["energy"].add_metric(ids, g.energy_joules)
            if g.throttle_reasons is not None:
                for reason in THROTTLE_REASONS:
                    m["throttle"].add_metric(ids + [reason], 1 if reason in g.throttle_reasons else 0)
            for bit in ("single", "double"):
                for scope in ("volatile", "aggregate"):
                    if (count := getattr(g, f"ecc_{bit}_{scope}")) is not None:
                        m["ecc"].add_metric(ids + [bit, scope], count)
            if g.remapped_rows_correctable is not None:
                m["remapped"].add_metric(ids + ["correctable"], g.remapped_rows_correctable)
            if g.remapped_rows_uncorrectable is not None:
                m["remapped"].add_metric(ids + ["uncorrectable"], g.remapped_rows_uncorrectable)
            if g.remap_failure is not None:
                m["remap_failure"].add_metric(ids, 1 if g.remap_failure else 0)
            if g.pcie_replays is not None:
                m["pcie"].add_metric(ids, g.pcie_replays)
        for (index, uuid, xid), count in sorted(health.xid_counts.items()):
            m["xid"].add_metric([str(index), uuid, str(xid)], count)

        h = health.host
        if h.cpu_utilization_ratio is not None:
            m["host_cpu"].add_metric([], h.cpu_utilization_ratio)
        if h.memory_used_bytes is not None:
            m["host_mem_used"].add_metric([], h.memory_used_bytes)
        if h.memory_total_bytes is not None:
            m["host_mem_total"].add_metric([], h.memory_total_bytes)
        if h.load1 is not None:
            m["host_load1"].add_metric([], h.load1)
        for path, free in sorted(h.disk_free_bytes.items()):
            if free is not None:
                m["host_disk_free"].add_metric([path], free)
        return m.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        # Counter families take the name without `_total`; prometheus-client appends it.
        gpu = GPU_LABELS
        return {
            "nvml_up": GaugeMetricFamily(
                "stanchion_nvml_up", "1 if NVML answered on this scrape, 0 without a driver or on failure."
            ),
            "node_health": GaugeMetricFamily(
                "stanchion_node_health", "1 for the node's current health verdict.", labels=["verdict"]
            ),
            "info": GaugeMetricFamily(
                "stanchion_gpu_info",
                "GPU identity, value 1.",
                labels=gpu + ["model_name", "driver_version", "pci_bus_id"],
            ),
            "lost": GaugeMetricFamily("stanchion_gpu_lost", "1 if NVML reports the GPU as lost.", labels=gpu),
            **{name: GaugeMetricFamily(name, help_text, labels=gpu) for _, name, help_text in _GPU_GAUGES},
            "energy": CounterMetricFamily(
                "stanchion_gpu_energy_joules", "GPU energy used since the driver loaded.", labels=gpu
            ),
            "throttle": GaugeMetricFamily(
                "stanchion_gpu_throttle_active",
                "1 while this reason holds the GPU clocks down.",
                labels=gpu + ["reason"],
            ),
            "ecc": CounterMetricFamily(
                "stanchion_gpu_ecc_errors",
                "ECC errors; scope volatile counts since the driver loaded, aggregate over the GPU's life.",
                labels=gpu + ["bit", "scope"],
            ),
            "remapped": CounterMetricFamily(
                "stanchion_gpu_remapped_rows", "Memory rows remapped, by cause.", labels=gpu + ["type"]
            ),
            "remap_failure": GaugeMetricFamily(
                "stanchion_gpu_row_remap_failure", "1 if a row remap failed (no spare rows).", labels=gpu
            ),
            "pcie": CounterMetricFamily("stanchion_gpu_pcie_replays", "PCIe replay events.", labels=gpu),
            "xid": CounterMetricFamily(
                "stanchion_gpu_xid_errors",
                "Xid critical errors seen since the agent started.",
                labels=gpu + ["xid"],
            ),
            "host_cpu": GaugeMetricFamily(
                "stanchion_host_cpu_utilization_ratio", "Host CPU utilisation since the previous scrape."
            ),
            "host_mem_used": GaugeMetricFamily(
                "stanchion_host_memory_used_bytes", "Host memory in use (total minus available)."
            ),
            "host_mem_total": GaugeMetricFamily("stanchion_host_memory_total_bytes", "Host memory in total."),
            "host_load1": GaugeMetricFamily("stanchion_host_load1", "Host load average over one minute."),
            "host_disk_free": GaugeMetricFamily(
                "stanchion_host_disk_free_bytes",
                "Free space on the file system of the run or checkpoint directory.",
                labels=["path"],
            ),
        }
