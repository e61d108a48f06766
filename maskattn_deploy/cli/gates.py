"""``maskattn-deploy gates``: inspect and import gate checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("gates")
def command() -> None:
    """Inspect and import gate checkpoints."""


@command.command("info")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(checkpoint: Path, as_json: bool) -> None:
    """Format, placement, layers, parameter count and source of CHECKPOINT."""
    from maskattn_deploy.gating.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    summary = {
        "path": str(checkpoint),
        "source_format": ckpt.source,
        "config": ckpt.config.to_dict(),
        "layers": len(ckpt.layer_to_head),
        "heads": len(set(ckpt.layer_to_head.values())),
        "parameters": ckpt.num_parameters,
        "unet_fingerprint": ckpt.unet_fingerprint,
        "step": ckpt.step,
        "sha256": ckpt.sha256,
        "metadata": ckpt.metadata,
    }
    if as_json:
        click.echo(json.dumps(summary | {"layer_to_head": ckpt.layer_to_head}, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:<17} {value}")
    click.echo("gated layers")
    for layer, head in ckpt.layer_to_head.items():
        click.echo(f"  {layer}  -> {head} ({ckpt.layer_stage.get(layer, '?')})")


@command.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--model", default=None, help="Model the gates belong to (records its UNet fingerprint)."
)
def import_(path: Path, out: Path, model: str | None) -> None:
    """Convert a reference gate_final.pt (maskattn-sdxl-gates-v1) into our format."""
    from maskattn_deploy.gating.checkpoint import import_reference_checkpoint, write_checkpoint

    ckpt = import_reference_checkpoint(path)
    if model is not None:
        from maskattn_deploy.gating.checkpoint import load_gates
        from maskattn_deploy.models import load_pipeline, unet_fingerprint

        unet = load_pipeline(model).unet
        load_gates(ckpt, unet)  # validates layers and shapes against the model
        ckpt.unet_fingerprint = unet_fingerprint(unet)
    write_checkpoint(ckpt, out)
    click.echo(f"wrote {out} ({len(ckpt.layer_to_head)} layers, {ckpt.num_parameters} parameters)")
    if ckpt.unet_fingerprint is None:
        click.echo("note: the reference format has no UNet fingerprint; pass --model to record one")
