"""``maskattn-deploy export-triton``: a self-contained Triton model repository for an export.

The repository is what NVIDIA's ``tritonserver`` container loads unchanged: the pipeline as a
Python-backend model (with the export inside it), plus, when the export has TensorRT engines
and the backend is tensorrt, one ``tensorrt_plan`` model per engine that the pipeline calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from maskattn_deploy.cli.serve import serve_config, serving_options


@click.command("export-triton")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Repository folder.")
@click.option(
    "--split-components",
    is_flag=True,
    help="onnxruntime: serve each network as its own model (called over BLS, scaled apart).",
)
@serving_options
def command(export_dir: Path, out: Path, split_components: bool, **flags: Any) -> None:
    """Write a Triton model repository for EXPORT_DIR into --out.

    Serve it with NVIDIA's container (docs/serving.md), e.g.
    tritonserver --model-repository=/models, after pip install 'maskattn-deploy[serve]' in the
    container's Python.
    """
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.serve.repository import model_names, write_repository

    ExportFolder.open(export_dir)
    if flags["backend"] is None:
        flags["backend"] = (
            "tensorrt" if any((export_dir / "engines").glob("*.engine")) else "onnxruntime"
        )
    if flags["backend"] == "torch":
        from maskattn_deploy.errors import UserError

        raise UserError(
            "export-triton packs an export for onnxruntime or tensorrt; serve the torch "
            "reference with maskattn-deploy serve --backend torch"
        )
    config = serve_config(**flags)
    config.split_components = split_components
    repo = write_repository(out, export_dir, config, copy_export=True, say=lambda _: None)
    click.echo(f"wrote {repo}: {', '.join(model_names(repo))} (backend {config.backend})")
