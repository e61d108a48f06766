"""Engine manifests: what an engine was built with, and the check that refuses a stale one.

A TensorRT engine only runs on the TensorRT version and GPU it was built for, and only means
something for the ONNX file it came from. Each ``engines/<component>.engine`` has a JSON
manifest beside it (``<component>.json``); :func:`check_engine_manifest` compares it with the
current machine and the export folder, as a pure function so it is tested without TensorRT.

An engine with the masked-softmax plugin also records its kernel (``plugin``): the Triton
version and tiling it was compiled with, the padded row length and the PTX ISA. The driver
JIT-compiles that PTX when the engine loads, so a driver too old for the ISA is refused. The
Triton version is informational: the kernel is inside the engine, so another Triton (or none)
at run time changes nothing; a rebuild would compile the kernel anew. Engines of format 1 were
built before the kernel's PTX matched TensorRT's launch (it declared two extra parameters) and
are refused with a request to rebuild.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.utils import write_json_atomic

logger = logging.getLogger(__name__)

ENGINE_FORMAT = "maskattn-deploy-engine/2"
ENGINE_SUFFIX = ".engine"
MANIFEST_SUFFIX = ".json"


class EngineMismatchError(UserError):
    """An engine was built for another TensorRT, GPU or ONNX file; it must be rebuilt."""


def manifest_path(engine_path: str | Path) -> Path:
    """``engines/unet.engine`` -> ``engines/unet.json``."""
    return Path(engine_path).with_suffix(MANIFEST_SUFFIX)


def current_environment(
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    driver_version: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """The facts an engine depends on, in the manifest's vocabulary."""
    return {
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "cuda_driver": f"{driver_version[0]}.{driver_version[1]}",
    }


def driver_ptx_isa(cuda_driver: str) -> int | None:
    """Newest PTX ISA a CUDA driver ``"major.minor"`` JIT-compiles (NVIDIA's PTX ISA table).

    12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.7 -> 8.6, 12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x;
    None for an unknown driver ("0.0").
    """
    try:
        major, minor = (int(part) for part in cuda_driver.split("."))
    except (AttributeError, ValueError):
        return None
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor - (1 if minor >= 6 else 0)
    if major == 11:
        return 70 + minor
    return None


