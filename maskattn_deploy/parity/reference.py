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
from maskattn_deploy.parity.capture import Capture, capture_gated_layers

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """A loaded fp32 torch pipeline with the export's gates installed."""

    export_dir: Path
    manifest: dict[str, Any]
    pipe: Any
    gates: Any  # GateSet or None for an ungated export
    gates_path: Path | None
    model_spec: str
    device: torch.device
    _backend: Any = field(default=None, repr=False)

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

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


def gates_path_of(export_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """Where the export's gates live: the path the manifest records, or ``EXPORT_DIR/gates``."""
    gates = manifest.get("gates")
    if not gates:
        return None
    candidates: list[Path] = []
    if isinstance(gates, dict):
        for key in ("checkpoint", "path", "dir"):
            if gates.get(key):
                path = Path(gates[key])
                candidates.append(path if path.is_absolute() else export_dir / path)
    candidates.append(export_dir / "gates")
    for path in candidates:
        if path.exists():
            return path
    raise UserError(
        f"{export_dir} was exported with gates, but they are not in the export folder or at "
        "the recorded path; pass the same checkpoint with --gates"
    )


def model_of(manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    """(model spec, UNet fingerprint) recorded in a manifest (``model`` or ``source`` entry)."""
    model = manifest.get("model") or {}
    source = manifest.get("source") or {}
    spec = model.get("spec") or source.get("model")
    fingerprint = model.get("unet_fingerprint") or source.get("unet_fingerprint")
    return (str(spec) if spec else None), fingerprint


def load_reference(
    export_dir: Path,
    model: str | None = None,
    gates: Path | None = None,
    device: str | None = None,
) -> Reference:
    """Load the fp32 torch model and gates that ``export_dir`` was made from, and check them."""
    from maskattn_deploy.models import load_pipeline, unet_fingerprint
    from maskattn_deploy.runtime.model_info import read_manifest

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    recorded_spec, fingerprint = model_of(manifest)
    spec = model or recorded_spec
    if not spec:
        raise UserError(f"{export_dir}/manifest.json records no model; pass --model")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(str(spec), torch_dtype=torch.float32, device=dev)
    if fingerprint and fingerprint != unet_fingerprint(pipe.unet):
        raise UserError(
            f"model {spec} (UNet {unet_fingerprint(pipe.unet)}) is not the model of {export_dir} "
            f"(UNet {fingerprint}); pass the exported model with --model"
        )
    gates_path = gates if gates is not None else gates_path_of(export_dir, manifest)
    installed = _install(pipe, gates_path)
    _check_gates_hash(manifest, installed, export_dir)
    return Reference(export_dir, manifest, pipe, installed, gates_path, str(spec), dev)


def _check_gates_hash(manifest: dict[str, Any], gates: Any, export_dir: Path) -> None:
    from maskattn_deploy.runtime.model_info import gates_sha256_of

    expected = gates_sha256_of(manifest)
    got = getattr(gates, "checkpoint_sha256", None) if gates is not None else None
    if expected and got and expected != got:
        raise UserError(
            f"the gates given (sha256 {got[:12]}) are not the gates exported to {export_dir} "
            f"(sha256 {expected[:12]}); pass the exported checkpoint with --gates"
        )
    if expected and gates is None:
        raise UserError(f"{export_dir} was exported with gates; pass them with --gates")
