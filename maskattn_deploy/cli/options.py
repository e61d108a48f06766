"""Click options shared by several commands (one definition, the same spelling everywhere)."""

from __future__ import annotations

from pathlib import Path

import click

ORT_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")

ort_provider_option = click.option(
    "--ort-provider",
    type=click.Choice(ORT_PROVIDERS),
    default="auto",
    show_default=True,
    help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu sees a GPU).",
)
json_option = click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write results as JSON."
)
report_option = click.option(
    "--report", "report_path", type=click.Path(path_type=Path), help="Write a Markdown report."
)
