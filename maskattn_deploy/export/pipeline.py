"""Export a gated SDXL pipeline (or a UNet alone) to a self-describing ONNX folder.

The work happens in a temporary folder beside ``out`` that is renamed onto it only when every
component was written and validated (:func:`maskattn_deploy.utils.atomic_dir`), so a failure
never leaves a half-written export. Per component: trace with the dynamo exporter (the masked
softmax becomes one custom node per gated layer), finish the graph (function, I/O shapes),
save (external data past the threshold), then validate the saved file.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.export import graph as graph_mod
from maskattn_deploy.export.adapters import UNetModule, inner_module
from maskattn_deploy.export.component_spec import ModelDims
from maskattn_deploy.export.components import (
    PIPELINE_ATTR,
    Component,
    pipeline_component,
    unet_component,
)
from maskattn_deploy.export.manifest import build_manifest, write_manifest
from maskattn_deploy.export.metadata import (
    TOKENIZER_DIRS,
    collect_metadata,
    save_tokenizer,
    write_metadata,
)
from maskattn_deploy.export.recipe import ExportRecipe, resolve_recipe
from maskattn_deploy.export.shapes import ShapeRanges, torch_dims
from maskattn_deploy.export.spec import (
    CONFIG_DIRS,
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    EXTERNAL_DATA_SUFFIX,
    MODEL_FILE,
    component_dir,
    model_relpath,
)
from maskattn_deploy.export.validate import (
    OutputCheck,
    check_file,
    compare,
    ort_fp16_fallback_ops,
    ort_session,
    reference_outputs,
)
from maskattn_deploy.gating import installed_gates, remove_gates
from maskattn_deploy.gating.checkpoint import read_checkpoint
from maskattn_deploy.utils import atomic_dir, sha256_file

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


# --- results -------------------------------------------------------------------------------


@dataclass
class ComponentResult:
    """One written component and its validation."""

    name: str
    path: str  # relative to the export folder
    size_bytes: int
    external_data: bool
    precision: str
    opset: int
    seconds: float
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    gated_layers: list[str] = field(default_factory=list)
    checks: list[OutputCheck] = field(default_factory=list)
    fp16_fallback_ops: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": self.path,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "external_data": self.external_data,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
        }
        if self.name == "unet":
            entry["gated_layers"] = self.gated_layers
        return entry

    def row(self) -> dict[str, Any]:
        return {
            "component": self.name,
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "precision": self.precision,
            "max_diff": self.max_diff,
            "seconds": round(self.seconds, 1),
            "external_data": self.external_data,
        }


@dataclass
class ExportResult:
    """What :func:`export_pipeline` wrote."""

    out: Path
    manifest: dict[str, Any]
    components: list[ComponentResult]
    seconds: float

    def rows(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.components]

    def table(self) -> str:
        """The summary table printed by the CLI."""
        header = f"{'component':<16}{'size':>10}  {'opset':>5}  {'precision':<9}  {'max diff':>9}"
        lines = [header, "-" * len(header)]
        for c in self.components:
            diff = f"{c.max_diff:.1e}" if c.max_diff is not None else "skipped"
            ext = " (+ext)" if c.external_data else ""
            lines.append(
                f"{c.name:<16}{human_size(c.size_bytes):>10}  {c.opset:>5}  {c.precision:<9}  "
                f"{diff:>9}{ext}"
            )
        return "\n".join(lines)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


# --- options -------------------------------------------------------------------------------


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an existing output before any work is done."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")


# --- one component -------------------------------------------------------------------------


def _to_fp16(component: Component, inplace: bool) -> None:
    """Cast the component's weights to fp16 (the UNet's gates stay fp32)."""
    if not inplace:
        component.module = copy.deepcopy(component.module)
    module = component.module
    if isinstance(module, UNetModule):
        module.unet.half()  # gates are not a submodule of the UNet: they stay fp32
    else:
        module.half()


def _trace(component: Component, ranges: ShapeRanges, opset: int) -> Any:
    """Dynamo export -> ONNXProgram (weights stay shared with the torch module)."""
    dims = torch_dims(ranges)
    example = component.graph_inputs(ranges.trace_point(), seed=0)
    axes = component.spec.dynamic_axes()
    dynamic = {
        spec.name: {axis: dims[d] for axis, d in axes[spec.name].items()}
        for spec in component.inputs
    }
    table = None
    if component.gated_layers:
        from maskattn_deploy.export.onnx_op import translation_table

        table = translation_table()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" lines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; errors still raise
        try:
            return torch.onnx.export(
                component.module,
                tuple(example.values()),
                dynamo=True,
                input_names=[s.name for s in component.inputs],
                output_names=[s.name for s in component.outputs],
                dynamic_shapes=dynamic,
                opset_version=opset,
                custom_translation_table=table,
                optimize=False,  # graph_mod.optimize runs the passes that matter
                verbose=False,
            )
        except Exception as exc:  # torch raises many exporter error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"exporting {component.name} to ONNX failed: {first}") from exc
        finally:
            registry_log.setLevel(level)


def _initializer_bytes(model: Any) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def export_component(
    component: Component,
    root: Path,
    ranges: ShapeRanges,
    opset: int,
    *,
    per_layer: bool = False,
    external_data_threshold: int | None = None,
) -> tuple[Path, bool, list[str]]:
    """Trace, finish and save one component under ``root``.

    Returns (path, external data?, gated layers, extra per-layer output specs in graph order).
    """
    import onnx_ir as ir

    program = _trace(component, ranges, opset)
    model = program.model
    graph_mod.optimize(model)
    layers = graph_mod.finalize(
        model, component, opset, per_layer=per_layer and component.name == "unet"
    )
    threshold = (
        DEFAULT_EXTERNAL_DATA_THRESHOLD
        if external_data_threshold is None
        else external_data_threshold
    )
    external = _initializer_bytes(model) > threshold
    path = root / model_relpath(component.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = MODEL_FILE + EXTERNAL_DATA_SUFFIX if external else None
    try:
        ir.save(model, path, external_data=data_name)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    extra_names = [v.name for v in model.graph.outputs[len(component.outputs) :]]
    del program, model
    return path, external, layers, [component.per_layer_outputs[n] for n in extra_names]


def _component_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def _export_and_validate(
    component: Component,
    root: Path,
    ranges: ShapeRanges,
    opset: int,
    *,
    validate: bool,
    inplace: bool,
    per_layer: bool,
    external_data_threshold: int | None,
    say: Progress,
    release: Callable[[Component], None] | None = None,
) -> ComponentResult:
    start = time.perf_counter()
    points = ranges.validation_points()
    refs = reference_outputs(component, points) if validate else []
    if component.precision == "fp16":
        _to_fp16(component, inplace)
    path, external, layers, extra_outputs = export_component(
        component,
        root,
        ranges,
        opset,
        per_layer=per_layer,
        external_data_threshold=external_data_threshold,
    )
    component.module = nn.Identity()  # drop the fp16 copy / reference to the weights early
    if inplace and release is not None:
        release(component)  # let the owner free the weights before the ORT session
    result = ComponentResult(
        name=component.name,
        path=model_relpath(component.name),
        size_bytes=_component_size(path),
        external_data=external,
        precision=component.precision,
        opset=opset,
        seconds=0.0,
        inputs=[s.record(component.precision) for s in component.inputs],
        outputs=[s.record(component.precision) for s in [*component.outputs, *extra_outputs]],
        gated_layers=layers,
    )
    if validate:
        _validate(component, path, result, points, refs, say)
    result.seconds = time.perf_counter() - start
    return result


def _validate(
    component: Component,
    path: Path,
    result: ComponentResult,
    points: list[dict[str, int]],
    refs: list[Any],
    say: Progress,
) -> None:
    inferred = check_file(path)
    graph_mod.check_gate_coverage(
        graph_mod.gated_layers_in(inferred),
        component.gated_layers,
        graph_mod.standard_softmax_layers(inferred),
    )
    if component.precision == "fp16":
        stray = graph_mod.fp32_outside_islands(inferred, component.name)
        if stray:
            raise ExportError(
                f"{component.name}: fp16 graph keeps fp32 tensors outside the gate/softmax and "
                f"time-embedding islands: {', '.join(stray[:5])}"
            )
        result.fp16_fallback_ops = ort_fp16_fallback_ops(inferred)
        if result.fp16_fallback_ops:
            say(
                f"{component.name:>14} ORT CPU has no fp16 kernel for "
                f"{', '.join(result.fp16_fallback_ops)}: it computes them in fp32 between Casts"
            )
    session = ort_session(path)
    result.checks = compare(session, component, points, refs, say)
    del session
    failed = [c for c in result.checks if not c.ok]
    if failed:
        worst = max(failed, key=lambda c: c.max_abs)
        raise ExportError(
            f"{component.name} output {worst.output} differs from PyTorch at {worst.point}: "
            f"{'; '.join(worst.failures)} ({worst.tolerance.reason})"
        )


# --- gates and models ----------------------------------------------------------------------


def resolve_gates(
    model: Any, gates: str | Path | None, no_gates: bool, say: Progress
) -> str | Path | None:
    """The gate checkpoint to use (None: ungated); the tiny model defaults to seeded gates."""
    if gates is not None and no_gates:
        raise UserError("pass either --gates or --no-gates, not both")
    if no_gates or gates is not None:
        return gates
    if model == "tiny":
        from maskattn_deploy.models.tiny import tiny_default_gates_dir

        path = tiny_default_gates_dir()
        say(f"note: no --gates given; using the seeded, untrained tiny gates in {path}")
        return path
    raise UserError(
        "pass --gates CHECKPOINT (gates trained for this model) or --no-gates to export the "
        "plain UNet"
    )


def gate_info(path: str | Path, ckpt: Any, unet: nn.Module) -> dict[str, Any]:
    """Install the checkpoint's gates on ``unet``; returns the manifest's ``gates`` entry."""
    from maskattn_deploy.gating.checkpoint import load_gates

    gates = load_gates(ckpt, unet)
    threshold = float(gates.threshold)
    return {
        "path": str(Path(path).resolve()),
        "sha256": ckpt.sha256 or sha256_file(path),
        "format": ckpt.source,
        "config": ckpt.config.to_dict(),
        "threshold": threshold if math.isfinite(threshold) else str(threshold),
        "step": ckpt.step,
        "metadata": ckpt.metadata,
        "num_parameters": ckpt.num_parameters,
    }


def _installed_gate_info(unet: nn.Module) -> dict[str, Any] | None:
    """Manifest ``gates`` entry for gates a caller installed (no checkpoint path known)."""
    gates = installed_gates(unet)
    if gates is None:
        return None
    threshold = float(gates.threshold)
    return {
        "path": None,
        "sha256": getattr(gates, "checkpoint_sha256", None),
        "config": gates.config.to_dict(),
        "threshold": threshold if math.isfinite(threshold) else str(threshold),
        "num_parameters": gates.num_parameters(),
    }


def _model_info(model: Any, pipe: Any) -> dict[str, Any]:
    """The manifest's ``model`` entry: what was exported (runtimes read these keys)."""
    from maskattn_deploy.models import unet_fingerprint

    config = getattr(pipe, "config", {}) or {}
    return {
        "spec": model if isinstance(model, str) else None,
        "pipeline_class": type(pipe).__name__,
        "unet_fingerprint": unet_fingerprint(pipe.unet),
        "force_zeros_for_empty_prompt": bool(config.get("force_zeros_for_empty_prompt", True)),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
    }


