"""The NVML probe: the real NVML of this machine (its no-driver path in CI, its GPUs on a GPU host),
and per-field N/A with a fake NVML."""

from __future__ import annotations

import types
from typing import Any

import pynvml
import pytest

from deepinfer_nb import gpu

GIB = 1024**3


def test_probe_reports_this_machine_without_raising() -> None:
    # Whatever this machine has: without an NVIDIA driver (CI) the real pynvml cannot load
    # libnvidia-ml and the probe says why; with one (a GPU host) every GPU is read.
    devices, reason = gpu.probe()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert devices == []
        assert reason.startswith("no NVIDIA driver")
        return
    try:  # pragma: no cover - only on a GPU host
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    assert (len(devices), reason) == (count, "")
    for index, device in enumerate(devices):
        assert device.index == index
        assert device.uuid.startswith("GPU-") and device.name
        assert device.memory_total > 0 and device.memory_used is not None
        assert 0 <= device.memory_used <= device.memory_total
        assert device.utilization is not None and 0 <= device.utilization <= 100


class FakeNvml:
    """The slice of pynvml the probe uses, with per-device, per-call failures."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, devices: list[dict[str, Any]], *, init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.shutdowns = 0

    def _get(self, handle: int, field: str) -> Any:
        value = self.devices[handle][field]
        if isinstance(value, pynvml.NVMLError):
            raise value
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.devices[index].get("lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return self._get(h, "memory")

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return self._get(h, "util")

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> Any:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._get(h, "temperature")

    def nvmlDeviceGetPowerUsage(self, h: int) -> Any:
        return self._get(h, "power")

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> Any:
        return self._get(h, "limit")

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> Any:
        return self._get(h, "procs")

    def nvmlDeviceGetUUID(self, h: int) -> Any:
        return self._get(h, "uuid")

    def nvmlDeviceGetName(self, h: int) -> Any:
        return self._get(h, "name")


NOT_SUPPORTED = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def full_device(**overrides: Any) -> dict[str, Any]:
    device: dict[str, Any] = {
        "memory": types.SimpleNamespace(total=80 * GIB, used=10 * GIB, free=70 * GIB),
        "util": types.SimpleNamespace(gpu=37, memory=5),
        "temperature": 61,
        "power": 250_500,
        "limit": 700_000,
        "procs": [
            types.SimpleNamespace(pid=42, usedGpuMemory=9 * GIB),
            types.SimpleNamespace(pid=43, usedGpuMemory=None),
        ],
        "uuid": "GPU-1234",
        "name": b"NVIDIA H100 80GB HBM3",
    }
    device.update(overrides)
    return device


def test_full_device_is_read_in_bytes_percent_celsius_watts() -> None:
    fake = FakeNvml([full_device()])
    devices, reason = gpu.probe(nvml=fake)
    assert reason == ""
    (d,) = devices
    assert (d.index, d.uuid, d.name) == (0, "GPU-1234", "NVIDIA H100 80GB HBM3")
    assert (d.memory_total, d.memory_used, d.memory_free) == (80 * GIB, 10 * GIB, 70 * GIB)
    assert (d.utilization, d.temperature) == (37.0, 61.0)
    assert (d.power_draw, d.power_limit) == (250.5, 700.0)
    assert [(p.pid, p.used_memory) for p in d.processes] == [(42, 9 * GIB), (43, None)]
    assert fake.shutdowns == 1


@pytest.mark.parametrize(
    ("field", "attr", "kept"),
    [
        ("util", "utilization", "temperature"),
        ("temperature", "temperature", "utilization"),
        ("power", "power_draw", "power_limit"),
        ("limit", "power_limit", "power_draw"),
        ("memory", "memory_free", "utilization"),
    ],
)
def test_each_unsupported_field_is_none_on_its_own(field: str, attr: str, kept: str) -> None:
    devices, reason = gpu.probe(nvml=FakeNvml([full_device(**{field: NOT_SUPPORTED})]))
    (d,) = devices
    assert getattr(d, attr) is None
    assert getattr(d, kept) is not None
    assert d.uuid == "GPU-1234" and reason == ""


def test_unsupported_process_list_reads_as_empty() -> None:
    devices, _ = gpu.probe(nvml=FakeNvml([full_device(procs=NOT_SUPPORTED)]))
    assert devices[0].processes == []
    assert devices[0].memory_total == 80 * GIB


def test_a_lost_gpu_is_reported_and_the_others_kept() -> None:
    fake = FakeNvml([full_device(lost=True), full_device(uuid="GPU-2")])
    devices, reason = gpu.probe(nvml=fake)
    assert [d.index for d in devices] == [1]
    assert reason.startswith("GPU 0:")


def test_init_failure_and_zero_devices_give_reasons() -> None:
    devices, reason = gpu.probe(nvml=FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert devices == [] and reason.startswith("no NVIDIA driver: ")
    devices, reason = gpu.probe(nvml=FakeNvml([]))
    assert devices == [] and "no GPUs" in reason
