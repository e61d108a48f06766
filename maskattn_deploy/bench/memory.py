"""Peak memory: process resident set (host) and CUDA (device), resettable per measurement.

Host: Linux keeps the peak resident set in ``/proc/self/status`` (``VmHWM``) and resets it
when ``5`` is written to ``/proc/self/clear_refs``, so each backend gets its own peak. Where
that is not possible the lifetime peak from ``getrusage`` is reported and marked as such.
Device: torch's allocator peak for torch work, plus the driver's view of used memory (which
also sees ONNX Runtime's and TensorRT's allocations).
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class MemoryPeak:
    """Peaks observed during one measured block (bytes; None where not measurable)."""

    rss_peak: int | None
    rss_scope: str  # "block" (reset before it) or "process" (lifetime peak)
    cuda_allocated_peak: int | None = None
    cuda_device_used: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rss_peak_mib": _mib(self.rss_peak),
            "rss_scope": self.rss_scope,
            "cuda_allocated_peak_mib": _mib(self.cuda_allocated_peak),
            "cuda_device_used_mib": _mib(self.cuda_device_used),
        }

    def short(self) -> str:
        parts = [
            f"RSS {_mib(self.rss_peak) or '?'} MiB" + ("" if self.rss_scope == "block" else "*")
        ]
        if self.cuda_allocated_peak is not None:
            parts.append(f"CUDA {_mib(self.cuda_allocated_peak)} MiB")
        if self.cuda_device_used is not None:
            parts.append(f"device {_mib(self.cuda_device_used)} MiB")
        return ", ".join(parts)


def _mib(value: int | None) -> int | None:
    return None if value is None else round(value / 2**20)


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class PeakMemory:
    """Context manager: ``with PeakMemory() as peak: ...`` then ``peak.result``."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.scope = "process"
        self.result: MemoryPeak | None = None

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR_REFS.write_text("5")
            self.scope = "block" if _vm_hwm() is not None else "process"
        except OSError:
            self.scope = "process"
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        rss = _vm_hwm() if self.scope == "block" else _lifetime_peak()
        self.result = MemoryPeak(rss, self.scope)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            self.result.cuda_allocated_peak = int(torch.cuda.max_memory_allocated())
            self.result.cuda_device_used = int(total - free)
