"""``maskattn-deploy export``: the gated pipeline to ONNX (fp32 or fp16), then engines."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from maskattn_deploy.cli.options import model_choice_options

if TYPE_CHECKING:
    from maskattn_deploy.models.choice import ModelChoice


@click.command("export")
@model_choice_options(model_default="tiny", no_gates_help="Export the plain (ungated) UNet.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--fp16", is_flag=True, help="fp16 graphs (gate heads and softmax stay fp32).")
@click.option("--vae-fp16", is_flag=True, help="Also the VAE in fp16 (needs an fp16-safe VAE).")
@click.option("--vae-encoder", is_flag=True, help="Also export the VAE encoder.")
@click.option(
    "--recipe",
    default=None,
    help="Export recipe (name or .toml): shape ranges and TensorRT profiles. "
    "Default: tiny for --model tiny, else sdxl-1024.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-engine", is_flag=True, help="Do not build TensorRT engines after --fp16.")
@click.option("--no-validate", is_flag=True, help="Skip checker, ONNX Runtime and parity checks.")
@click.option(
    "--per-layer",
    is_flag=True,
    help="Add each gated layer's probabilities as UNet outputs probs/<layer> (for parity).",
)
@click.option(
    "--attention-node",
    type=click.Choice(["softmax", "fused"]),
    default="softmax",
    show_default=True,
    help="Custom node per gated layer: the masked softmax alone (MaskedSoftmax), or QK^T, "
    "masked softmax and PV as one MaskedCrossAttention node (fused kernel in TensorRT).",
)
@click.option(
    "--external-data-threshold",
    type=click.IntRange(min=0),
    default=None,
    metavar="BYTES",
    help="Move weights to model.onnx.data above this size (default 2 GB; 0 forces it).",
)
def command(
    choice: ModelChoice,
    out: Path,
    fp16: bool,
    vae_fp16: bool,
    vae_encoder: bool,
    recipe: str | None,
    overwrite: bool,
    no_engine: bool,
    no_validate: bool,
    per_layer: bool,
    attention_node: str,
    external_data_threshold: int | None,
) -> None:
    """Export MODEL with its gates to an ONNX folder (manifest, one sub-folder per component).

    The masked softmax of each gated layer (or, with --attention-node fused, its whole
    attention) is one custom node for the TensorRT plugin, backed by a model-local ONNX function
    so ONNX Runtime runs the same file. The folder appears only
    when every component was written and validated.
    """
    # Library import chatter (transformers' optional-backend notes) would bury the progress.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from maskattn_deploy.export.pipeline import ExportOptions, export_pipeline
    from maskattn_deploy.export.recipe import resolve_recipe
    from maskattn_deploy.export.results import human_size

    start_cpu = time.process_time()
    model = choice.model_or()
    recipe_obj = resolve_recipe(recipe or ("tiny" if model == "tiny" else "sdxl-1024"))
    options = ExportOptions(
        fp16=fp16,
        recipe=recipe_obj,
        overwrite=overwrite,
        validate=not no_validate,
        vae_fp16=vae_fp16,
        vae_encoder=vae_encoder,
        external_data_threshold=external_data_threshold,
        per_layer=per_layer,
        attention_node=attention_node,
        progress=click.echo,
    )
    result = export_pipeline(model, choice.gates, out, options, no_gates=choice.no_gates)
    click.echo("")
    click.echo(result.table())
    total = sum(c.size_bytes for c in result.components)
    cpu = time.process_time() - start_cpu
    click.echo(
        f"exported {len(result.components)} components ({human_size(total)}) to {out} in "
        f"{result.seconds:.1f} s (CPU {cpu:.0f} s, {_load_note()})"
    )
    if fp16:
        _engines(out, recipe_obj, no_engine)
    else:
        click.echo("fp32 export: TensorRT builds FP16 engines only from --fp16 exports")


def _load_note() -> str:
    """Cores and load average, so a time measured on a busy machine reads as such."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = f"load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load unknown"
    return f"{cores} cores, {load}"


def _engines(out: Path, recipe: Any, no_engine: bool) -> None:
    """Build TensorRT engines when the engine builder, TensorRT and a GPU are available."""
    if no_engine:
        click.echo(
            f"TensorRT engines skipped (--no-engine); build them with `maskattn-deploy build {out}`"
        )
        return
    try:
        from maskattn_deploy.engine.builder import maybe_build_after_export
    except ImportError:
        click.echo(f"TensorRT engines: build them with `maskattn-deploy build {out}`")
        return
    engines = maybe_build_after_export(out, recipe, no_engine)
    if engines:
        for path in engines:
            click.echo(f"engine: {path}")
    else:
        click.echo(
            f"TensorRT engines not built; build them later with `maskattn-deploy build {out}`"
        )
