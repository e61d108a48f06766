"""The PyTorch reference for an export folder: the same model and gates, fp32, eager.

The model spec and the gates come from the export's ``manifest.json`` (overridable for
models that live elsewhere on this machine); the UNet fingerprint and the gate hash recorded
at export time are checked, so parity can never compare an export with a different model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import BackendUnavailableError, UserError
from maskattn_deploy.export.folder import ExportManifest
from maskattn_deploy.parity.capture import Capture, capture_gated_layers

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """A loaded fp32 torch pipeline with the export's gates installed."""

    export_dir: Path
    manifest: ExportManifest
    pipe: Any
    gates: Any  # GateSet or None for an ungated export
    gates_path: Path | None
    model_spec: str
    device: torch.device
    _backend: Any = field(default=None, repr=False)

    @property
    def precision(self) -> str:
        return self.manifest.precision

    def describe(self) -> str:
        return f"torch fp32 on {self.device.type}"

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from maskattn_deploy.runtime.torch_backend import torch_backend

            self._backend = torch_backend(self.pipe, self.device, torch.float32)
        return self._backend

    def run(
        self, component: str, feed: dict[str, Any], capture: bool = False
    ) -> tuple[dict[str, torch.Tensor], Capture | None]:
        """Reference outputs (CPU fp32) and, for the UNet, the per-layer gate record."""
        if capture and self.gates is not None:
            with capture_gated_layers(self.pipe.unet, self.gates) as record:
                out = self.backend.run(component, feed)
        else:
            record, out = None, self.backend.run(component, feed)
        return {k: v.detach().float().cpu() for k, v in out.items()}, record

    def torch_at_precision(self) -> Any:
        """The torch backend at the export's precision, or None when that is the reference."""
        if self.precision == "fp32":
            return None
        if self.device.type != "cuda":
            raise BackendUnavailableError(
                f"torch {self.precision} is only compared on a CUDA GPU (the CPU is not a "
                "deployment target for half precision); the fp32 torch reference still ran"
            )
        from maskattn_deploy.models import load_pipeline
        from maskattn_deploy.runtime.torch_backend import torch_backend

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        pipe = load_pipeline(self.model_spec, torch_dtype=dtype, device=self.device)
        _install(pipe, self.gates_path)
        return torch_backend(pipe, self.device, dtype)

    def generate(self, config: Any) -> list[Any]:
        """Images of the reference pipeline for ``config`` (a runtime GenerateConfig)."""
        from maskattn_deploy.runtime.model_info import ModelInfo
        from maskattn_deploy.runtime.pipeline import Pipeline

        info = ModelInfo.from_pipe(self.pipe, self.model_spec, None)
        return Pipeline(self.backend, info).generate(config, progress=False).images

    def generate_on(self, backend: Any, config: Any) -> list[Any]:
        """Images of ``backend`` for ``config`` with the export's tokenizers and scheduler."""
        from maskattn_deploy.runtime.model_info import ModelInfo
        from maskattn_deploy.runtime.pipeline import Pipeline

        if backend.name == "torch":
            info = ModelInfo.from_pipe(backend.pipe, self.model_spec, None)
        else:
            info = ModelInfo.from_export(self.export_dir)
        return Pipeline(backend, info).generate(config, progress=False).images


def _install(pipe: Any, gates_path: Path | None) -> Any:
    if gates_path is None:
        return None
    from maskattn_deploy.gating.checkpoint import load_gates

    return load_gates(gates_path, pipe.unet)


def load_reference(
    export_dir: Path,
    model: str | None = None,
    gates: Path | None = None,
    device: str | None = None,
) -> Reference:
    """Load the fp32 torch model and gates that ``export_dir`` was made from, and check them."""
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.models import load_pipeline, unet_fingerprint

    folder = ExportFolder.open(export_dir)
    manifest = folder.manifest
    spec = model or manifest.model.spec
    if not spec:
        raise UserError(
            f"{export_dir}/manifest.json does not say what was exported; pass model",
            params=("model",),
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(str(spec), torch_dtype=torch.float32, device=dev)
    fingerprint = manifest.model.unet_fingerprint
    if fingerprint and fingerprint != unet_fingerprint(pipe.unet):
        raise UserError(
            f"{spec} (UNet {unet_fingerprint(pipe.unet)}) is not what {export_dir} was exported "
            f"from (UNet {fingerprint}); pass that one as model",
            params=("model",),
        )
    gates_path = gates if gates is not None else folder.find_gates(model=str(spec))
    if manifest.gates_sha256 and gates_path is None:
        raise UserError(
            f"{export_dir} was exported with a gate checkpoint that is not in the export folder "
            "or at the recorded path; pass the same checkpoint as gates",
            params=("gates",),
        )
    installed = _install(pipe, gates_path)
    _check_gates_hash(manifest.gates_sha256, installed, export_dir)
    return Reference(export_dir, manifest, pipe, installed, gates_path, str(spec), dev)


def _check_gates_hash(expected: str | None, gates: Any, export_dir: Path) -> None:
    got = getattr(gates, "checkpoint_sha256", None) if gates is not None else None
    if expected and got and expected != got:
        raise UserError(
            f"the checkpoint given as gates (sha256 {got[:12]}) is not the one exported to "
            f"{export_dir} (sha256 {expected[:12]}); pass the exported checkpoint",
            params=("gates",),
        )
