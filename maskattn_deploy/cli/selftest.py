"""``maskattn-deploy selftest``: the one prepared GPU validation run (``--dry-run`` on a CPU)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("selftest")
@click.option("--gpu", is_flag=True, help="Require a CUDA GPU (the full-size run).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Same code paths at tiny sizes on the CPU (Triton interpreter, tiny UNet).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for results.json and results.md [default: benchmarks/<date>-<gpu-name>; "
    "--dry-run: <cache>/selftest/<date>-cpu-dry-run].",
)
@click.option(
    "--budget-s",
    type=click.FloatRange(min=0.0),
    default=480.0,
    show_default=True,
    help="Wall-clock budget; later parts are skipped rather than overrunning it.",
)
@click.option("--skip-compile", is_flag=True, help="Leave out the torch.compile variants.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of inputs and weights.")
def command(
    gpu: bool,
    dry_run: bool,
    out: Path | None,
    budget_s: float,
    skip_compile: bool,
    seed: int,
) -> None:
    """GPU validation run: environment, masked-softmax kernel, full-size SDXL UNet step.

    Writes results.json and results.md after every step. Without --gpu or --dry-run it runs
    on the GPU when one is visible. Exits 1 when a part failed or the kernel is incorrect.
    """
    from maskattn_deploy.bench.gpu_check import CheckConfig, run_check

    if gpu and dry_run:
        raise click.UsageError("--gpu and --dry-run exclude each other")
    config = CheckConfig(
        out=str(out) if out else None,
        dry_run=dry_run,
        budget_s=budget_s,
        skip_compile=skip_compile,
        seed=seed,
    )
    outcome = run_check(config, echo=click.echo)
    if not outcome.ok:
        raise SystemExit(1)  # not ctx.exit: main() runs click with standalone_mode=False
