"""What ``maskattn-deploy bench`` measured: per backend and shape case, the UNet step (masked
and unmasked), the end-to-end pipeline, memory peaks, and the targets checked against them.

Each type's ``as_dict`` is the JSON that ``bench --json`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maskattn_deploy.bench.memory import MemoryPeak
from maskattn_deploy.bench.timing import Stats


@dataclass
class UnetBench:
    """UNet step latency of one backend on one shape case."""

    backend: str
    case: str
    masked: Stats
    unmasked: Stats | None = None
    ratio: float | None = None  # masked / unmasked, median of interleaved pairs
    cpu_ratio: float | None = None  # the same in process CPU time (shared-CPU robust)
    runner: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case,
            "runner": self.runner,
            "masked": self.masked.as_dict(),
            "unmasked": self.unmasked.as_dict() if self.unmasked else None,
            "masked_over_unmasked": self.ratio,
            "masked_over_unmasked_cpu_time": self.cpu_ratio,
            "note": self.note,
        }


@dataclass
class PipelineBench:
    """End-to-end latency of one backend (masked model, CFG)."""

    backend: str
    case: str
    steps: int
    images: int
    total: Stats
    text_encoders_ms: float
    unet_step_ms: float
    vae_ms: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.total.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case,
            "steps": self.steps,
            "images": self.images,
            "total": self.total.as_dict(),
            "images_per_s": self.images_per_s,
            "text_encoders_ms": self.text_encoders_ms,
            "unet_step_ms": self.unet_step_ms,
            "vae_ms": self.vae_ms,
        }


@dataclass
class TargetCheck:
    """One performance target and whether this run met it."""

    name: str
    value: float
    limit: float
    scope: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "met": self.met,
            "scope": self.scope,
        }


@dataclass
class BenchResult:
    """Everything one bench run measured."""

    machine: str
    settings: dict[str, Any]
    backends: dict[str, str] = field(default_factory=dict)  # name -> "ran: ..." / "skipped: why"
    unet: list[UnetBench] = field(default_factory=list)
    pipeline: list[PipelineBench] = field(default_factory=list)
    memory: dict[str, MemoryPeak] = field(default_factory=dict)
    targets: list[TargetCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "backends": self.backends,
            "unet": [u.as_dict() for u in self.unet],
            "pipeline": [p.as_dict() for p in self.pipeline],
            "memory": {k: m.as_dict() for k, m in self.memory.items()},
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
            "wall_s": self.wall_s,
        }
