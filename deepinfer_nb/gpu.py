"""The NVML probe: what GPUs this machine has and how busy they are, via nvidia-ml-py (`pynvml`);
and which engine each GPU process belongs to.

`probe()` returns `(devices, reason)`. On a machine without the NVIDIA driver (or without
nvidia-ml-py) it returns `([], reason)` and never raises: such a node is a CPU node. Each field
that NVML cannot read on a device (NotSupported on many consumer cards and in containers) is
`None` on its own; the rest of the device is still reported.

NVML lists the pids that hold memory on a GPU: vLLM's EngineCore or its TP workers, children of
the shim the worker launched, never the shim itself. `process_owners` maps every pid in each
engine's process tree (psutil) to that engine, and `join_processes` names the owner of each GPU
process; a pid in no engine's tree stays unnamed (another user's job, or an engine of a
previous worker that was not re-adopted). NVML reports host pids: inside a container with its
own pid namespace they match no tree here, and every process then shows as unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psutil

from .models import GpuInfo, GpuProcess

log = logging.getLogger(__name__)

T = TypeVar("T")


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def probe(*, nvml: Any = None) -> tuple[list[GpuInfo], str]:
    """Every visible NVIDIA GPU, or `([], why there are none)`. Never raises.

    `nvml` replaces the `pynvml` module (tests pass a fake one).
    """
    lib = nvml if nvml is not None else _load_nvml()
    if lib is None:
        return [], "nvidia-ml-py is not installed"
    try:
        lib.nvmlInit()
    except lib.NVMLError as exc:
        return [], f"no NVIDIA driver: {_describe(exc)}"
    try:
        return _devices(lib)
    finally:
        try:
            lib.nvmlShutdown()
        except lib.NVMLError as exc:  # the probe's answer stands; shutdown is housekeeping
            log.debug("nvmlShutdown failed: %s", _describe(exc))


def _devices(lib: Any) -> tuple[list[GpuInfo], str]:
    try:
        count = int(lib.nvmlDeviceGetCount())
    except lib.NVMLError as exc:
        return [], f"NVML cannot count devices: {_describe(exc)}"
    devices: list[GpuInfo] = []
    problems: list[str] = []
    for index in range(count):
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
        except lib.NVMLError as exc:
            # One broken device (e.g. "GPU is lost") must not hide the healthy ones.
            problems.append(f"GPU {index}: {_describe(exc)}")
            continue
        devices.append(_device(lib, index, handle))
    reason = "; ".join(problems)
    if not devices and not reason:
        reason = "the NVIDIA driver reports no GPUs"
    return devices, reason


def _device(lib: Any, index: int, handle: Any) -> GpuInfo:
    def read(fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except lib.NVMLError as exc:
            log.debug("GPU %d: NVML field not available: %s", index, _describe(exc))
            return None

    memory = read(lambda: lib.nvmlDeviceGetMemoryInfo(handle))
    util = read(lambda: lib.nvmlDeviceGetUtilizationRates(handle))
    temperature = read(lambda: lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU))
    power_mw = read(lambda: lib.nvmlDeviceGetPowerUsage(handle))
    limit_mw = read(lambda: lib.nvmlDeviceGetEnforcedPowerLimit(handle))
    procs = read(lambda: lib.nvmlDeviceGetComputeRunningProcesses(handle)) or []
    return GpuInfo(
        index=index,
        uuid=_text(read(lambda: lib.nvmlDeviceGetUUID(handle))),
        name=_text(read(lambda: lib.nvmlDeviceGetName(handle))),
        memory_total=int(memory.total) if memory is not None else 0,
        memory_used=int(memory.used) if memory is not None else None,
        memory_free=int(memory.free) if memory is not None else None,
        utilization=float(util.gpu) if util is not None else None,
        temperature=float(temperature) if temperature is not None else None,
        power_draw=power_mw / 1000.0 if power_mw is not None else None,
        power_limit=limit_mw / 1000.0 if limit_mw is not None else None,
        processes=[GpuProcess(pid=int(p.pid), used_memory=_process_memory(p)) for p in procs],
    )


def _process_memory(proc: Any) -> int | None:
    # NVML reports "not available" (e.g. under WDDM or without permission) as None.
    used = getattr(proc, "usedGpuMemory", None)
    return int(used) if used is not None else None


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


Owner = tuple[str, str]
"""(engine id, deployment) of a process tree."""


def process_owners(roots: Mapping[int, Owner]) -> dict[int, Owner]:
    """Every live pid in each root's process tree (the root and all its descendants) -> the
    root's owner. Roots that are gone are skipped."""
    owners: dict[int, Owner] = {}
    for pid, owner in roots.items():
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:  # exited between the list and the walk
            continue
        for proc in tree:
            owners[proc.pid] = owner
    return owners


def join_processes(devices: list[GpuInfo], owners: Mapping[int, Owner]) -> list[GpuInfo]:
    """`devices` with each GPU process's engine and deployment named from `owners`."""
    joined = []
    for device in devices:
        processes = []
        for p in device.processes:
            engine, deployment = owners.get(p.pid, ("", ""))
            processes.append(p.model_copy(update={"engine": engine, "deployment": deployment}))
        joined.append(device.model_copy(update={"processes": processes}))
    return joined
