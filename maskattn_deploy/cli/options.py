"""Click options shared by several commands (one definition, the same spelling everywhere)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

MODEL_HELP = "'tiny', a hub id, a diffusers folder or a .safetensors file."
GATES_HELP = "Gate checkpoint. Default for --model tiny: the seeded, untrained tiny gates."
NO_GATES_HELP = "Run the plain (ungated) model."


def model_choice_options(
    *,
    model_default: str | None = None,
    model_help: str = MODEL_HELP,
    gates_help: str = GATES_HELP,
    no_gates_help: str | None = NO_GATES_HELP,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model``, ``--gates`` and (unless ``no_gates_help`` is None) ``--no-gates``, handed to
    the command as one ``choice: ModelChoice`` (checked and resolved in
    :class:`~maskattn_deploy.models.choice.ModelChoice`)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(
            *args: Any, model: str | None, gates: Path | None, no_gates: bool = False, **kw: Any
        ) -> Any:
            from maskattn_deploy.models.choice import ModelChoice

            return func(*args, choice=ModelChoice(model, gates, no_gates), **kw)

        options = [
            click.option(
                "--model", default=model_default, show_default=model_default is not None,
                help=model_help,
            ),
            click.option("--gates", type=click.Path(path_type=Path), default=None, help=gates_help),
        ]  # fmt: skip
        if no_gates_help is not None:
            options.append(click.option("--no-gates", is_flag=True, help=no_gates_help))
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate
