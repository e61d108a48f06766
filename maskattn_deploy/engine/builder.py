"""Build TensorRT engines from an export folder, and load them back only when they still fit.

``build_engines`` reads ``EXPORT_DIR/manifest.json`` (see :mod:`maskattn_deploy.export.spec`),
derives optimization profiles from the export recipe, and builds one engine per component with
the current TensorRT API: strongly typed networks (FP16 engines come from an FP16 ONNX graph;
TensorRT 11 removed the FP16/INT8/BF16/FP8 builder flags and weak typing), the ONNX parser,
a workspace limit, the builder optimization level, and a timing cache file reused across
builds. Each engine is written atomically with a JSON manifest beside it.

Everything before :func:`_build_serialized` is plain Python (tested on CPU). TensorRT is
imported only after :func:`require_tensorrt_and_gpu` has seen a CUDA device.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.engine.cuda_check import (
    missing_for_tensorrt,
    probe_cuda,
    require_tensorrt_and_gpu,
)
from maskattn_deploy.engine.manifest import (
    ENGINE_SUFFIX,
    check_engine_manifest,
    current_environment,
    make_engine_manifest,
    manifest_path,
    read_engine_manifest,
)
from maskattn_deploy.engine.profiles import Profile, component_profiles
from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.export.recipe import ExportRecipe, check_engine_settings, resolve_recipe
from maskattn_deploy.export.spec import ENGINES_DIR, EXPORT_FORMAT, MANIFEST_NAME
from maskattn_deploy.ops.contract import PLUGIN_ID, PLUGIN_NAME, PLUGIN_VERSION
from maskattn_deploy.utils import atomic_path, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"
REBUILD_HINT = "rebuild with maskattn-deploy build"
# TensorRT runtimes must outlive the engines they deserialized.
_RUNTIMES: list[Any] = []


@dataclass(frozen=True)
class BuildJob:
    """Everything needed to build one component's engine (no TensorRT objects)."""

    component: str
    onnx_path: Path
    onnx_relpath: str
    onnx_sha256: str
    engine_path: Path
    profiles: list[Profile]
    workspace_bytes: int
    opt_level: int
    timing_cache: Path
    uses_plugin: bool
    options: dict[str, Any] = field(default_factory=dict)


def read_export_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Parse ``EXPORT_DIR/manifest.json`` or raise a UserError that names the fix."""
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{export_dir} is not an export folder (no {MANIFEST_NAME}); create one with maskattn-deploy export"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); re-run maskattn-deploy export") from exc
    if manifest.get("format", EXPORT_FORMAT) != EXPORT_FORMAT or "components" not in manifest:
        raise UserError(f"{path} is not a {EXPORT_FORMAT} manifest; re-run maskattn-deploy export")
    return manifest


def onnx_uses_plugin(onnx_path: Path) -> bool:
    """True when the graph (or a local function) holds the masked-softmax custom node."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return any(n.op_type == PLUGIN_NAME for n in nodes)


def plan_builds(
    export_dir: str | Path,
    manifest: Mapping[str, Any],
    recipe: ExportRecipe,
    out: str | Path | None = None,
    workspace_gib: float | None = None,
    opt_level: int | None = None,
    timing_cache: str | Path | None = None,
    components: Sequence[str] | None = None,
) -> list[BuildJob]:
    """One :class:`BuildJob` per requested component (pure: reads files, never TensorRT)."""
    export_dir = Path(export_dir)
    known = manifest.get("components", {})
    wanted = list(components) if components else list(known)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise UserError(
            f"unknown component(s) {', '.join(unknown)}; this export has {', '.join(known)}"
        )
    workspace = float(workspace_gib if workspace_gib is not None else recipe.engine.workspace_gib)
    level = int(opt_level if opt_level is not None else recipe.engine.builder_optimization_level)
    check_engine_settings(workspace, level)
    out_dir = Path(out) if out is not None else export_dir / ENGINES_DIR
    cache = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE_NAME
    files = manifest.get("files", {})
    jobs = []
    for name in wanted:
        info = known[name]
        rel = info.get("path", f"{name}/model.onnx")
        onnx_path = export_dir / rel
        if not onnx_path.is_file():
            raise UserError(f"{onnx_path} is missing; re-run maskattn-deploy export")
        jobs.append(
            BuildJob(
                component=name,
                onnx_path=onnx_path,
                onnx_relpath=rel,
                onnx_sha256=files.get(rel) or sha256_file(onnx_path),
                engine_path=out_dir / f"{name}{ENGINE_SUFFIX}",
                profiles=component_profiles(recipe, name, info.get("inputs")),
                workspace_bytes=int(workspace * (1 << 30)),
                opt_level=level,
                timing_cache=cache,
                uses_plugin=onnx_uses_plugin(onnx_path),
                options={"workspace_gib": workspace, "builder_optimization_level": level,
                         "recipe": recipe.name, "precision": manifest.get("precision")},
            )
        )  # fmt: skip
    return jobs