def _vae_info(pipe: Any) -> dict[str, Any]:
    cfg = pipe.vae.config
    return {
        "scaling_factor": float(cfg.scaling_factor),
        "latents_mean": getattr(cfg, "latents_mean", None),
        "latents_std": getattr(cfg, "latents_std", None),
        "force_upcast": bool(getattr(cfg, "force_upcast", False)),
    }


def _copy_configs(pipe: Any, root: Path) -> None:
    for name in CONFIG_DIRS:
        part = getattr(pipe, name, None)
        if part is None:
            raise ExportError(f"the pipeline has no {name}; an SDXL pipeline needs one")
        if name in TOKENIZER_DIRS:
            save_tokenizer(part, root / name)
        else:
            part.save_pretrained(root / name)


# --- public entry points -------------------------------------------------------------------


def export_pipeline(
    model: str | Any = "tiny",
    gates: str | Path | None = None,
    out: str | Path = "out/onnx",
    *,
    fp16: bool = False,
    recipe: str | Path | Mapping[str, Any] | ExportRecipe = "tiny",
    overwrite: bool = False,
    validate: bool = True,
    vae_fp16: bool = False,
    vae_encoder: bool = False,
    external_data_threshold: int | None = None,
    per_layer: bool = False,
    no_gates: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export an SDXL pipeline with its gates to ``out`` (see docs/export.md).

    model: ``tiny``, a hub id, a diffusers folder, a ``.safetensors`` file, or a loaded
    ``StableDiffusionXLPipeline`` (never modified: fp16 casts work on copies, gates are removed
    again). gates: a gate checkpoint; None with ``model="tiny"`` uses the seeded tiny gates,
    None with a pipeline object whose UNet has gates installed exports those, ``no_gates=True``
    exports the plain UNet (otherwise ``gates`` is required). ``external_data_threshold``
    (bytes, default 2 GB) moves weights to ``model.onnx.data`` above it (0 forces it).
    ``per_layer`` adds each gated layer's probabilities as UNet outputs ``probs/<layer>``.
    """
    start = time.perf_counter()
    say = progress or logger.info
    recipe_obj = resolve_recipe(recipe)
    ranges, opset = recipe_obj.shapes, recipe_obj.opset
    if vae_fp16 and not fp16:
        raise UserError("--vae-fp16 needs --fp16 (the fp32 export keeps every component fp32)")
    out = Path(out)
    refuse_existing(out, overwrite)
    preinstalled = not isinstance(model, str) and installed_gates(model.unet) is not None
    if preinstalled and (gates is not None or no_gates):
        raise UserError(
            "the pipeline already has gates installed: pass gates=None (export them) or call "
            "maskattn_deploy.gating.remove_gates(pipe.unet) first"
        )
    gate_path = (
        None
        if preinstalled
        else resolve_gates(model if isinstance(model, str) else None, gates, no_gates, say)
    )
    precision = "fp16" if fp16 else "fp32"
    # A missing or corrupt checkpoint fails here, before the model is loaded.
    gate_ckpt = read_checkpoint(gate_path) if gate_path is not None else None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        owned = isinstance(model, str)
        if owned:
            from maskattn_deploy.models import load_pipeline

            say(f"loading {model}")
            pipe = load_pipeline(model)
        else:
            pipe = model
        installed_here = gate_path is not None
        try:
            gates_entry = (
                gate_info(gate_path, gate_ckpt, pipe.unet)
                if gate_path is not None
                else _installed_gate_info(pipe.unet)
            )
            model_entry, vae_entry = _model_info(model, pipe), _vae_info(pipe)
            components = _pipeline_components(pipe, precision, vae_fp16, vae_encoder)
            metadata = collect_metadata(pipe, [c.name for c in components])
            results = _run_components(
                components, tmp, ranges, opset, validate, owned, per_layer,
                external_data_threshold, say, release=_releaser(pipe) if owned else None,
            )  # fmt: skip
            _copy_configs(pipe, tmp)
            write_metadata(metadata, tmp)
            manifest = _finish_manifest(
                tmp, model_entry, vae_entry, gates_entry, opset, precision, recipe_obj.as_dict(),
                ranges, results, validate,
            )  # fmt: skip
        finally:
            if not owned and installed_here:
                remove_gates(pipe.unet)
    return ExportResult(out, manifest, results, time.perf_counter() - start)


def export_unet(
    unet: nn.Module,
    out: str | Path,
    *,
    fp16: bool = False,
    recipe: str | Path | Mapping[str, Any] | ExportRecipe = "tiny",
    overwrite: bool = False,
    validate: bool = True,
    external_data_threshold: int | None = None,
    per_layer: bool = False,
    inplace: bool = False,
    source: str = "unet",
    gates_entry: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export one UNet (with the gates installed on it, if any) to ``out/unet/model.onnx``.

    The gates' current threshold is baked in, so exporting inside ``gates.forced_open()``
    gives an all-open graph. fp16 casts a copy unless ``inplace`` (large models).
    """
    start = time.perf_counter()
    say = progress or logger.info
    recipe_obj = resolve_recipe(recipe)
    ranges, opset = recipe_obj.shapes, recipe_obj.opset
    out = Path(out)
    refuse_existing(out, overwrite)
    precision = "fp16" if fp16 else "fp32"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        component = unet_component(unet, installed_gates(unet), precision)
        metadata = collect_metadata(None, ["unet"], unet=unet)
        results = _run_components(
            [component], tmp, ranges, opset, validate, inplace, per_layer,
            external_data_threshold, say,
        )  # fmt: skip
        write_metadata(metadata, tmp)
        from maskattn_deploy.models import unet_fingerprint

        src = {"spec": source, "pipeline_class": None, "unet_fingerprint": unet_fingerprint(unet)}
        manifest = _finish_manifest(
            tmp, src, None, gates_entry if gates_entry is not None else _installed_gate_info(unet),
            opset, precision, recipe_obj.as_dict(), ranges, results, validate,
        )  # fmt: skip
    return ExportResult(out, manifest, results, time.perf_counter() - start)


def _pipeline_components(
    pipe: Any, precision: str, vae_fp16: bool, vae_encoder: bool
) -> list[Component]:
    vae_precision = "fp16" if vae_fp16 else "fp32"
    dims = ModelDims.from_pipe(pipe)
    components = [
        pipeline_component("text_encoder", pipe, precision, dims),
        pipeline_component("text_encoder_2", pipe, precision, dims),
        unet_component(pipe.unet, installed_gates(pipe.unet), precision, dims),
        pipeline_component("vae_decoder", pipe, vae_precision, dims),
    ]
    if vae_encoder:
        components.append(pipeline_component("vae_encoder", pipe, vae_precision, dims))
    return components


def _run_components(
    components: list[Component],
    root: Path,
    ranges: ShapeRanges,
    opset: int,
    validate: bool,
    inplace: bool,
    per_layer: bool,
    external_data_threshold: int | None,
    say: Progress,
    release: Callable[[Component], None] | None = None,
) -> list[ComponentResult]:
    if validate:
        say("validation: ONNX checker, shape inference, ONNX Runtime CPU vs PyTorch fp32")
    results = []
    for i, component in enumerate(components, 1):
        say(f"[{i}/{len(components)}] {component.name}: exporting ({component.precision})")
        # The VAE decoder and encoder share one module: cast a copy while a later one needs it.
        later = {id(inner_module(c.module)) for c in components[i:]}
        result = _export_and_validate(
            component, root, ranges, opset,
            validate=validate, inplace=inplace and id(inner_module(component.module)) not in later,
            per_layer=per_layer,
            external_data_threshold=external_data_threshold, say=say, release=release,
        )  # fmt: skip
        ext = ", external data" if result.external_data else ""
        say(
            f"[{i}/{len(components)}] {component.name}: {human_size(result.size_bytes)}{ext} "
            f"in {result.seconds:.1f} s"
        )
        results.append(result)
    return results


def _releaser(pipe: Any) -> Callable[[Component], None]:
    """Drop an exported component's module from a pipeline we loaded (frees GBs for SDXL)."""

    def release(component: Component) -> None:
        setattr(pipe, PIPELINE_ATTR[component.name], None)

    return release


def _finish_manifest(
    root: Path,
    model: Mapping[str, Any],
    vae: Mapping[str, Any] | None,
    gates_entry: Mapping[str, Any] | None,
    opset: int,
    precision: str,
    recipe: Mapping[str, Any],
    ranges: ShapeRanges,
    results: list[ComponentResult],
    validate: bool,
) -> dict[str, Any]:
    unet = next((r for r in results if r.name == "unet"), None)
    validation = None
    if validate:
        validation = {
            r.name: {
                "checks": [c.as_dict() for c in r.checks],
                "ort_cpu_fp32_fallback_ops": r.fp16_fallback_ops,
            }
            for r in results
        }
    manifest = build_manifest(
        root,
        model=model,
        vae=vae,
        gates=gates_entry,
        opset=opset,
        precision=precision,
        recipe=recipe,
        shapes=ranges.as_dict(),
        components={r.name: r.manifest_entry() for r in results},
        gated_layers=unet.gated_layers if unet is not None else [],
        validation=validation,
    )
    write_manifest(root, manifest)
    return manifest


__all__ = [
    "ComponentResult",
    "ExportResult",
    "component_dir",
    "export_component",
    "export_pipeline",
    "export_unet",
]
