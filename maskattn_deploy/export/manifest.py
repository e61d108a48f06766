"""``manifest.json`` of an export folder: what was exported, from what, and the file hashes.

Readers rely on these keys (keep them): ``format``, ``precision``, ``opset``, ``recipe``,
``components[name].path/inputs/outputs/external_data``, ``files`` (engine builder and
runtimes), ``model`` (spec, UNet fingerprint, pipeline facts), ``vae`` (scaling factor),
``gates`` (checkpoint path and SHA-256), ``gated_layers``, ``plugin``, ``tools``, ``shapes``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maskattn_deploy.export.spec import EXPORT_FORMAT, MANIFEST_NAME
from maskattn_deploy.ops.contract import (
    ONNX_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from maskattn_deploy.utils import sha256_file, write_json_atomic

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


def build_manifest(
    folder: Path,
    *,
    model: Mapping[str, Any],
    vae: Mapping[str, Any] | None,
    gates: Mapping[str, Any] | None,
    opset: int,
    precision: str,
    recipe: Mapping[str, Any],
    shapes: Mapping[str, Any],
    components: Mapping[str, Mapping[str, Any]],
    gated_layers: list[str],
    validation: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest dict for the files now in ``folder``."""
    return {
        "format": EXPORT_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model),
        "vae": dict(vae) if vae is not None else None,
        "gates": dict(gates) if gates is not None else None,
        "gate_checkpoint_sha256": gates.get("sha256") if gates is not None else None,
        "opset": opset,
        "precision": precision,
        "recipe": dict(recipe),
        "shapes": dict(shapes),
        "components": {k: dict(v) for k, v in components.items()},
        "gated_layers": list(gated_layers),
        "plugin": {
            "op_type": PLUGIN_NAME,
            "domain": ONNX_DOMAIN,
            "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION,
            "aot": 1,
        },
        "tools": tool_versions(),
        "validation": dict(validation) if validation is not None else None,
        "files": file_hashes(folder),
    }


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path
