"""Export a gated SDXL pipeline (or a UNet alone) to a self-describing ONNX folder.

The work happens in a temporary folder beside ``out`` that is renamed onto it only when every
component was written and validated (:func:`maskattn_deploy.utils.atomic_dir`), so a failure
never leaves a half-written export. Per component: trace the spec's adapter module with the
dynamo exporter (the masked softmax becomes one custom node per gated layer), finish the graph
(function, I/O shapes), save (external data past the threshold), then validate the saved file.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskattn_deploy.checks import check_int
from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.export import graph as graph_mod
from maskattn_deploy.export.adapters import UNetModule, inner_module
from maskattn_deploy.export.component_spec import ModelDims, TensorSpec
from maskattn_deploy.export.components import (
    PIPELINE_ATTR,
    Component,
    pipeline_component,
    unet_component,
)
from maskattn_deploy.export.integrity import remember_files
from maskattn_deploy.export.manifest import (
    ExportSource,
    build_manifest,
    checkpoint_gates_entry,
    installed_gates_entry,
    pipeline_model_entry,
    vae_entry,
    write_manifest,
)
from maskattn_deploy.export.metadata import (
    TOKENIZER_DIRS,
    collect_metadata,
    save_tokenizer,
    write_metadata,
)
from maskattn_deploy.export.onnx_op import ATTENTION_NODES
from maskattn_deploy.export.recipe import ExportRecipe, resolve_recipe
from maskattn_deploy.export.results import ComponentResult, ExportResult, human_size
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
    check_file,
    compare,
    ort_fp16_fallback_ops,
    ort_session,
    reference_outputs,
)
from maskattn_deploy.gating import AttentionImpl, installed_gates, remove_gates
from maskattn_deploy.gating.checkpoint import read_checkpoint
from maskattn_deploy.models.choice import ModelChoice
from maskattn_deploy.utils import atomic_dir

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportOptions:
    """How to export: the ``maskattn-deploy export`` flags as one object.

    ``recipe``: a name, a ``.toml`` path, a parsed mapping or an
    :class:`~maskattn_deploy.export.recipe.ExportRecipe` (shape ranges, profiles, opset).
    ``external_data_threshold`` (bytes, default 2 GB) moves weights to ``model.onnx.data``
    above it (0 forces it). ``per_layer`` adds each gated layer's probabilities as UNet outputs
    ``probs/<layer>``. ``vae_fp16`` also casts the VAE (needs ``fp16``). ``attention_node``:
    ``softmax`` writes each gated layer's masked softmax as one ``MaskedSoftmax`` node,
    ``fused`` its ``QK^T -> masked softmax -> PV`` as one ``MaskedCrossAttention`` node
    (docs/export.md).
    """

    fp16: bool = False
    recipe: str | Path | Mapping[str, Any] | ExportRecipe = "tiny"
    overwrite: bool = False
    validate: bool = True
    vae_fp16: bool = False
    vae_encoder: bool = False
    external_data_threshold: int | None = None
    per_layer: bool = False
    attention_node: str = "softmax"
    progress: Progress | None = None

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def vae_precision(self) -> str:
        return "fp16" if self.vae_fp16 else "fp32"

    def say(self) -> Progress:
        return self.progress or logger.info

    def check(self) -> None:
        if self.external_data_threshold is not None:
            check_int("external_data_threshold", self.external_data_threshold, 0)
        if self.vae_fp16 and not self.fp16:
            raise UserError(
                "vae_fp16 needs fp16 (the fp32 export keeps every component fp32)",
                params=("vae_fp16", "fp16"),
            )
        if self.attention_node not in ATTENTION_NODES:
            raise UserError(
                f"attention_node must be one of {', '.join(ATTENTION_NODES)}, got "
                f"{self.attention_node!r}",
                params=("attention_node",),
            )
        if self.attention_node == "fused" and self.per_layer:
            raise UserError(
                "per_layer needs attention_node softmax: the fused node never forms the "
                "probabilities",
                params=("per_layer", "attention_node"),
            )


@dataclass
class _Run:
    """One export's resolved settings, shared by the per-component steps."""

    root: Path
    recipe: ExportRecipe
    options: ExportOptions
    inplace: bool
    say: Progress
    release: Callable[[Component], None] | None = None


