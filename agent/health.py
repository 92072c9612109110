"""Node health: GPU readings through NVML, host readings through psutil, Xid events, and a pure verdict.

This is the only module that imports ``pynvml`` (the package nvidia-ml-py). Everything else takes a
backend, an object with a ``sample() -> list[GpuSample]`` method, so tests inject a fake NVML module
into :class:`NvmlBackend` and the CLI tests a fake backend.

Blocking calls and the event loop: NVML calls are blocking C calls that take milliseconds (much longer
on a sick GPU), and ``statvfs`` on a network file system can block for seconds. The asyncio agent must
never call :meth:`NvmlBackend.sample`, :func:`sample_host` or :func:`assess` on its event loop; it
awaits :func:`assess_async`, which runs them in a worker thread. Prometheus scrapes run on
prometheus-client's own HTTP thread, so the collector calls :func:`assess` directly.

Units: every reading is converted to base units here (watts, joules, hertz, bytes, ratios 0-1), and
every GPU reading is optional: ``None`` means NVML does not support it on this GPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
VERDICTS = (HEALTHY, DEGRADED, UNHEALTHY)  # in order of severity

XidKey = tuple[int, str, int]  # (GPU index, UUID, Xid code)

# NVML's clocks-event ("throttle") reason bits, named as dcgm-exporter names its violation counters
# where one exists. Values are nvmlClocksEventReason* / nvmlClocksThrottleReason* in nvidia-ml-py.
# HW slowdown stays its own reason: NVML raises it for high temperature, an external power brake and
# fast-trigger power protection alike, so folding it into `thermal` would mislabel power events.
THROTTLE_REASON_BITS: tuple[tuple[str, int], ...] = (
    ("low_util", 0x1),  # GpuIdle: nothing to run, clocks drop on purpose
    ("applications_clocks", 0x2),  # ApplicationsClocksSetting
    ("power", 0x4),  # SwPowerCap: at the power limit (normal under full load)
    ("hw_slowdown", 0x8),  # HwSlowdown: clocks cut by half or more (heat, power brake, fast trigger)
    ("sync_boost", 0x10),  # SyncBoost: held to the slowest GPU of a sync-boost group
    ("thermal", 0x20 | 0x40),  # SwThermalSlowdown | HwThermalSlowdown
    ("board_limit", 0x80 | 0x200),  # HwPowerBrakeSlowdown | BoardLimit
    ("display_clocks", 0x100),  # DisplayClockSetting
    ("reliability", 0x400),  # Reliability
)
THROTTLE_REASONS: tuple[str, ...] = tuple(name for name, _ in THROTTLE_REASON_BITS)

# NVIDIA's Xid catalogue, for the codes that make a GPU unfit to train on.
XID_MEANINGS: Mapping[int, str] = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
}


def decode_throttle_reasons(mask: int) -> frozenset[str]:
    """Names of the active reasons in an NVML clocks-event bitmask (unknown bits are ignored)."""
    return frozenset(name for name, bits in THROTTLE_REASON_BITS if mask & bits)


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver here: nvidia-ml-py is missing, libnvidia-ml.so is absent or the kernel
    module is not loaded. The node runs host checks only."""


class NvmlQueryError(RuntimeError):
    """NVML is installed but a query for the whole node failed (initialisation, device count, a
    device handle). Unlike a missing driver, this is a health problem."""


class _GpuLost(Exception):
    pass


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings at one moment, in base units; ``None`` where NVML does not support a field."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    driver_version: str | None = None
    lost: bool = False  # NVML_ERROR_GPU_IS_LOST: fell off the bus (Xid 79) or needs a reset
    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None  # since the driver loaded
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    throttle_reasons: frozenset[str] | None = None  # the active ones, names from THROTTLE_REASONS
    ecc_single_volatile: int | None = None  # volatile: since the driver loaded
    ecc_double_volatile: int | None = None
    ecc_single_aggregate: int | None = None  # aggregate: the GPU's lifetime
    ecc_double_aggregate: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None  # a remap waits for a GPU reset
    remap_failure: bool | None = None  # no spare row was left: the GPU needs replacing
    pcie_replays: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.throttle_reasons is not None:
            d["throttle_reasons"] = sorted(self.throttle_reasons)
        return d


