"""``maskattn-deploy demo``: train, export, generate, parity and bench on the tiny model.

A thin layer: flags -> :class:`~maskattn_deploy.demo.DemoConfig` ->
:func:`~maskattn_deploy.demo.run_demo`. Exits 1 when parity fails (the report is still written).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out/demo"),
    show_default=True,
    help="Folder for images, mask pictures, the export and report.md.",
)
@click.option(
    "--train-steps",
    type=int,
    default=None,
    help="Gate training steps [default: the tiny-fitted recipe's 150].",
)
@click.option("--steps", type=int, default=8, show_default=True, help="Denoising steps per image.")
@click.option(
    "--gates",
    type=click.Path(path_type=Path),
    default=None,
    help="Skip training and use this gate checkpoint.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def command(
    out: Path, train_steps: int | None, steps: int, gates: Path | None, overwrite: bool
) -> None:
    """Run the whole job on the built-in tiny model and write OUT/report.md.

    Trains gates (tiny-fitted recipe: the tiny model fitted to use its text), exports to ONNX, generates images with ONNX Runtime
    (and TensorRT when present) with mask pictures, checks parity against PyTorch and runs a
    short benchmark. No GPU or network needed.
    """
    from maskattn_deploy.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=out, train_steps=train_steps, steps=steps, gates=gates, overwrite=overwrite
    )
    result = run_demo(config, say=lambda line: click.echo(line, err=True))
    click.echo(f"report: {result.report}")
    if result.parity is not None:
        click.echo(result.parity.summary())
        if not result.parity.passed:
            raise SystemExit(1)