def _options(options: ExportOptions | None, overrides: dict[str, Any]) -> ExportOptions:
    """``options`` with keyword overrides (``export_pipeline(..., fp16=True)``)."""
    try:
        merged = replace(options or ExportOptions(), **overrides)
    except TypeError as exc:
        raise UserError(f"unknown export option: {exc}") from None
    merged.check()
    return merged


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an existing output before any work is done."""
    if out.exists() and not overwrite:
        raise ExportError(
            f"{out} already exists; pass overwrite to replace it", params=("overwrite",)
        )


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


def _trace(
    component: Component, ranges: ShapeRanges, opset: int, attention_node: str = "softmax"
) -> Any:
    """Dynamo export -> ONNXProgram (weights stay shared with the torch module)."""
    gates = getattr(component.module, "gates", None)
    if gates is None:
        return _trace_module(component, ranges, opset)
    # The gate mode decides which op the gated processors call, hence the custom node type.
    attention = AttentionImpl.FUSED if attention_node == "fused" else AttentionImpl.OP
    with gates.mode(attention=attention):
        return _trace_module(component, ranges, opset)


def _trace_module(component: Component, ranges: ShapeRanges, opset: int) -> Any:
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
    attention_node: str = "softmax",
) -> tuple[Path, bool, list[str], list[TensorSpec]]:
    """Trace, finish and save one component under ``root``.

    Returns (path, external data?, gated layers, extra per-layer output specs in graph order).
    """
    import onnx_ir as ir

    program = _trace(component, ranges, opset, attention_node)
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


def _export_and_validate(component: Component, run: _Run, inplace: bool) -> ComponentResult:
    start = time.perf_counter()
    ranges, opset, options = run.recipe.shapes, run.recipe.opset, run.options
    points = ranges.validation_points()
    refs = reference_outputs(component, points) if options.validate else []
    if component.precision == "fp16":
        _to_fp16(component, inplace)
    path, external, layers, extra_outputs = export_component(
        component, run.root, ranges, opset,
        per_layer=options.per_layer, external_data_threshold=options.external_data_threshold,
        attention_node=options.attention_node,
    )  # fmt: skip
    component.module = nn.Identity()  # drop the fp16 copy / reference to the weights early
    if inplace and run.release is not None:
        run.release(component)  # let the owner free the weights before the ORT session
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
    if options.validate:
        _validate(component, path, result, points, refs, run.say)
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
    options: ExportOptions | None = None,
    *,
    no_gates: bool = False,
    **overrides: Any,
) -> ExportResult:
    """Export an SDXL pipeline with its gates to ``out`` (see docs/export.md).

    model: ``tiny``, a hub id, a diffusers folder, a ``.safetensors`` file, or a loaded
    ``StableDiffusionXLPipeline`` (never modified: fp16 casts work on copies, gates are removed
    again). gates: a gate checkpoint; None with ``model="tiny"`` uses the seeded tiny gates,
    None with a pipeline object whose UNet has gates installed exports those, ``no_gates=True``
    exports the plain UNet (otherwise ``gates`` is required). ``options`` (or keyword
    overrides of its fields, e.g. ``fp16=True``): see :class:`ExportOptions`.
    """
    start = time.perf_counter()
    options = _options(options, overrides)
    say, recipe = options.say(), resolve_recipe(options.recipe)
    out = Path(out)
    refuse_existing(out, options.overwrite)
    owned = isinstance(model, str)
    preinstalled = not owned and installed_gates(model.unet) is not None
    if preinstalled and (gates is not None or no_gates):
        raise UserError(
            "the pipeline already has gates installed: pass gates=None (export them) or call "
            "maskattn_deploy.gating.remove_gates(pipe.unet) first"
        )
    choice = ModelChoice(model if owned else None, gates, no_gates)
    gate_path = None if preinstalled else choice.gate_checkpoint(choice.model, say)
    # A missing or corrupt checkpoint fails here, before the model is loaded.
    gate_ckpt = read_checkpoint(gate_path) if gate_path is not None else None
    with atomic_dir(out, overwrite=options.overwrite) as tmp:
        pipe = _load(model, say) if owned else model
        try:
            source = _pipeline_source(model, pipe, gate_path, gate_ckpt)
            run = _Run(tmp, recipe, options, owned, say, _releaser(pipe) if owned else None)
            components = _pipeline_components(pipe, options)
            metadata = collect_metadata(pipe, [c.name for c in components])
            results = _run_components(components, run)
            _copy_configs(pipe, tmp)
            write_metadata(metadata, tmp)
            manifest = build_manifest(
                tmp, source, recipe, options.precision, results, options.validate,
                options.attention_node,
            )  # fmt: skip
            write_manifest(tmp, manifest)
            remember_files(manifest.files, tmp, out)  # opening it does not hash it again
        finally:
            if not owned and gate_path is not None:
                remove_gates(pipe.unet)
    return ExportResult(out, manifest, results, time.perf_counter() - start)


def export_unet(
    unet: nn.Module,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    inplace: bool = False,
    source: str = "unet",
    gates_checkpoint: str | Path | None = None,
    **overrides: Any,
) -> ExportResult:
    """Export one UNet (with the gates installed on it, if any) to ``out/unet/model.onnx``.

    The gates' current threshold is baked in, so exporting inside ``gates.forced_open()``
    gives an all-open graph. fp16 casts a copy unless ``inplace`` (large models).
    ``gates_checkpoint``: the checkpoint the installed gates came from (recorded with its
    hash, so parity and ``generate --save-masks`` find it).
    """
    from maskattn_deploy.export.folder import ModelEntry
    from maskattn_deploy.models import unet_fingerprint

    start = time.perf_counter()
    options = _options(options, overrides)
    recipe, out = resolve_recipe(options.recipe), Path(out)
    refuse_existing(out, options.overwrite)
    gates = installed_gates(unet)
    if gates_checkpoint is not None:
        entry = checkpoint_gates_entry(gates_checkpoint, read_checkpoint(gates_checkpoint), gates)
    else:
        entry = installed_gates_entry(gates)
    model = ModelEntry(spec=source, pipeline_class=None, unet_fingerprint=unet_fingerprint(unet))
    with atomic_dir(out, overwrite=options.overwrite) as tmp:
        component = unet_component(unet, gates, options.precision)
        metadata = collect_metadata(None, ["unet"], unet=unet)
        results = _run_components([component], _Run(tmp, recipe, options, inplace, options.say()))
        write_metadata(metadata, tmp)
        manifest = build_manifest(
            tmp, ExportSource(model, None, entry), recipe, options.precision, results,
            options.validate, options.attention_node,
        )  # fmt: skip
        write_manifest(tmp, manifest)
        remember_files(manifest.files, tmp, out)
    return ExportResult(out, manifest, results, time.perf_counter() - start)


def _load(model: str, say: Progress) -> Any:
    from maskattn_deploy.models import load_pipeline

    say(f"loading {model}")
    return load_pipeline(model)


def _pipeline_source(model: Any, pipe: Any, gate_path: Path | None, ckpt: Any) -> ExportSource:
    """Install the checkpoint's gates (if any) and describe what is exported."""
    from maskattn_deploy.gating.checkpoint import load_gates

    if gate_path is not None:
        gates = checkpoint_gates_entry(gate_path, ckpt, load_gates(ckpt, pipe.unet))
    else:
        gates = installed_gates_entry(installed_gates(pipe.unet))
    return ExportSource(pipeline_model_entry(model, pipe), vae_entry(pipe), gates)