@dataclass
class EngineManifest:
    """The JSON beside an engine: what it was built with, on what, and from which ONNX file.

    ``plugin`` (engines with the masked-softmax plugin) records the kernel: id, version,
    Triton version, padded row length, tiling and PTX ISA.
    """

    component: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    cuda_driver: str  # "12.9"; "0.0" when unknown
    onnx_path: str  # relative to the export folder
    onnx_sha256: str
    profiles: list[dict[str, Any]]
    plugin: dict[str, Any] | None
    build_seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    format: str = ENGINE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "component": self.component,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "cuda_driver": self.cuda_driver,
            "onnx": {"path": self.onnx_path, "sha256": self.onnx_sha256},
            "profiles": self.profiles,
            "plugin": self.plugin,
            "build_seconds": round(self.build_seconds, 3),
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "engine manifest") -> EngineManifest:
        """Parse; a manifest without what the checks need asks for a rebuild."""
        try:
            onnx = data["onnx"]
            return cls(
                component=str(data["component"]),
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=str(data["compute_capability"]),
                cuda_driver=str(data.get("cuda_driver", "0.0")),
                onnx_path=str(onnx["path"]),
                onnx_sha256=str(onnx["sha256"]),
                profiles=list(data.get("profiles") or []),
                plugin=dict(data["plugin"]) if data.get("plugin") else None,
                build_seconds=float(data.get("build_seconds") or 0.0),
                options=dict(data.get("options") or {}),
                format=str(data.get("format")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineMismatchError(
                f"{where} lacks {exc}; rebuild with maskattn-deploy build"
            ) from None


def make_engine_manifest(
    component: str,
    environment: Mapping[str, Any],
    onnx_path: str,
    onnx_sha256: str,
    profiles: list[dict[str, Any]],
    plugin: Mapping[str, Any] | None,
    build_seconds: float,
    options: Mapping[str, Any],
) -> EngineManifest:
    """The manifest of an engine built here (``environment``: :func:`current_environment`)."""
    return EngineManifest(
        component=component,
        tensorrt_version=str(environment["tensorrt_version"]),
        gpu_name=str(environment["gpu_name"]),
        compute_capability=str(environment["compute_capability"]),
        cuda_driver=str(environment.get("cuda_driver", "0.0")),
        onnx_path=onnx_path,
        onnx_sha256=onnx_sha256,
        profiles=profiles,
        plugin=dict(plugin) if plugin else None,
        build_seconds=build_seconds,
        options=dict(options),
    )


def engine_mismatches(
    manifest: EngineManifest, current: Mapping[str, Any], onnx_sha256: str | None = None
) -> list[str]:
    """Human-readable differences that make an engine unusable here (empty: compatible)."""
    problems = []
    if manifest.format != ENGINE_FORMAT:
        problems.append(f"engine manifest format {manifest.format!r} (expected {ENGINE_FORMAT!r})")
    for key, what in (
        ("tensorrt_version", "TensorRT"),
        ("compute_capability", "GPU compute capability"),
        ("gpu_name", "GPU"),
    ):
        built, here = getattr(manifest, key), current.get(key)
        if built != here:
            problems.append(f"built for {what} {built}, this machine has {here}")
    problems += _kernel_problems(manifest.plugin, current.get("cuda_driver", "0.0"))
    if onnx_sha256 is not None and manifest.onnx_sha256 != onnx_sha256:
        problems.append(
            f"built from another ONNX file (sha256 {manifest.onnx_sha256[:12]}..., the export "
            f"has {onnx_sha256[:12]}...)"
        )
    return problems


def _kernel_problems(plugin: Mapping[str, Any] | None, cuda_driver: str) -> list[str]:
    """Why the plugin kernel inside an engine cannot run under this driver (empty: it can)."""
    if not plugin:
        return []
    needed, here = plugin.get("ptx_isa"), driver_ptx_isa(cuda_driver)
    if not isinstance(needed, int):
        return ["its plugin kernel is not recorded"]
    if here is not None and needed > here:
        return [
            f"its plugin kernel is PTX ISA {needed // 10}.{needed % 10}, which this CUDA driver "
            f"{cuda_driver} cannot compile (update the driver)"
        ]
    return []


def check_engine_manifest(
    manifest: EngineManifest,
    current: Mapping[str, Any],
    onnx_sha256: str | None = None,
    export_dir: str | Path | None = None,
) -> None:
    """Raise :class:`EngineMismatchError` naming every mismatch and the rebuild command."""
    problems = engine_mismatches(manifest, current, onnx_sha256)
    if problems:
        target = str(export_dir) if export_dir is not None else "EXPORT_DIR"
        raise EngineMismatchError(
            f"the {manifest.component} engine cannot be used here: {'; '.join(problems)}; "
            f"rebuild with maskattn-deploy build {target}"
        )


def read_engine_manifest(engine_path: str | Path) -> EngineManifest:
    """The manifest beside ``engine_path``; a missing or corrupt one asks for a rebuild."""
    path = manifest_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineMismatchError(
            f"{engine_path} has no engine manifest ({path.name}); rebuild with maskattn-deploy build"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(
            f"engine manifest {path} is unreadable ({exc}); rebuild with maskattn-deploy build"
        ) from exc
    if not isinstance(data, dict):
        raise EngineMismatchError(
            f"engine manifest {path} is not a JSON object; rebuild with maskattn-deploy build"
        )
    return EngineManifest.from_dict(data, str(path))


def write_engine_manifest(engine_path: str | Path, manifest: EngineManifest) -> Path:
    path = manifest_path(engine_path)
    write_json_atomic(path, manifest.to_dict())
    return path