def network_flags(trt: Any) -> int:
    """Strongly typed network: an explicit flag on TensorRT 10, the only mode on 11."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _trt_logger(trt: Any) -> Any:
    level = trt.Logger.VERBOSE if logger.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING
    return trt.Logger(level)


def _build_serialized(
    trt: Any, trt_logger: Any, job: BuildJob, cache_data: bytes
) -> tuple[bytes, bytes]:
    """Parse, configure and build one engine; returns (engine bytes, timing cache bytes)."""
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(job.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {job.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, job.workspace_bytes)
    config.builder_optimization_level = job.opt_level
    timing_cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(timing_cache, False)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in job.profiles:
        profile = builder.create_optimization_profile()
        for name, rng in prof.shapes.items():
            if name in network_inputs:
                profile.set_shape(name, rng.min, rng.opt, rng.max)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build the {job.component} engine; rerun with -vv for its log"
        )
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def _save_timing_cache(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def build_engines(
    export_dir: str | Path,
    recipe: str | Path | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    workspace_gib: float | None = None,
    opt_level: int | None = None,
    timing_cache: str | Path | None = None,
    components: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Build an engine per component of the export; returns the engine paths written."""
    cuda = require_tensorrt_and_gpu()
    manifest = read_export_manifest(export_dir)
    recipe_obj = resolve_recipe(recipe, manifest.get("recipe"))
    jobs = plan_builds(
        export_dir, manifest, recipe_obj, out, workspace_gib, opt_level, timing_cache, components
    )
    if any(j.uses_plugin for j in jobs):
        from maskattn_deploy._lazy import require

        require("triton", "compiling the masked-softmax TensorRT plugin")
    import tensorrt as trt

    from maskattn_deploy.plugins.trt_plugin import register_plugin

    register_plugin()
    trt_logger = _trt_logger(trt)
    env = current_environment(trt.__version__, cuda.name, cuda.compute_capability)
    say = progress or logger.info
    written = []
    for i, job in enumerate(jobs, 1):
        say(
            f"[{i}/{len(jobs)}] building {job.component} engine ({len(job.profiles)} profiles); this can take minutes"
        )
        cache_data = job.timing_cache.read_bytes() if job.timing_cache.is_file() else b""
        start = time.perf_counter()
        engine_bytes, cache_bytes = _build_serialized(trt, trt_logger, job, cache_data)
        seconds = time.perf_counter() - start
        _save_timing_cache(job.timing_cache, cache_bytes)
        with atomic_path(job.engine_path) as tmp:
            tmp.write_bytes(engine_bytes)
        plugin = {"id": PLUGIN_ID, "version": PLUGIN_VERSION} if job.uses_plugin else None
        engine_manifest = make_engine_manifest(
            job.component, env, job.onnx_relpath, job.onnx_sha256,
            [p.as_dict() for p in job.profiles], plugin, seconds, job.options,
        )  # fmt: skip
        write_json_atomic(manifest_path(job.engine_path), engine_manifest)
        say(
            f"[{i}/{len(jobs)}] {job.engine_path} ({len(engine_bytes) / 1e6:.1f} MB, {seconds:.0f} s)"
        )
        written.append(job.engine_path)
    return written


def maybe_build_after_export(
    export_dir: str | Path, recipe: Any, no_engine: bool
) -> list[Path] | None:
    """Build engines at the end of ``export --fp16`` when TensorRT and a GPU are here.

    Returns the engine paths, or None after logging why the build was skipped.
    """
    if no_engine:
        logger.warning("TensorRT engine build skipped (--no-engine)")
        return None
    reason = missing_for_tensorrt()
    if reason is not None:
        logger.warning(
            "TensorRT engine build skipped: %s. Build later with: maskattn-deploy build %s",
            reason,
            export_dir,
        )
        return None
    return build_engines(export_dir, recipe)


def _export_onnx_hash(
    engine_path: Path, manifest: Mapping[str, Any], export_dir: Path | None
) -> str | None:
    """The current hash of the ONNX file the engine came from, when the export folder is known."""
    folder = export_dir if export_dir is not None else engine_path.parent.parent
    rel = (manifest.get("onnx") or {}).get("path")
    if not rel or not (folder / MANIFEST_NAME).is_file():
        return None
    recorded = json.loads((folder / MANIFEST_NAME).read_text()).get("files", {}).get(rel)
    if recorded:
        return recorded
    return sha256_file(folder / rel) if (folder / rel).is_file() else None


def load_engine_checked(engine_path: str | Path, export_dir: str | Path | None = None) -> Any:
    """Deserialize an engine after checking its manifest against this machine and the export."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise UserError(f"{engine_path} does not exist; {REBUILD_HINT} EXPORT_DIR")
    manifest = read_engine_manifest(engine_path)
    cuda = require_tensorrt_and_gpu()
    import tensorrt as trt

    folder = Path(export_dir) if export_dir is not None else None
    env = current_environment(trt.__version__, cuda.name, cuda.compute_capability)
    check_engine_manifest(
        manifest,
        env,
        _export_onnx_hash(engine_path, manifest, folder),
        folder or engine_path.parent.parent,
    )
    if manifest.get("plugin"):
        from maskattn_deploy.plugins.trt_plugin import register_plugin

        register_plugin()
    runtime = trt.Runtime(_trt_logger(trt))
    _RUNTIMES.append(runtime)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise UserError(
            f"TensorRT could not load {engine_path}; {REBUILD_HINT} {engine_path.parent.parent}"
        )
    return engine


def gpu_summary() -> str:
    """One line about the GPU the builder would use (for logs and `env`)."""
    cuda = probe_cuda()
    return f"{cuda.name} (sm_{cuda.sm})" if cuda.usable else cuda.reason
