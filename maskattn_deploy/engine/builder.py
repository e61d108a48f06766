"""Build TensorRT engines from an export folder, and load them back only when they still fit.

``build_engines`` reads ``EXPORT_DIR/manifest.json`` (see :mod:`maskattn_deploy.export.spec`),
derives optimization profiles from the export recipe, and builds one engine per component with
the current TensorRT API: strongly typed networks (FP16 engines come from an FP16 ONNX graph;
TensorRT 11 removed the FP16/INT8/BF16/FP8 builder flags and weak typing), the ONNX parser,
a workspace limit, the builder optimization level, and a timing cache file reused across
builds. After parsing, every masked-softmax custom node must have become a layer of our plugin
(else the build is refused), and only the outputs the runtime reads stay marked
(:class:`BuildOptions`). Each engine is written atomically with a JSON manifest beside it that
also records the plugin kernel (Triton version, tiling, PTX ISA).

Everything before :func:`_build_serialized` is plain Python (tested on CPU). TensorRT is
imported only after :func:`require_tensorrt_and_gpu` has seen a CUDA device. Loading an engine
needs no plugin definition: the kernel's PTX is inside it.
"""

from __future__ import annotations

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
    EngineManifest,
    check_engine_manifest,
    current_environment,
    make_engine_manifest,
    read_engine_manifest,
    write_engine_manifest,
)
from maskattn_deploy.engine.network import (
    check_custom_nodes,
    check_plugin_layers,
    custom_node_counts,
    keep_outputs,
    plugin_layer_counts,
    use_timing_cache,
)
from maskattn_deploy.engine.profiles import Profile, component_profiles
from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.export.component_spec import engine_outputs
from maskattn_deploy.export.folder import ComponentEntry, ExportFolder, ExportManifest
from maskattn_deploy.export.recipe import ExportRecipe, check_engine_settings, resolve_recipe
from maskattn_deploy.export.spec import ENGINES_DIR
from maskattn_deploy.ops.contract import (
    ATTENTION_PLUGIN_ID,
    ATTENTION_PLUGIN_NAME,
    PLUGIN_ID,
    PLUGIN_NAME,
    PLUGIN_VERSION,
)
from maskattn_deploy.utils import atomic_path, sha256_file

logger = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"
REBUILD_HINT = "rebuild with maskattn-deploy build"


@dataclass(frozen=True)
class BuildOptions:
    """How to build: everything except the export folder and the recipe (defaults: the recipe's).

    ``outputs`` maps a component to the outputs its engine keeps marked (the ones the runtime
    reads); components not named keep what
    :func:`~maskattn_deploy.export.component_spec.engine_outputs` gives (text encoders: what
    the runtime reads; the others: all). ``kernel_tiling`` is the masked-softmax kernel's
    ``(rows, num_warps, heads)`` for every plugin layer (None: the kernel's default).
    """

    out: str | Path | None = None
    workspace_gib: float | None = None
    opt_level: int | None = None
    timing_cache: str | Path | None = None
    components: Sequence[str] | None = None
    outputs: Mapping[str, Sequence[str]] = field(default_factory=dict)
    kernel_tiling: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        from maskattn_deploy.checks import check_float, check_int

        if self.workspace_gib is not None:
            check_float("workspace_gib", self.workspace_gib, above=0.0, high=4096.0)
        if self.opt_level is not None:
            check_int("opt_level", self.opt_level, 0, 5, hint=" (TensorRT's optimization levels)")


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
    custom_nodes: dict[str, int]  # custom nodes per op type, each to become a plugin layer
    outputs: tuple[str, ...] | None = None  # outputs to keep marked; None keeps all
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_plugin(self) -> bool:
        return any(self.custom_nodes.values())


def _kept_outputs(name: str, info: ComponentEntry, options: BuildOptions) -> tuple[str, ...] | None:
    """The outputs ``name``'s engine keeps (None: all), checked against the export's outputs.

    Not named in ``options.outputs``: what :func:`engine_outputs` gives (a text encoder keeps
    what the runtime reads, the other components all their outputs).
    """
    declared = [o["name"] for o in info.outputs if isinstance(o, Mapping)]
    if name not in options.outputs:
        return engine_outputs(name, declared) if declared else None
    keep = tuple(options.outputs[name])
    unknown = [o for o in keep if declared and o not in declared]
    if unknown or not keep:
        raise UserError(
            f"outputs to keep for {name} must be some of {', '.join(declared) or 'its outputs'}, "
            f"got {', '.join(keep) or 'none'}"
        )
    return keep


