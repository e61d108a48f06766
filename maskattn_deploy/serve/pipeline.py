"""Build the served pipeline from a :class:`~maskattn_deploy.serve.repository.ServeConfig`.

Used by the Triton model at load time. Backends:

- ``onnxruntime``: the export folder's ONNX files; the UNet session also exposes the gate
  logits (:mod:`maskattn_deploy.runtime.ort_gates`) so every response carries exact per-layer
  open-gate fractions;
- ``torch``: the diffusers model with its gate checkpoint (the reference; fractions recorded by
  the GateSet);
- ``tensorrt``: TensorRT plans served by the same Triton server and called through BLS when
  the repository has them (``component_models``), else the engines in this process. Engines
  only return what the pipeline needs, so responses carry no open-gate fractions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.runtime.pipeline import Pipeline
from maskattn_deploy.serve.repository import ServeConfig

log = logging.getLogger(__name__)

DEFAULT_STEPS = {"tiny": 8, "other": 30}


def serving_pipeline(
    config: ServeConfig, export_dir: str | None, threads: int, device_id: str = "0"
) -> Pipeline:
    """The pipeline with ``gate_stats`` (can it record gates?) and ``default_steps`` set."""
    torch.set_num_threads(threads)
    if config.component_models and export_dir is not None:
        pipeline, gated = _bls(config, Path(export_dir)), False
    elif config.backend == "torch":
        pipeline, gated = _torch(config, export_dir, device_id)
    elif export_dir is None:
        raise UserError(f"the {config.backend} backend needs an export folder")
    elif config.backend == "onnxruntime":
        pipeline, gated = _onnxruntime(config, Path(export_dir), threads)
    elif config.backend == "tensorrt":
        pipeline, gated = _tensorrt(config, Path(export_dir)), False
    else:
        raise UserError(
            f"unknown backend {config.backend!r}; choose onnxruntime, torch or tensorrt"
        )
    pipeline.gate_stats = gated  # type: ignore[attr-defined]
    kind = "tiny" if pipeline.info.model_spec == "tiny" else "other"
    pipeline.default_steps = config.default_steps or DEFAULT_STEPS[kind]  # type: ignore[attr-defined]
    return pipeline


def _onnxruntime(config: ServeConfig, export_dir: Path, threads: int) -> tuple[Pipeline, bool]:
    from maskattn_deploy.runtime.model_info import ModelInfo
    from maskattn_deploy.runtime.ort_backend import ort_backend

    info = ModelInfo.from_export(export_dir)
    gated = bool(info.gates_sha256)
    backend = ort_backend(
        export_dir, info.export_manifest, config.ort_provider, threads=threads, gate_outputs=gated
    )
    return Pipeline(backend.activate(), info), gated


def _torch(config: ServeConfig, export_dir: str | None, device_id: str) -> tuple[Pipeline, bool]:
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.models.choice import ModelChoice
    from maskattn_deploy.runtime.api import TINY, torch_device, torch_pipeline

    model = config.model
    if model is None and export_dir:
        model = ExportFolder.open(export_dir).manifest.model.spec
    model = model or TINY
    choice = ModelChoice(model, Path(config.gates) if config.gates else None, config.no_gates)
    gates = choice.gate_checkpoint()
    requested = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        requested = f"cuda:{device_id}"
    pipeline = torch_pipeline(model, gates, torch_device(requested))
    return pipeline, gates is not None


def _bls(config: ServeConfig, export_dir: Path) -> Pipeline:
    """Networks served by other models of the same server (TensorRT plans, split ONNX)."""
    from maskattn_deploy.runtime.model_info import ModelInfo
    from maskattn_deploy.serve.bls import bls_backend

    info = ModelInfo.from_export(export_dir)
    manifest = info.export_manifest
    backend = bls_backend(config.component_models, manifest, export_dir, config.backend)
    return Pipeline(backend, info)


def _tensorrt(config: ServeConfig, export_dir: Path) -> Pipeline:
    from maskattn_deploy.runtime.model_info import ModelInfo

    info = ModelInfo.from_export(export_dir)
    from maskattn_deploy.runtime.trt_backend import trt_backend

    return Pipeline(trt_backend(export_dir, info.export_manifest), info)
