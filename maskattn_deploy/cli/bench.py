"""``maskattn-deploy bench``: UNet step latency per backend, masked vs unmasked, pipeline, memory.

A thin layer: flags -> :class:`~maskattn_deploy.bench.run.BenchConfig` ->
:func:`~maskattn_deploy.bench.run.run_bench`; prints the tables, writes ``--json`` /
``--report``.
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


@click.command("bench")
@click.argument("export_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--backends",
    default="torch,onnxruntime,tensorrt",
    show_default=True,
    help="Comma-separated; unavailable ones are reported as SKIPPED with the reason.",
)
@click.option(
    "--shapes",
    default=None,
    help="BATCHxHEIGHTxWIDTH in pixels, comma-separated (default: the export's optimum, "
    "else 2x256x256). Batch counts UNet rows: CFG with one image is 2.",
)
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed UNet repeats.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up runs.")
@click.option("--steps", type=int, default=4, show_default=True, help="End-to-end steps.")
@click.option("--e2e-repeats", type=int, default=3, show_default=True)
@click.option("--no-e2e", is_flag=True, help="Only the UNet step.")
@click.option("--no-unmasked", is_flag=True, help="Skip the plain (ungated) UNet.")
@click.option(
    "--unmasked-export",
    type=click.Path(path_type=Path),
    default=None,
    help="Export of the same model without gates (default: exported once into the cache).",
)
@model_choice_options(
    model_help="Model spec (default: the export's, else tiny). 'sdxl-random': the full-size SDXL "
    "UNet with random weights built on the GPU (torch UNet step only, no download).",
    gates_help="Gate checkpoint.",
    no_gates_help=None,
)
@click.option("--precision", type=click.Choice(("fp32", "fp16")), default=None)
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime.")
@click.option("--device", default=None, help="torch device (default: cuda when available).")
@click.option(
    "--gate-head",
    is_flag=True,
    help="Only the gate heads on the torch UNet: their cost per forward and per UNet step "
    "before/after the per-forward text cache and with the latent MLP in the activation dtype "
    "(interleaved pairs), and the gate flips that dtype causes vs the fp32 head.",
)
@ort_provider_option
@json_option
@report_option
def command(
    export_dir: Path | None,
    backends: str,
    shapes: str | None,
    repeats: int,
    warmup: int,
    steps: int,
    e2e_repeats: int,
    no_e2e: bool,
    no_unmasked: bool,
    unmasked_export: Path | None,
    choice: ModelChoice,
    precision: str | None,
    threads: int | None,
    device: str | None,
    gate_head: bool,
    ort_provider: str,
    json_path: Path | None,
    report_path: Path | None,
) -> None:
    """Benchmark the UNet step (masked and unmasked, interleaved) and the pipeline.

    Without EXPORT_DIR it runs the built-in tiny model (its export is made once into the cache).
    On a GPU, pass an fp16 export of SDXL (see docs/parity-and-bench.md) for the full-size figures.
    """
    from maskattn_deploy.bench.report import bench_markdown, bench_text
    from maskattn_deploy.bench.run import BenchConfig, run_bench
    from maskattn_deploy.parity.inputs import parse_shapes
    from maskattn_deploy.utils import atomic_path, write_json_atomic

    if gate_head:
        _gate_head(
            choice.model, choice.gates, shapes, precision, repeats, warmup, device, json_path
        )
        return
    config = BenchConfig(
        export_dir=export_dir,
        unmasked_export_dir=unmasked_export,
        model=choice.model,
        gates=choice.gates,
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        shapes=parse_shapes(shapes) if shapes else None,
        precision=precision,
        repeats=repeats,
        warmup=warmup,
        steps=steps,
        e2e_repeats=e2e_repeats,
        end_to_end=not no_e2e,
        unmasked=not no_unmasked,
        threads=threads,
        device=device,
        ort_provider=ort_provider,
    )
    result = run_bench(config, say=lambda line: click.echo(line, err=True))
    click.echo(bench_text(result))
    if json_path is not None:
        write_json_atomic(json_path, result.as_dict())
        click.echo(f"wrote {json_path}")
    if report_path is not None:
        with atomic_path(report_path) as tmp:
            tmp.write_text(bench_markdown(result))
        click.echo(f"wrote {report_path}")
    if not result.unet:
        click.echo("nothing was measured: every backend was skipped (reasons above)", err=True)
        raise SystemExit(1)


def _gate_head(
    model: str | None,
    gates: Path | None,
    shapes: str | None,
    precision: str | None,
    repeats: int,
    warmup: int,
    device: str | None,
    json_path: Path | None,
) -> None:
    """``bench --gate-head``: the gate heads' cost before/after and their gate flips."""
    from maskattn_deploy.bench.gate_head import GateHeadConfig, run_gate_head_bench
    from maskattn_deploy.parity.inputs import parse_shapes
    from maskattn_deploy.utils import write_json_atomic

    config = GateHeadConfig(
        model=model or "tiny", gates=gates, precision=precision, repeats=repeats,
        warmup=warmup, device=device,
    )  # fmt: skip
    if shapes:
        config.case = parse_shapes(shapes)[0]
    result = run_gate_head_bench(config, say=lambda line: click.echo(line, err=True))
    click.echo(result.text())
    if json_path is not None:
        write_json_atomic(json_path, result.as_dict())
        click.echo(f"wrote {json_path}")
