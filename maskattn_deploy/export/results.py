"""What an export wrote: one :class:`ComponentResult` per component, the :class:`ExportResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.export.folder import ComponentEntry, ExportManifest
from maskattn_deploy.export.validate import OutputCheck


@dataclass
class ComponentResult:
    """One written component and its validation."""

    name: str
    path: str  # relative to the export folder
    size_bytes: int
    external_data: bool
    precision: str
    opset: int
    seconds: float
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    gated_layers: list[str] = field(default_factory=list)
    checks: list[OutputCheck] = field(default_factory=list)
    fp16_fallback_ops: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    def manifest_entry(self) -> ComponentEntry:
        return ComponentEntry(
            path=self.path,
            inputs=self.inputs,
            outputs=self.outputs,
            external_data=self.external_data,
            precision=self.precision,
            size_bytes=self.size_bytes,
            gated_layers=self.gated_layers if self.name == "unet" else None,
        )

    def validation_entry(self) -> dict[str, Any]:
        return {
            "checks": [c.as_dict() for c in self.checks],
            "ort_cpu_fp32_fallback_ops": self.fp16_fallback_ops,
        }

    def row(self) -> dict[str, Any]:
        return {
            "component": self.name,
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "precision": self.precision,
            "max_diff": self.max_diff,
            "seconds": round(self.seconds, 1),
            "external_data": self.external_data,
        }


@dataclass
class ExportResult:
    """What :func:`~maskattn_deploy.export.pipeline.export_pipeline` wrote."""

    out: Path
    manifest: ExportManifest
    components: list[ComponentResult]
    seconds: float

    def rows(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.components]

    def table(self) -> str:
        """The summary table printed by the CLI."""
        header = f"{'component':<16}{'size':>10}  {'opset':>5}  {'precision':<9}  {'max diff':>9}"
        lines = [header, "-" * len(header)]
        for c in self.components:
            diff = f"{c.max_diff:.1e}" if c.max_diff is not None else "skipped"
            ext = " (+ext)" if c.external_data else ""
            lines.append(
                f"{c.name:<16}{human_size(c.size_bytes):>10}  {c.opset:>5}  {c.precision:<9}  "
                f"{diff:>9}{ext}"
            )
        return "\n".join(lines)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"
