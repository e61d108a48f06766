"""``maskattn-deploy build EXPORT_DIR``: TensorRT engines for an export folder.

The GPU/TensorRT check runs first and needs neither torch nor TensorRT, so on a machine
without them the command fails in well under a second with one line saying what to install.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("build")
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--recipe", default=None, help="Export recipe name or .toml path (default: the export's own)."
)
@click.option(
    "--components",
    default=None,
    help="Comma-separated components, e.g. unet,vae_decoder (default: all).",
)
@click.option(
    "--workspace-gib",
    type=click.FloatRange(0, 4096, min_open=True),
    default=None,
    help="Builder workspace limit in GiB (default: recipe).",
)
@click.option(
    "--opt-level",
    type=click.IntRange(0, 5),
    default=None,
    help="Builder optimization level 0-5 (default: recipe).",
)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Timing cache file reused across builds (default: EXPORT_DIR/engines/timing.cache).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Engine folder (default: EXPORT_DIR/engines).",
)
@click.option(
    "--kernel-tiling",
    default=None,
    metavar="ROWS,WARPS[,HEADS]",
    help="Masked-softmax kernel tiling, e.g. the one `selftest --gpu` chose (default: the kernel's).",
)
def command(
    export_dir: Path,
    recipe: str | None,
    components: str | None,
    workspace_gib: float | None,
    opt_level: int | None,
    timing_cache: Path | None,
    out: Path | None,
    kernel_tiling: str | None,
) -> None:
    """Build TensorRT engines from an export folder."""
    from maskattn_deploy.engine.cuda_check import require_tensorrt_and_gpu
    from maskattn_deploy.export.folder import ExportFolder

    tiling = _parse_tiling(kernel_tiling) if kernel_tiling else None
    ExportFolder.open(export_dir)  # a missing or corrupt export is named before TensorRT
    require_tensorrt_and_gpu()  # fast: before the builder's heavy imports
    from maskattn_deploy.engine.builder import BuildOptions, build_engines

    names = [c.strip() for c in components.split(",") if c.strip()] if components else None
    options = BuildOptions(
        out=out, workspace_gib=workspace_gib, opt_level=opt_level, timing_cache=timing_cache,
        components=names, kernel_tiling=tiling,
    )  # fmt: skip
    paths = build_engines(
        export_dir, recipe=recipe, options=options, progress=lambda msg: click.echo(msg, err=True)
    )
    for path in paths:
        click.echo(str(path))


def _parse_tiling(text: str) -> tuple[int, int, int]:
    """``"4,1"`` or ``"4,1,2"`` -> (rows, num_warps, heads); a usage error otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or min(values) < 1:
        raise click.BadParameter(
            f"expected ROWS,WARPS[,HEADS] with positive integers, got {text!r}",
            param_hint="--kernel-tiling",
        )
    rows, warps, *heads = values
    return rows, warps, heads[0] if heads else 1
