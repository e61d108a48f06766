"""Is there a usable CUDA GPU, and is TensorRT installed? Answered without torch or TensorRT.

TensorRT must never be touched before a CUDA device is known to exist: ``trt.Builder`` fails
without one and the lean runtime's ``deserialize_cuda_engine`` segfaults (docs/design.md section 6.1).
The probe talks to the driver library directly through ctypes (``cuInit``,
``cuDeviceGetCount``), which costs milliseconds and needs no Python CUDA binding.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

from maskattn_deploy._lazy import available, install_hint
from maskattn_deploy.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

_DRIVER_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
# CUdevice_attribute values from cuda.h (stable since CUDA 4).
_ATTR_CC_MAJOR = 75
_ATTR_CC_MINOR = 76
TRT_INSTALL_HINT = install_hint("tensorrt")


@dataclass(frozen=True)
class CudaStatus:
    """Outcome of the driver probe: device count, first device, driver version or why not."""

    device_count: int
    name: str = ""
    compute_capability: tuple[int, int] = (0, 0)
    driver_version: tuple[int, int] = (0, 0)
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.device_count > 0

    @property
    def sm(self) -> int:
        """Compute capability as an integer: (9, 0) -> 90."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]


def _load_driver() -> ctypes.CDLL | None:
    for name in _DRIVER_LIBS:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def probe_cuda() -> CudaStatus:
    """Probe the CUDA driver once per process (cached): never raises."""
    lib = _load_driver()
    if lib is None:
        return CudaStatus(0, reason="no NVIDIA driver found (libcuda.so.1 is missing)")
    try:
        rc = lib.cuInit(0)
        if rc != 0:
            return CudaStatus(0, reason=f"the CUDA driver failed to initialise (cuInit error {rc})")
        count = ctypes.c_int(0)
        rc = lib.cuDeviceGetCount(ctypes.byref(count))
        if rc != 0 or count.value == 0:
            return CudaStatus(0, reason="no CUDA GPU visible (cuDeviceGetCount returned 0)")
        return _describe_device0(lib, count.value)
    except (OSError, AttributeError) as exc:  # a broken or foreign libcuda
        return CudaStatus(0, reason=f"the CUDA driver is unusable: {exc}")


def _describe_device0(lib: ctypes.CDLL, count: int) -> CudaStatus:
    device = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(device), 0)
    raw_name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(raw_name, 256, device)
    major, minor, version = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device)
    lib.cuDriverGetVersion(ctypes.byref(version))
    return CudaStatus(
        device_count=count,
        name=raw_name.value.decode(errors="replace"),
        compute_capability=(major.value, minor.value),
        driver_version=(version.value // 1000, (version.value % 1000) // 10),
    )


def cuda_available() -> bool:
    """True when the driver reports at least one CUDA device."""
    return probe_cuda().usable


def tensorrt_installed() -> bool:
    """True when the ``tensorrt`` package can be found (not imported)."""
    return available("tensorrt")


def missing_for_tensorrt() -> str | None:
    """Why TensorRT cannot run here (one sentence naming the fix), or None when it can."""
    cuda = probe_cuda()
    has_trt = tensorrt_installed()
    if not cuda.usable and not has_trt:
        return f"TensorRT is not installed and {cuda.reason}: {TRT_INSTALL_HINT}"
    if not cuda.usable:
        return (
            f"TensorRT is installed but {cuda.reason}: run this on a machine with an NVIDIA GPU "
            "and a working driver"
        )
    if not has_trt:
        return f"TensorRT is not installed: {TRT_INSTALL_HINT}"
    return None


def require_tensorrt_and_gpu() -> CudaStatus:
    """Raise :class:`BackendUnavailableError` (one clear line) unless a GPU and TensorRT are present."""
    reason = missing_for_tensorrt()
    if reason is not None:
        raise BackendUnavailableError(reason)
    return probe_cuda()