@dataclass(frozen=True)
class HostSample:
    cpu_utilization_ratio: float | None
    memory_used_bytes: int | None  # total minus available: what cannot be reclaimed
    memory_total_bytes: int | None
    load1: float | None
    disk_free_bytes: Mapping[str, int | None] = field(default_factory=dict)  # None: unreadable

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["disk_free_bytes"] = dict(self.disk_free_bytes)
        return d


# ---------------------------------------------------------------------------------------------
# NVML


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({e})") from e
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """Reads every GPU through NVML. ``nvml`` is the pynvml module, or a fake with the same names.

    Raises :class:`NvmlUnavailable` when there is no driver. Any other initialisation error (a
    driver/library version mismatch after an upgrade, no permission) leaves a backend whose
    ``sample()`` retries the initialisation and raises :class:`NvmlQueryError` until it works.
    """

    def __init__(self, nvml: Any = None):
        self._n = _import_pynvml() if nvml is None else nvml
        self._initialised = False
        self._failing = False  # the last sample() failed (its warning is logged once)
        self._warned_fields: set[tuple[str, int | None]] = set()
        self._uuids: dict[int, str] = {}  # index -> UUID, remembered for GPUs that get lost later
        self.driver_version: str | None = None
        try:
            self._init()
        except NvmlQueryError as e:
            self._failing = True
            logger.warning("NVML failed to initialise: %s; node health reports it until it recovers", e)

    def _init(self) -> None:
        n = self._n
        try:
            n.nvmlInit()
        except n.NVMLError as e:
            if getattr(e, "value", None) in (n.NVML_ERROR_LIBRARY_NOT_FOUND, n.NVML_ERROR_DRIVER_NOT_LOADED):
                raise NvmlUnavailable(str(e)) from e
            raise NvmlQueryError(f"nvmlInit: {e}") from e
        self._initialised = True
        try:
            self.driver_version = _text(n.nvmlSystemGetDriverVersion())
        except n.NVMLError:
            self.driver_version = None

    def close(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._n.nvmlShutdown()
            except self._n.NVMLError as e:
                logger.debug("nvmlShutdown: %s", e)

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nvml(self) -> Any:
        return self._n

    def handles(self) -> list[tuple[int, str, Any]]:
        """(index, UUID, handle) of every GPU that answers; for the Xid watcher."""
        n, out = self._n, []
        for i in range(n.nvmlDeviceGetCount()):
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(n.nvmlDeviceGetUUID(h))
            except n.NVMLError as e:
                logger.warning("GPU %d: no handle (%s)", i, e)
                continue
            self._uuids[i] = uuid
            out.append((i, uuid, h))
        return out

    def sample(self) -> list[GpuSample]:
        """Read every GPU. Blocking (milliseconds per GPU): never call it on the event loop.

        A lost GPU comes back as a sample with ``lost=True``; a field NVML does not support is
        ``None``; a failure for the whole node raises :class:`NvmlQueryError`."""
        try:
            if not self._initialised:
                self._init()
            samples = self._sample_all()
        except NvmlUnavailable as e:  # the driver went away after start-up
            raise NvmlQueryError(str(e)) from e
        except NvmlQueryError as e:
            if not self._failing:
                logger.warning("NVML query failed: %s (logged again only after it recovers)", e)
            self._failing = True
            raise
        if self._failing:
            logger.info("NVML queries work again")
            self._failing = False
        return samples

    def _sample_all(self) -> list[GpuSample]:
        n = self._n
        try:
            count = n.nvmlDeviceGetCount()
        except n.NVMLError as e:
            raise NvmlQueryError(f"nvmlDeviceGetCount: {e}") from e
        return [self._sample_device(i) for i in range(count)]

    def _read(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call for one field: unsupported -> None, lost GPU -> _GpuLost, any other error
        -> None with one warning per (field, error), so one broken field never hides the rest."""
        n = self._n
        try:
            return fn(*args)
        except n.NVMLError as e:
            code = getattr(e, "value", None)
            if code == n.NVML_ERROR_GPU_IS_LOST:
                raise _GpuLost from e
            unsupported = code in (n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_FUNCTION_NOT_FOUND)
            if not unsupported and (what, code) not in self._warned_fields:
                self._warned_fields.add((what, code))
                logger.warning("NVML %s: %s (reported as missing; logged once)", what, e)
            return None

    def _sample_device(self, index: int) -> GpuSample:
        n = self._n
        f: dict[str, Any] = {
            "index": index,
            "uuid": self._uuids.get(index, ""),
            "driver_version": self.driver_version,
        }
        try:
            try:
                h = n.nvmlDeviceGetHandleByIndex(index)
            except n.NVMLError as e:
                if getattr(e, "value", None) == n.NVML_ERROR_GPU_IS_LOST:
                    raise _GpuLost from e
                raise NvmlQueryError(f"GPU {index}: nvmlDeviceGetHandleByIndex: {e}") from e
            uuid = self._read("uuid", n.nvmlDeviceGetUUID, h)
            if uuid is not None:
                f["uuid"] = self._uuids[index] = _text(uuid)
            name = self._read("name", n.nvmlDeviceGetName, h)
            f["name"] = None if name is None else _text(name)
            pci = self._read("pci_info", n.nvmlDeviceGetPciInfo, h)
            f["pci_bus_id"] = None if pci is None else _text(pci.busId)

            temp = self._read("temperature", n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
            f["temperature_celsius"] = None if temp is None else float(temp)
            mw = self._read("power", n.nvmlDeviceGetPowerUsage, h)
            f["power_watts"] = None if mw is None else mw / 1e3  # NVML: milliwatts
            mj = self._read("energy", n.nvmlDeviceGetTotalEnergyConsumption, h)
            f["energy_joules"] = None if mj is None else mj / 1e3  # NVML: millijoules
            util = self._read("utilization", n.nvmlDeviceGetUtilizationRates, h)
            f["utilization_ratio"] = None if util is None else util.gpu / 100  # NVML: percent
            mem = self._read("memory", n.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                f["memory_used_bytes"], f["memory_total_bytes"] = int(mem.used), int(mem.total)
            sm = self._read("sm_clock", n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)
            f["sm_clock_hertz"] = None if sm is None else sm * 1e6  # NVML: MHz
            mclk = self._read("memory_clock", n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM)
            f["memory_clock_hertz"] = None if mclk is None else mclk * 1e6
            f["throttle_reasons"] = self._throttle_reasons(h)

            for bit, err_type in (
                ("single", n.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                ("double", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ):
                for scope, counter in (
                    ("volatile", n.NVML_VOLATILE_ECC),
                    ("aggregate", n.NVML_AGGREGATE_ECC),
                ):
                    count = self._read(
                        f"ecc_{bit}_{scope}", n.nvmlDeviceGetTotalEccErrors, h, err_type, counter
                    )
                    f[f"ecc_{bit}_{scope}"] = None if count is None else int(count)
            rows = self._read("remapped_rows", n.nvmlDeviceGetRemappedRows, h)
            if rows is not None:
                corr, uncorr, pending, failure = rows
                f["remapped_rows_correctable"], f["remapped_rows_uncorrectable"] = int(corr), int(uncorr)
                f["remap_pending"], f["remap_failure"] = bool(pending), bool(failure)
            replays = self._read("pcie_replays", n.nvmlDeviceGetPcieReplayCounter, h)
            f["pcie_replays"] = None if replays is None else int(replays)
        except _GpuLost:  # keep who it is; readings taken before NVML noticed are dropped
            identity = {k: f.get(k) for k in ("index", "uuid", "name", "pci_bus_id", "driver_version")}
            return GpuSample(**identity, lost=True)
        return GpuSample(**f)

    def _throttle_reasons(self, handle: Any) -> frozenset[str] | None:
        # The "ClocksEvent" name replaced "ClocksThrottle" in driver 535; older drivers lack it.
        for fn_name in (
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetCurrentClocksThrottleReasons",
        ):
            fn = getattr(self._n, fn_name, None)
            mask = None if fn is None else self._read("throttle_reasons", fn, handle)
            if mask is not None:
                return decode_throttle_reasons(int(mask))
        return None


def open_backend(nvml: Any = None) -> NvmlBackend | None:
    """The agent's way in: a backend, or ``None`` on a machine without an NVIDIA driver, which is
    logged here once (the collector then exports ``stanchion_nvml_up 0`` without further logs)."""
    try:
        return NvmlBackend(nvml)
    except NvmlUnavailable as e:
        logger.info("NVML unavailable (%s): GPU health checks are off, host checks only", e)
        return None


def _handle_key(handle: Any) -> Any:
    """A key equal for two handles of one device: NVML returns a fresh ctypes pointer each time,
    so compare addresses; a fake's handles compare by identity."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


class XidWatcher:
    """Counts Xid critical errors per (GPU index, UUID, Xid) through NVML's event API.

    Event-driven, not polling: one daemon thread blocks inside ``nvmlEventSetWait_v2`` (a C call
    that releases the GIL) until the driver reports an event; ``wait_timeout_ms`` only bounds how
    long :meth:`stop` takes. Double-bit ECC errors are not watched here: the volatile ECC counters
    read at scrape time already count them.

    Counts start at zero when the watcher starts and never go down, so a bad Xid keeps the verdict
    unhealthy until the agent restarts (after the GPU was reset or replaced). Xids from before the
    start are in the kernel log (``dmesg | grep Xid``). NVML limitation: when several Xids arrive
    before one wait returns, NVML may report the latest code for all of them. An event whose device
    is unknown is counted under GPU index -1 and UUID "unknown".
    """

    def __init__(self, backend: NvmlBackend, *, wait_timeout_ms: int = 1000):
        if wait_timeout_ms <= 0:
            raise ValueError(f"wait_timeout_ms must be positive, got {wait_timeout_ms}")
        self._backend = backend
        self._n = backend.nvml
        self._wait_timeout_ms = wait_timeout_ms
        self._lock = threading.Lock()
        self._counts: dict[XidKey, int] = {}
        self._devices: dict[Any, tuple[int, str]] = {}  # handle key -> (index, UUID)
        self._event_set: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Register for Xid events on every GPU and start the thread. False (and no thread) when no
        GPU supports Xid events."""
        if not self.register():
            return False
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()
        return True

    def register(self) -> bool:
        """Register for Xid events on every GPU that supports them, without starting the thread
        (then :meth:`wait_once` drives it). False when no GPU supports Xid events."""
        if self._event_set is not None or self._stop.is_set():
            raise RuntimeError("an XidWatcher registers once; make a new one")
        n = self._n
        try:
            self._event_set = n.nvmlEventSetCreate()
            devices = self._backend.handles()
        except n.NVMLError as e:
            logger.warning("Xid events unavailable: %s", e)
            self._free()
            return False
        for index, uuid, handle in devices:
            try:
                n.nvmlDeviceRegisterEvents(handle, n.nvmlEventTypeXidCriticalError, self._event_set)
            except n.NVMLError as e:
                logger.info("GPU %d (%s): Xid events unavailable (%s)", index, uuid, e)
                continue
            self._devices[_handle_key(handle)] = (index, uuid)
        if not self._devices:
            logger.info("no GPU supports Xid events; stanchion_gpu_xid_errors_total stays empty")
            self._free()
            return False
        return True

    def wait_once(self, timeout_ms: int) -> XidKey | None:
        """Block until one event arrives or the timeout passes; count it and return its key."""
        n = self._n
        try:
            data = n.nvmlEventSetWait_v2(self._event_set, timeout_ms)
        except n.NVMLError as e:
            if getattr(e, "value", None) == n.NVML_ERROR_TIMEOUT:
                return None
            raise
        if not data.eventType & n.nvmlEventTypeXidCriticalError:
            return None
        index, uuid = self._devices.get(_handle_key(data.device), (-1, "unknown"))
        key = (index, uuid, int(data.eventData))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        logger.warning("Xid %d on GPU %d (%s)", key[2], index, uuid)
        return key

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.wait_once(self._wait_timeout_ms)
                failing = False
            except self._n.NVMLError as e:  # the driver or a GPU went away: back off, don't spin
                if not failing:
                    logger.warning("waiting for Xid events failed: %s (retrying)", e)
                failing = True
                self._stop.wait(self._wait_timeout_ms / 1e3)

    def counts(self) -> dict[XidKey, int]:
        """A snapshot, safe to call from any thread."""
        with self._lock:
            return dict(self._counts)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # still inside NVML: freeing the set under it would crash
                logger.warning("Xid watcher did not stop within %.1f s", timeout_s)
                return
        self._free()

    def _free(self) -> None:
        if self._event_set is not None:
            try:
                self._n.nvmlEventSetFree(self._event_set)
            except self._n.NVMLError as e:
                logger.debug("nvmlEventSetFree: %s", e)
            self._event_set = None


# ---------------------------------------------------------------------------------------------
# Host


def _disk_free(path: str | os.PathLike[str]) -> int | None:
    # A directory that does not exist yet will live on its nearest existing ancestor's file system.
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(psutil.disk_usage(str(p)).free)
    except OSError as e:
        logger.warning("free space of %s unreadable: %s", path, e)
        return None


def sample_host(
    directories: Iterable[str | os.PathLike[str]] = (), *, cpu_interval_s: float | None = None
) -> HostSample:
    """CPU, memory, load and free disk space. With ``cpu_interval_s=None`` (the default, non-blocking)
    the CPU ratio covers the time since the previous call, and the first call in a process reads 0."""
    vm = psutil.virtual_memory()
    return HostSample(
        cpu_utilization_ratio=psutil.cpu_percent(interval=cpu_interval_s) / 100,
        memory_used_bytes=int(vm.total - vm.available),
        memory_total_bytes=int(vm.total),
        load1=float(psutil.getloadavg()[0]),
        disk_free_bytes={str(d): _disk_free(d) for d in directories},
    )


# ---------------------------------------------------------------------------------------------
# Verdict (pure)


@dataclass(frozen=True)
class HealthThresholds:
    """Where readings turn a node degraded (usable, look at it) or unhealthy (drain it).

    ``ignored_xids`` are Xids a user program causes (13 graphics engine exception, 31 MMU fault,
    43 GPU stopped processing, 45 preemptive cleanup when a process is killed, which the agent does
    on every restart): counted in metrics, no effect on the verdict. Any other Xid outside
    ``bad_xids`` makes the node degraded.
    """

    temperature_degraded_c: float = 85.0
    temperature_unhealthy_c: float = 95.0
    min_disk_free_bytes: int = 10 * 2**30
    bad_xids: frozenset[int] = frozenset({48, 63, 64, 74, 79, 92, 94, 95})
    ignored_xids: frozenset[int] = frozenset({13, 31, 43, 45})
    max_volatile_single_bit_errors: int = 100
    degraded_throttle_reasons: frozenset[str] = frozenset({"hw_slowdown", "thermal", "board_limit"})
    require_gpus: bool = False
    expected_gpus: int | None = None

    def __post_init__(self) -> None:
        if self.temperature_degraded_c > self.temperature_unhealthy_c:
            raise ValueError("temperature_degraded_c must not exceed temperature_unhealthy_c")
        for name in ("min_disk_free_bytes", "max_volatile_single_bit_errors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.expected_gpus is not None and self.expected_gpus < 0:
            raise ValueError(f"expected_gpus must be >= 0, got {self.expected_gpus}")
        if unknown := self.degraded_throttle_reasons - set(THROTTLE_REASONS):
            raise ValueError(
                f"degraded_throttle_reasons: unknown {sorted(unknown)}; known {THROTTLE_REASONS}"
            )
        if both := self.bad_xids & self.ignored_xids:
            raise ValueError(f"Xids {sorted(both)} are in both bad_xids and ignored_xids")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def verdict(
    gpus: Sequence[GpuSample] | None,
    host: HostSample,
    xid_counts: Mapping[XidKey, int],
    thresholds: HealthThresholds = HealthThresholds(),
    *,
    nvml_error: str | None = None,
) -> tuple[str, str]:
    """(verdict, reason) from one set of readings. ``gpus=None`` means no NVML on this machine;
    ``nvml_error`` means NVML is installed but failed to answer.

    Unhealthy (drain the node): NVML failing, a lost GPU, any volatile double-bit ECC error, a row
    remap failure, temperature at or above ``temperature_unhealthy_c``, any Xid in ``bad_xids``, free
    disk space below ``min_disk_free_bytes``, fewer GPUs than ``expected_gpus``, or no GPUs at all when
    ``require_gpus``.
    Degraded (keep training, look at it): temperature at or above ``temperature_degraded_c``, a pending
    row remap (needs a GPU reset), volatile single-bit ECC errors above
    ``max_volatile_single_bit_errors``, clocks throttled for a reason in ``degraded_throttle_reasons``,
    any Xid outside ``bad_xids`` and ``ignored_xids``, unreadable free disk space.
    The reason lists every finding, worst first.
    """
    t = thresholds
    found: list[tuple[int, str]] = []  # (severity index into VERDICTS, sentence)

    def bad(msg: str) -> None:
        found.append((2, msg))

    def warn(msg: str) -> None:
        found.append((1, msg))

    if nvml_error is not None:
        bad(f"NVML query failed: {nvml_error}")
    elif gpus is None:
        if t.require_gpus:
            bad("NVML unavailable but GPUs are required")
    else:
        if not gpus and t.require_gpus:
            bad("no GPUs found but GPUs are required")
        if t.expected_gpus is not None and len(gpus) < t.expected_gpus:
            bad(f"found {len(gpus)} GPUs, expected {t.expected_gpus}")
        for g in gpus:
            who = f"GPU {g.index} ({g.uuid or 'unknown UUID'})"
            if g.lost:
                bad(f"{who} is lost (fell off the bus or needs a reset)")
                continue
            if g.ecc_double_volatile:
                bad(f"{who} has {g.ecc_double_volatile} volatile double-bit ECC errors")
            if g.remap_failure:
                bad(f"{who} row remapping failed (no spare rows left)")
            if g.temperature_celsius is not None:
                if g.temperature_celsius >= t.temperature_unhealthy_c:
                    bad(f"{who} at {g.temperature_celsius:.0f} °C (limit {t.temperature_unhealthy_c:.0f} °C)")
                elif g.temperature_celsius >= t.temperature_degraded_c:
                    warn(
                        f"{who} at {g.temperature_celsius:.0f} °C (warning at {t.temperature_degraded_c:.0f} °C)"
                    )
            if g.remap_pending:
                warn(f"{who} has a row remap pending (needs a GPU reset)")
            if g.ecc_single_volatile is not None and g.ecc_single_volatile > t.max_volatile_single_bit_errors:
                warn(f"{who} has {g.ecc_single_volatile} volatile single-bit ECC errors")
            if g.throttle_reasons and (why := g.throttle_reasons & t.degraded_throttle_reasons):
                warn(f"{who} clocks throttled ({', '.join(sorted(why))})")

    for (index, uuid, xid), count in sorted(xid_counts.items()):
        if count <= 0 or xid in t.ignored_xids:
            continue
        what = f"Xid {xid} ({XID_MEANINGS[xid]})" if xid in XID_MEANINGS else f"Xid {xid}"
        msg = f"{what} on GPU {index} ({uuid}), {count}x"
        if xid in t.bad_xids:
            bad(msg)
        else:
            warn(msg)

    for path, free in sorted(host.disk_free_bytes.items()):
        if free is None:
            warn(f"free space of {path} unreadable")
        elif free < t.min_disk_free_bytes:
            bad(f"{_gib(free)} free in {path} (minimum {_gib(t.min_disk_free_bytes)})")

    if not found:
        if nvml_error is None and gpus is None:
            return HEALTHY, "no NVML; host checks only"
        if not gpus:
            return HEALTHY, "no GPUs found; host checks only"
        return HEALTHY, f"all checks passed on {len(gpus)} GPUs"
    found.sort(key=lambda f: -f[0])
    return VERDICTS[found[0][0]], "; ".join(msg for _, msg in found)


# ---------------------------------------------------------------------------------------------
# One assessment: readings plus verdict


@dataclass(frozen=True)
class NodeHealth:
    nvml_up: bool
    nvml_error: str | None  # why NVML is down (missing driver or a failed query); None when up
    gpus: tuple[GpuSample, ...]
    host: HostSample
    xid_counts: Mapping[XidKey, int]
    verdict: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "nvml_up": self.nvml_up,
            "nvml_error": self.nvml_error,
            "verdict": self.verdict,
            "reason": self.reason,
            "gpus": [g.to_dict() for g in self.gpus],
            "host": self.host.to_dict(),
            "xid_errors": [
                {"gpu": i, "uuid": u, "xid": x, "count": c}
                for (i, u, x), c in sorted(self.xid_counts.items())
            ],
        }


def assess(
    backend: Any,
    directories: Iterable[str | os.PathLike[str]] = (),
    xid_watcher: XidWatcher | None = None,
    thresholds: HealthThresholds = HealthThresholds(),
    *,
    cpu_interval_s: float | None = None,
    unavailable_reason: str = "NVML unavailable",
) -> NodeHealth:
    """Read everything once and judge it. ``backend`` is an :class:`NvmlBackend`, a fake with a
    ``sample()`` method, or ``None`` where NVML is unavailable (``unavailable_reason`` says why).
    Blocking: use :func:`assess_async` from the event loop."""
    gpus: list[GpuSample] | None = None
    query_error: str | None = None
    if backend is not None:
        try:
            gpus = backend.sample()
        except NvmlQueryError as e:
            query_error = str(e)
        except Exception as e:  # noqa: BLE001 - a scrape must not fail; the verdict carries the error
            query_error = f"{type(e).__name__}: {e}"
    host = sample_host(directories, cpu_interval_s=cpu_interval_s)
    xids = xid_watcher.counts() if xid_watcher is not None else {}
    v, reason = verdict(gpus, host, xids, thresholds, nvml_error=query_error)
    return NodeHealth(
        nvml_up=gpus is not None,
        nvml_error=None if gpus is not None else (query_error or unavailable_reason),
        gpus=tuple(gpus or ()),
        host=host,
        xid_counts=xids,
        verdict=v,
        reason=reason,
    )


async def assess_async(
    backend: Any,
    directories: Iterable[str | os.PathLike[str]] = (),
    xid_watcher: XidWatcher | None = None,
    thresholds: HealthThresholds = HealthThresholds(),
) -> NodeHealth:
    """:func:`assess` in a worker thread, for the agent's event loop (NVML and statvfs block)."""
    return await asyncio.to_thread(assess, backend, tuple(directories), xid_watcher, thresholds)


async def sample_async(backend: NvmlBackend) -> list[GpuSample]:
    """:meth:`NvmlBackend.sample` in a worker thread, for the agent's event loop."""
    return await asyncio.to_thread(backend.sample)
