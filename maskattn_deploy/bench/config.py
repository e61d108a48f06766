"""What ``maskattn-deploy bench`` measures: the settings (:class:`BenchConfig`, built by the CLI
from flags) and what they resolve to before any backend runs (:class:`BenchSetup`: the model,
gates, precision, device and shape cases, defaults taken from the export folder when given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from maskattn_deploy.checks import check_int
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportFolder, ExportManifest
from maskattn_deploy.parity.inputs import ShapeCase, default_case

Say = Callable[[str], None]
TINY = "tiny"
# Full-size SDXL UNet with random weights built on the GPU (no download): UNet step only.
SDXL_RANDOM = "sdxl-random"
DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")


@dataclass
class BenchConfig:
    """What to measure (the CLI builds it from flags)."""

    export_dir: Path | None = None
    unmasked_export_dir: Path | None = None
    model: str | None = None  # default: the export's model, else tiny
    gates: Path | None = None  # default: the export's gates, else tiny's seeded gates
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    shapes: list[ShapeCase] | None = None
    precision: str | None = None  # default: the export's, else fp16 on CUDA / fp32 on CPU
    repeats: int = 10
    warmup: int = 2
    steps: int = 4  # end-to-end denoising steps
    e2e_repeats: int = 3
    end_to_end: bool = True
    unmasked: bool = True
    export_unmasked: bool = True  # may export the plain UNet into the cache when none is given
    threads: int | None = None
    device: str | None = None
    ort_provider: str = "auto"
    prompt: str = "a red circle left of a blue square"
    seed: int = 0

    def __post_init__(self) -> None:
        from maskattn_deploy.parity.inputs import check_shape_cases
        from maskattn_deploy.runtime.limits import MAX_SEED, MAX_STEPS

        check_int("repeats", self.repeats, 1, 100_000)
        check_int("warmup", self.warmup, 0, 10_000)
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("e2e_repeats", self.e2e_repeats, 1, 10_000)
        if self.threads is not None:
            check_int("threads", self.threads, 1, 1024)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_shape_cases(self.shapes)


@dataclass
class BenchSetup:
    """The settings resolved against the export folder and this machine."""

    model: str
    gates: Path | None
    precision: str
    device: torch.device
    export_dir: Path | None
    manifest: ExportManifest | None
    cases: list[ShapeCase]
    gates_error: str = ""  # why the torch backend has no gates (exports carry their own)


def resolve_setup(config: BenchConfig) -> BenchSetup:
    """Defaults from the export folder (model, precision, gates, shape case), else the tiny
    model's; a precision other than fp32/fp16 or unreadable gates are refused here."""
    folder = ExportFolder.open(config.export_dir) if config.export_dir is not None else None
    manifest = folder.manifest if folder is not None else None
    model = config.model or (manifest.model.spec if manifest else None) or TINY
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = (
        config.precision
        or (manifest.precision if manifest else None)
        or ("fp16" if device.type == "cuda" else "fp32")
    )
    if precision not in ("fp32", "fp16"):
        raise UserError(
            f"precision {precision} is not supported; choose fp32 or fp16", params=("precision",)
        )
    gates, gates_error = config.gates, ""
    if gates is not None:
        from maskattn_deploy.gating.checkpoint import read_checkpoint

        read_checkpoint(gates)  # a missing or malformed --gates is refused before any backend
    if gates is None and folder is not None and folder.manifest.gates_sha256:
        gates = folder.find_gates(model=model)
        if gates is None:
            gates_error = (
                f"{folder.path} was exported with gates, but they are not in the export folder "
                "or at the recorded path; pass the same checkpoint with --gates"
            )
    if gates is None and model == TINY and manifest is None:
        from maskattn_deploy.models.tiny import tiny_default_gates_dir

        gates = tiny_default_gates_dir()
    if gates is None and not gates_error:
        gates_error = f"no gates for model {model}: pass --gates CKPT"
    if config.shapes and folder is not None:
        from maskattn_deploy.parity.inputs import check_cases_for_export

        check_cases_for_export(config.shapes, folder)
    cases = config.shapes or [default_case(manifest)]
    return BenchSetup(
        model, gates, precision, device, config.export_dir, manifest, cases, gates_error
    )
