"""The outcome of a parity run: verdicts, gate agreement, localisation, skipped backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maskattn_deploy.parity.compare import FAIL, PASS, SKIP, ImageVerdict, OutputVerdict
from maskattn_deploy.parity.gates import LayerGateAgreement


@dataclass
class BackendStatus:
    """Whether a requested backend ran, was the reference, or was skipped (and why)."""

    name: str
    status: str  # "ran" | "reference" | "skipped"
    reason: str = ""
    detail: dict[str, str] = field(default_factory=dict)  # component -> runner description

    def __str__(self) -> str:
        if self.status == "skipped":
            return f"{SKIP:<7} backend {self.name}: {self.reason}"
        what = "reference" if self.status == "reference" else "compared with the reference"
        return f"{'':<7} backend {self.name}: {what}{f' ({self.reason})' if self.reason else ''}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, **self.detail}


@dataclass
class Localisation:
    """Per-layer attention probabilities of one backend, walked in execution order."""

    backend: str
    label: str
    layers: list[OutputVerdict] = field(default_factory=list)
    note: str = ""

    @property
    def first_bad_layer(self) -> str | None:
        for verdict in self.layers:
            if not verdict.passed:
                return verdict.output
        return None

    def __str__(self) -> str:
        if self.note:
            return f"{SKIP:<7} localisation [{self.backend}]: {self.note}"
        first = self.first_bad_layer
        if first is None:
            return (
                f"{PASS:<7} localisation [{self.backend} {self.label}]: all "
                f"{len(self.layers)} gated layers within tolerance"
            )
        return (
            f"{FAIL:<7} localisation [{self.backend} {self.label}]: first layer beyond "
            f"tolerance is {first}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.label,
            "first_bad_layer": self.first_bad_layer,
            "note": self.note,
            "layers": [v.as_dict() for v in self.layers],
        }


@dataclass
class ParityResult:
    """Everything one ``maskattn-deploy parity`` run found."""

    export_dir: str
    precision: str
    reference: str  # e.g. "torch fp32 on cpu"
    cases: list[str]
    components: list[str]
    backends: list[BackendStatus] = field(default_factory=list)
    outputs: list[OutputVerdict] = field(default_factory=list)
    gates: list[LayerGateAgreement] = field(default_factory=list)
    gates_note: str = ""
    localisation: list[Localisation] = field(default_factory=list)
    images: list[ImageVerdict] = field(default_factory=list)
    images_note: str = ""
    errors: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def compared(self) -> list[str]:
        return [b.name for b in self.backends if b.status == "ran"]

    @property
    def failures(self) -> list[str]:
        """One line per failed check (empty when parity passed)."""
        lines = [f"{v.name} [{v.backend} {v.label}]" for v in self.outputs if not v]
        lines += [f"gates {g.layer} [{g.backend} {g.label}]" for g in self.gates if not g]
        lines += [
            f"localisation [{loc.backend}]: {loc.first_bad_layer}"
            for loc in self.localisation
            if loc.first_bad_layer
        ]
        lines += [f"image [{v.backend}]" for v in self.images if not v]
        lines += self.errors
        return lines

    @property
    def passed(self) -> bool:
        """True when every compared check passed and at least one backend was compared."""
        return bool(self.compared) and not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        skipped = [b.name for b in self.backends if b.status == "skipped"]
        skip = f"; skipped: {', '.join(skipped)}" if skipped else ""
        if not self.compared:
            return f"{FAIL}: no backend was compared with the reference{skip}"
        if self.passed:
            checks = len(self.outputs) + len(self.gates) + len(self.images)
            return (
                f"{PASS}: {', '.join(self.compared)} match {self.reference} ({checks} checks{skip})"
            )
        return f"{FAIL}: {len(self.failures)} check(s) failed: {'; '.join(self.failures[:5])}{skip}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "export_dir": self.export_dir,
            "precision": self.precision,
            "reference": self.reference,
            "cases": self.cases,
            "components": self.components,
            "backends": [b.as_dict() for b in self.backends],
            "outputs": [v.as_dict() for v in self.outputs],
            "gates": [g.as_dict() for g in self.gates],
            "gates_note": self.gates_note,
            "localisation": [loc.as_dict() for loc in self.localisation],
            "images": [v.as_dict() for v in self.images],
            "images_note": self.images_note,
            "errors": self.errors,
            "failures": self.failures,
            "settings": self.settings,
            "wall_s": self.wall_s,
        }
