"""Writing ``manifest.json``: what was exported, from what, and the file hashes.

The manifest is a :class:`~maskattn_deploy.export.folder.ExportManifest`;
:meth:`~maskattn_deploy.export.folder.ExportFolder.open` reads it back. This module builds its
entries from the exported pipeline (model facts, VAE facts, the gate checkpoint) and the
component results.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskattn_deploy.export.folder import ExportManifest, GatesEntry, ModelEntry
from maskattn_deploy.export.onnx_op import ATTENTION_NODES
from maskattn_deploy.export.spec import EXPORT_FORMAT, MANIFEST_NAME
from maskattn_deploy.ops.contract import (
    ONNX_DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from maskattn_deploy.utils import sha256_file, write_json_atomic

if TYPE_CHECKING:
    from maskattn_deploy.export.recipe import ExportRecipe
    from maskattn_deploy.export.results import ComponentResult

TOOL_PACKAGES = (
    "maskattn-deploy",
    "torch",
    "onnx",
    "onnxscript",
    "onnx-ir",
    "onnxruntime",
    "diffusers",
    "transformers",
)


@dataclass
class ExportSource:
    """What was exported: the manifest's ``model``, ``vae`` and ``gates`` entries."""

    model: ModelEntry
    vae: dict[str, Any] | None
    gates: GatesEntry | None


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shaped the export (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the manifest, by POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def file_sizes(folder: Path, files: Mapping[str, str]) -> dict[str, int]:
    """Size in bytes of each file of ``files`` (relative paths)."""
    return {name: (folder / name).stat().st_size for name in files}


def checkpoint_gates_entry(path: str | Path, ckpt: Any, gates: Any) -> GatesEntry:
    """The ``gates`` entry of a checkpoint read from ``path`` and installed as ``gates``."""
    return GatesEntry(
        path=str(Path(path).resolve()),
        sha256=ckpt.sha256 or sha256_file(path),
        format=ckpt.source,
        config=ckpt.config.to_dict(),
        threshold=GatesEntry.json_threshold(float(gates.threshold)),
        step=ckpt.step,
        metadata=ckpt.metadata,
        num_parameters=ckpt.num_parameters,
    )


def installed_gates_entry(gates: Any) -> GatesEntry | None:
    """The ``gates`` entry of gates a caller installed (no checkpoint path known)."""
    if gates is None:
        return None
    return GatesEntry(
        path=None,
        sha256=getattr(gates, "checkpoint_sha256", None),
        config=gates.config.to_dict(),
        threshold=GatesEntry.json_threshold(float(gates.threshold)),
        num_parameters=gates.num_parameters(),
        checkpoint=False,
    )


def pipeline_model_entry(model: Any, pipe: Any) -> ModelEntry:
    """The ``model`` entry of an exported pipeline (runtimes read these facts)."""
    from maskattn_deploy.models import unet_fingerprint

    config = getattr(pipe, "config", {}) or {}
    return ModelEntry(
        spec=model if isinstance(model, str) else None,
        pipeline_class=type(pipe).__name__,
        unet_fingerprint=unet_fingerprint(pipe.unet),
        force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", True)),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
    )


def vae_entry(pipe: Any) -> dict[str, Any]:
    cfg = pipe.vae.config
    return {
        "scaling_factor": float(cfg.scaling_factor),
        "latents_mean": getattr(cfg, "latents_mean", None),
        "latents_std": getattr(cfg, "latents_std", None),
        "force_upcast": bool(getattr(cfg, "force_upcast", False)),
    }


def build_manifest(
    folder: Path,
    source: ExportSource,
    recipe: ExportRecipe,
    precision: str,
    results: list[ComponentResult],
    validated: bool,
    attention_node: str = "softmax",
) -> ExportManifest:
    """The manifest of the files now in ``folder`` (``attention_node``: the custom node type
    of the gated layers, see :data:`~maskattn_deploy.export.onnx_op.ATTENTION_NODES`)."""
    unet = next((r for r in results if r.name == "unet"), None)
    return ExportManifest(
        format=EXPORT_FORMAT,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=source.model,
        vae=source.vae,
        gates=source.gates,
        opset=recipe.opset,
        precision=precision,
        recipe=recipe.as_dict(),
        shapes=recipe.shapes.as_dict(),
        components={r.name: r.manifest_entry() for r in results},
        gated_layers=list(unet.gated_layers) if unet is not None else [],
        plugin={
            "op_type": ATTENTION_NODES[attention_node],
            "attention_node": attention_node,
            "domain": ONNX_DOMAIN,
            "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION,
            "aot": 1,
        },
        tools=tool_versions(),
        validation={r.name: r.validation_entry() for r in results} if validated else None,
        files=(files := file_hashes(folder)),
        file_sizes=file_sizes(folder, files),
    )


def write_manifest(folder: Path, manifest: ExportManifest) -> Path:
    path = folder / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path