def _pipeline_components(pipe: Any, options: ExportOptions) -> list[Component]:
    dims = ModelDims.from_pipe(pipe)
    precision, vae_precision = options.precision, options.vae_precision
    components = [
        pipeline_component("text_encoder", pipe, precision, dims),
        pipeline_component("text_encoder_2", pipe, precision, dims),
        unet_component(pipe.unet, installed_gates(pipe.unet), precision, dims),
        pipeline_component("vae_decoder", pipe, vae_precision, dims),
    ]
    if options.vae_encoder:
        components.append(pipeline_component("vae_encoder", pipe, vae_precision, dims))
    return components


def _run_components(components: list[Component], run: _Run) -> list[ComponentResult]:
    say = run.say
    if run.options.validate:
        say("validation: ONNX checker, shape inference, ONNX Runtime CPU vs PyTorch fp32")
    results = []
    for i, component in enumerate(components, 1):
        say(f"[{i}/{len(components)}] {component.name}: exporting ({component.precision})")
        # The VAE decoder and encoder share one module: cast a copy while a later one needs it.
        later = {id(inner_module(c.module)) for c in components[i:]}
        inplace = run.inplace and id(inner_module(component.module)) not in later
        result = _export_and_validate(component, run, inplace)
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


__all__ = [
    "ComponentResult",
    "ExportOptions",
    "ExportResult",
    "component_dir",
    "export_component",
    "export_pipeline",
    "export_unet",
]