def plan_builds(
    export_dir: str | Path,
    manifest: ExportManifest,
    recipe: ExportRecipe,
    options: BuildOptions | None = None,
) -> list[BuildJob]:
    """One :class:`BuildJob` per requested component (pure: reads files, never TensorRT)."""
    options = options or BuildOptions()
    export_dir = Path(export_dir)
    known = manifest.components
    wanted = list(options.components) if options.components else list(known)
    unknown = [c for c in [*wanted, *options.outputs] if c not in known]
    if unknown:
        raise UserError(
            f"unknown component(s) {', '.join(unknown)}; this export has {', '.join(known)}"
        )
    workspace = options.workspace_gib
    workspace = float(workspace if workspace is not None else recipe.engine.workspace_gib)
    level = options.opt_level
    level = int(level if level is not None else recipe.engine.builder_optimization_level)
    check_engine_settings(workspace, level)
    out_dir = Path(options.out) if options.out is not None else export_dir / ENGINES_DIR
    cache = Path(options.timing_cache or out_dir / TIMING_CACHE_NAME)
    jobs = []
    for name in wanted:
        info = known[name]
        rel = info.path
        onnx_path = export_dir / rel
        if not onnx_path.is_file():
            raise UserError(f"{onnx_path} is missing; re-run maskattn-deploy export")
        outputs = _kept_outputs(name, info, options)
        jobs.append(
            BuildJob(
                component=name,
                onnx_path=onnx_path,
                onnx_relpath=rel,
                onnx_sha256=manifest.files.get(rel) or sha256_file(onnx_path),
                engine_path=out_dir / f"{name}{ENGINE_SUFFIX}",
                profiles=component_profiles(recipe, name, info.inputs),
                workspace_bytes=int(workspace * (1 << 30)),
                opt_level=level,
                timing_cache=cache,
                custom_nodes=custom_node_counts(onnx_path),
                outputs=outputs,
                options={"workspace_gib": workspace, "builder_optimization_level": level,
                         "recipe": recipe.name, "precision": manifest.precision,
                         "outputs": list(outputs) if outputs else None},
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
    if job.uses_plugin:
        check_custom_nodes(trt, job.onnx_path)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(job.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {job.onnx_path}: {errors}")
    check_plugin_layers(plugin_layer_counts(trt, network), job.custom_nodes, job.onnx_path)
    keep_outputs(network, job.outputs, job.component)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, job.workspace_bytes)
    config.builder_optimization_level = job.opt_level
    use_timing_cache(config, cache_data, job.timing_cache)
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


def kernel_record(
    tiling: tuple[int, int, int] | None, text_tokens: int, cuda: Any
) -> dict[str, Any]:
    """What the engine manifest says about the plugin kernel compiled into an engine."""
    import triton

    from maskattn_deploy.plugins.masked_softmax_triton import check_tiling, launch_config, padded_t
    from maskattn_deploy.plugins.trt_plugin import ptx_version_for_driver

    block_t = padded_t(text_tokens)
    return {
        "id": PLUGIN_ID,
        "version": PLUGIN_VERSION,
        "triton_version": triton.__version__,
        "block_t": block_t,
        "tiling": list(check_tiling(tiling) if tiling is not None else launch_config(block_t)),
        "tiling_source": "explicit" if tiling is not None else "default",
        "ptx_isa": ptx_version_for_driver(cuda.driver_version, cuda.sm),
    }


def attention_kernel_record(text_tokens: int, cuda: Any) -> dict[str, Any]:
    """What the engine manifest says about the fused gated-attention kernel (plugin default
    tiling: the kernel's rows, one head per program)."""
    import triton

    from maskattn_deploy.plugins.gated_attention_triton import block_t, default_rows
    from maskattn_deploy.plugins.trt_plugin import ptx_version_for_driver

    return {
        "id": ATTENTION_PLUGIN_ID,
        "version": PLUGIN_VERSION,
        "triton_version": triton.__version__,
        "block_t": block_t(text_tokens),
        "tiling": [*default_rows(block_t(text_tokens)), 1],
        "tiling_source": "default",
        "ptx_isa": ptx_version_for_driver(cuda.driver_version, cuda.sm),
    }


def _register_plugins(
    jobs: Sequence[BuildJob], options: BuildOptions, text_tokens: int, cuda: Any
) -> dict[str, dict[str, Any]]:
    """Register the plugin of every custom node type the jobs use; its kernel record per type."""
    used = {op_type for job in jobs for op_type, count in job.custom_nodes.items() if count}
    if not used:
        return {}
    from maskattn_deploy._lazy import require

    require("triton", "compiling the TensorRT plugins' kernels")
    records = {}
    if PLUGIN_NAME in used:
        from maskattn_deploy.plugins.trt_plugin import register_plugin

        register_plugin(options.kernel_tiling)
        records[PLUGIN_NAME] = kernel_record(options.kernel_tiling, text_tokens, cuda)
    if ATTENTION_PLUGIN_NAME in used:
        from maskattn_deploy.plugins.trt_attention_plugin import register_attention_plugin

        register_attention_plugin()
        records[ATTENTION_PLUGIN_NAME] = attention_kernel_record(text_tokens, cuda)
    return records


def build_engines(
    export_dir: str | Path,
    recipe: str | Path | Mapping[str, Any] | None = None,
    options: BuildOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Build an engine per component of the export; returns the engine paths written."""
    options = options or BuildOptions()
    manifest = ExportFolder.open(export_dir).manifest  # a bad folder is named before TensorRT
    cuda = require_tensorrt_and_gpu()
    recipe_obj = resolve_recipe(recipe, manifest.recipe)
    jobs = plan_builds(export_dir, manifest, recipe_obj, options)
    records = _register_plugins(jobs, options, recipe_obj.shapes.text_tokens, cuda)
    import tensorrt as trt

    trt_logger = _trt_logger(trt)
    env = current_environment(
        trt.__version__, cuda.name, cuda.compute_capability, cuda.driver_version
    )
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
        engine_manifest = make_engine_manifest(
            job.component, env, job.onnx_relpath, job.onnx_sha256,
            [p.as_dict() for p in job.profiles],
            next((records[t] for t in job.custom_nodes if t in records), None), seconds,
            job.options,
        )  # fmt: skip
        write_engine_manifest(job.engine_path, engine_manifest)
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
    engine_path: Path, manifest: EngineManifest, export_dir: Path | None
) -> str | None:
    """The current hash of the ONNX file the engine came from, when the export folder is known."""
    folder = export_dir if export_dir is not None else engine_path.parent.parent
    rel = manifest.onnx_path
    if not rel or not ExportFolder.exists(folder):
        return None
    recorded = ExportFolder.open(folder).recorded_sha256(rel)
    if recorded:
        return recorded
    return sha256_file(folder / rel) if (folder / rel).is_file() else None


@dataclass
class LoadedEngine:
    """A deserialized engine with the runtime that must outlive it, and its manifest."""

    engine: Any
    runtime: Any
    manifest: EngineManifest

    def release(self) -> None:
        """Drop the engine before its runtime (TensorRT's required order)."""
        self.engine = None
        self.runtime = None


def load_engine_checked(
    engine_path: str | Path, export_dir: str | Path | None = None
) -> LoadedEngine:
    """Deserialize an engine after checking its manifest against this machine and the export.

    The masked-softmax kernel is compiled into the engine, so no plugin definition (and no
    Triton) is needed here.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise UserError(f"{engine_path} does not exist; {REBUILD_HINT} EXPORT_DIR")
    manifest = read_engine_manifest(engine_path)
    cuda = require_tensorrt_and_gpu()
    import tensorrt as trt

    folder = Path(export_dir) if export_dir is not None else None
    env = current_environment(
        trt.__version__, cuda.name, cuda.compute_capability, cuda.driver_version
    )
    check_engine_manifest(
        manifest,
        env,
        _export_onnx_hash(engine_path, manifest, folder),
        folder or engine_path.parent.parent,
    )
    _note_other_triton(manifest)
    runtime = trt.Runtime(_trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise UserError(
            f"TensorRT could not load {engine_path}; {REBUILD_HINT} {engine_path.parent.parent}"
        )
    return LoadedEngine(engine, runtime, manifest)


def _note_other_triton(manifest: EngineManifest) -> None:
    """Log (never refuse) when the engine's kernel came from another Triton than the installed."""
    built = (manifest.plugin or {}).get("triton_version")
    if not built:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        here = version("triton")
    except PackageNotFoundError:
        here = None
    if here != built:
        logger.info(
            "%s: its kernel was compiled by Triton %s (installed: %s); the kernel is inside "
            "the engine, a rebuild would compile it with the installed one",
            manifest.component,
            built,
            here or "none",
        )


def gpu_summary() -> str:
    """One line about the GPU the builder would use (for logs and `env`)."""
    cuda = probe_cuda()
    return f"{cuda.name} (sm_{cuda.sm})" if cuda.usable else cuda.reason
