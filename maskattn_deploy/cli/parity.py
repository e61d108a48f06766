"""``maskattn-deploy parity``: compare backends against the PyTorch reference.

A thin layer: flags -> :class:`~maskattn_deploy.parity.run.ParityConfig` ->
:func:`~maskattn_deploy.parity.run.run_parity`; prints one line per output with its verdict,
writes ``--json`` / ``--report`` and exits 1 when any check failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from maskattn_deploy.cli.options import (
    json_option,
    model_choice_options,
    ort_provider_option,
    report_option,
)

if TYPE_CHECKING:
    from maskattn_deploy.models.choice import ModelChoice


def _csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


@click.command("parity")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option(
    "--backends",
    default="torch,onnxruntime,tensorrt",
    show_default=True,
    help="Comma-separated backends; torch fp32 is always the reference, unavailable ones are SKIPPED.",
)
@click.option(
    "--components",
    default=None,
    help="Comma-separated components (default: every exported one), e.g. unet,text_encoder.",
)
@click.option(
    "--shapes",
    default=None,
    help="BATCHxHEIGHTxWIDTH in pixels, comma-separated (default: the export recipe's optimum).",
)
@click.option(
    "--per-layer",
    is_flag=True,
    help="Require per-layer outputs (export --per-layer): gate agreement and first bad layer.",
)
@click.option("--steps", type=int, default=4, show_default=True, help="End-to-end run steps.")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end image comparison.")
@click.option("--seed", type=int, default=0, show_default=True)
@model_choice_options(
    model_help="Override the model spec recorded in the export.",
    gates_help="Override the gate checkpoint recorded in the export.",
    no_gates_help=None,
)
@click.option("--device", default=None, help="Reference device (default: cuda when available).")
@ort_provider_option
@json_option
@report_option
def command(
    export_dir: Path,
    backends: str,
    components: str | None,
    shapes: str | None,
    per_layer: bool,
    steps: int,
    no_e2e: bool,
    seed: int,
    choice: ModelChoice,
    device: str | None,
    ort_provider: str,
    json_path: Path | None,
    report_path: Path | None,
) -> None:
    """Prove every backend matches the PyTorch fp32 reference on EXPORT_DIR.

    Same seeded inputs per component, per-output max/mean abs, relative L2 and cosine against
    one tolerance table; gate agreement per gated layer and the first layer beyond tolerance
    when the export has per-layer outputs; PSNR of an end-to-end run with the same seed.
    Exits 1 when any check fails.
    """
    from maskattn_deploy.parity.inputs import parse_shapes
    from maskattn_deploy.parity.report import parity_markdown
    from maskattn_deploy.parity.run import ParityConfig, run_parity
    from maskattn_deploy.utils import atomic_path, write_json_atomic

    config = ParityConfig(
        export_dir=export_dir,
        backends=_csv(backends) or (),
        components=_csv(components),
        shapes=parse_shapes(shapes) if shapes else None,
        per_layer=per_layer,
        end_to_end=not no_e2e,
        steps=steps,
        seed=seed,
        model=choice.model,
        gates=choice.gates,
        device=device,
        ort_provider=ort_provider,
    )
    result = run_parity(config, say=click.echo)
    if json_path is not None:
        write_json_atomic(json_path, result.as_dict())
        click.echo(f"wrote {json_path}")
    if report_path is not None:
        with atomic_path(report_path) as tmp:
            tmp.write_text(parity_markdown(result))
        click.echo(f"wrote {report_path}")
    click.echo(result.summary())
    if not result.passed:
        raise SystemExit(1)
