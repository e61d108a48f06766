"""Engine manifests: what an engine was built with, and the check that refuses a stale one.

A TensorRT engine only runs on the TensorRT version and GPU it was built for, and only means
something for the ONNX file it came from. Each ``engines/<component>.engine`` has a JSON
manifest beside it (``<component>.json``); :func:`check_engine_manifest` compares it with the
current machine and the export folder, as a pure function so it is tested without TensorRT.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError

logger = logging.getLogger(__name__)

ENGINE_FORMAT = "maskattn-deploy-engine/1"
ENGINE_SUFFIX = ".engine"
MANIFEST_SUFFIX = ".json"


class EngineMismatchError(UserError):
    """An engine was built for another TensorRT, GPU or ONNX file; it must be rebuilt."""


def manifest_path(engine_path: str | Path) -> Path:
    """``engines/unet.engine`` -> ``engines/unet.json``."""
    return Path(engine_path).with_suffix(MANIFEST_SUFFIX)


def current_environment(
    tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int]
) -> dict[str, Any]:
    """The facts an engine depends on, in the manifest's vocabulary."""
    return {
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
    }


def make_engine_manifest(
    component: str,
    environment: Mapping[str, Any],
    onnx_path: str,
    onnx_sha256: str,
    profiles: list[dict[str, Any]],
    plugin: Mapping[str, str] | None,
    build_seconds: float,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON written beside an engine."""
    return {
        "format": ENGINE_FORMAT,
        "component": component,
        **environment,
        "onnx": {"path": onnx_path, "sha256": onnx_sha256},
        "profiles": profiles,
        "plugin": dict(plugin) if plugin else None,
        "build_seconds": round(build_seconds, 3),
        "options": dict(options),
    }


def engine_mismatches(
    manifest: Mapping[str, Any], current: Mapping[str, Any], onnx_sha256: str | None = None
) -> list[str]:
    """Human-readable differences that make an engine unusable here (empty: compatible)."""
    problems = []
    if manifest.get("format") != ENGINE_FORMAT:
        problems.append(
            f"engine manifest format {manifest.get('format')!r} (expected {ENGINE_FORMAT!r})"
        )
    for key, what in (
        ("tensorrt_version", "TensorRT"),
        ("compute_capability", "GPU compute capability"),
        ("gpu_name", "GPU"),
    ):
        built, here = manifest.get(key), current.get(key)
        if built != here:
            problems.append(f"built for {what} {built}, this machine has {here}")
    if onnx_sha256 is not None:
        built_hash = (manifest.get("onnx") or {}).get("sha256")
        if built_hash != onnx_sha256:
            problems.append(
                f"built from another ONNX file (sha256 {str(built_hash)[:12]}..., the export has "
                f"{onnx_sha256[:12]}...)"
            )
    return problems


def check_engine_manifest(
    manifest: Mapping[str, Any],
    current: Mapping[str, Any],
    onnx_sha256: str | None = None,
    export_dir: str | Path | None = None,
) -> None:
    """Raise :class:`EngineMismatchError` naming every mismatch and the rebuild command."""
    problems = engine_mismatches(manifest, current, onnx_sha256)
    if problems:
        target = str(export_dir) if export_dir is not None else "EXPORT_DIR"
        component = manifest.get("component", "engine")
        raise EngineMismatchError(
            f"the {component} engine cannot be used here: {'; '.join(problems)}; "
            f"rebuild with maskattn-deploy build {target}"
        )


def read_engine_manifest(engine_path: str | Path) -> dict[str, Any]:
    """The manifest beside ``engine_path``; a missing or corrupt one asks for a rebuild."""
    path = manifest_path(engine_path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineMismatchError(
            f"{engine_path} has no engine manifest ({path.name}); rebuild with maskattn-deploy build"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(
            f"engine manifest {path} is unreadable ({exc}); rebuild with maskattn-deploy build"
        ) from exc
