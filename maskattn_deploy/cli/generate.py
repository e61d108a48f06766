"""``maskattn-deploy generate``: prompt in, PNGs out, via ONNX Runtime, TensorRT or PyTorch.

A thin layer: flags -> :class:`~maskattn_deploy.runtime.api.GenerateOptions` ->
:func:`~maskattn_deploy.runtime.api.run_generate`; prints the files, the timing table and
writes ``--json``. Heavy imports happen inside the command so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from maskattn_deploy.cli.options import model_choice_options, ort_provider_option

if TYPE_CHECKING:
    from maskattn_deploy.models.choice import ModelChoice

BACKEND_CHOICES = ("onnxruntime", "torch", "tensorrt")
SCHEDULER_CHOICES = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "heun")


@click.command("generate")
@click.argument("prompt", required=False)
@click.option(
    "--batch-file",
    type=click.Path(path_type=Path),
    help="Prompts file, one request per line (plain prompt or JSON object); requests that share "
    "size and steps run through one UNet call per step. Seeds: --seed + request number.",
)
@click.option(
    "--negative-prompt",
    default="",
    help="What to steer away from (empty: zero embeddings, as SDXL).",
)
@click.option(
    "--backend",
    default="onnxruntime",
    show_default=True,
    help="onnxruntime | torch | tensorrt.",
)
@click.option(
    "--export-dir",
    type=click.Path(path_type=Path),
    help="Export folder (maskattn-deploy export). Default for onnxruntime: the tiny model, exported once into the cache.",
)
@model_choice_options(
    model_help="'tiny', a diffusers folder, a .safetensors file or a hub id (torch backend; "
    "checked against --export-dir).",
    gates_help="Gate checkpoint (default for tiny: its seeded, untrained gates).",
    no_gates_help="Run the plain model without MaskAttn gates.",
)
@click.option(
    "--steps", type=int, default=None, help="Denoising steps (default: 8 for tiny, 30 otherwise)."
)
@click.option(
    "--guidance",
    type=float,
    default=5.0,
    show_default=True,
    help="Classifier-free guidance scale (<= 1 turns it off).",
)
@click.option(
    "--scheduler", type=click.Choice(SCHEDULER_CHOICES), default="euler", show_default=True
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Same seed, same image on every backend."
)
@click.option(
    "--height",
    type=int,
    default=None,
    help="Pixels, multiple of 8 (default: the model's / export's size).",
)
@click.option(
    "--width",
    type=int,
    default=None,
    help="Pixels, multiple of 8 (default: the model's / export's size).",
)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out/images"),
    show_default=True,
    help="Folder for the PNGs.",
)
@click.option(
    "--save-masks",
    is_flag=True,
    help="Also write, per gated stage, a grid of where each prompt token may attend.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write settings, files and timings as JSON.",
)
@click.option(
    "--warmup", is_flag=True, help="Run a short untimed pass first (steady-state timings)."
)
@ort_provider_option
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="tensorrt: capture the UNet step in a CUDA graph (static shapes).",
)
@click.option(
    "--device", default=None, help="torch backend device (default: cuda when available, else cpu)."
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(["default", "reduce-overhead"]),
    is_flag=False,
    flag_value="default",
    default=None,
    help="torch backend: run the UNet through torch.compile (--compile alone: mode default; "
    "reduce-overhead adds CUDA graphs on CUDA). The first step compiles; its time is printed.",
)
@click.option("--no-progress", is_flag=True, help="Hide the per-step progress bar.")
def command(
    prompt: str | None,
    batch_file: Path | None,
    negative_prompt: str,
    backend: str,
    export_dir: Path | None,
    choice: ModelChoice,
    steps: int | None,
    guidance: float,
    scheduler: str,
    seed: int,
    height: int | None,
    width: int | None,
    num_images: int,
    out: Path,
    save_masks: bool,
    json_path: Path | None,
    warmup: bool,
    ort_provider: str,
    cuda_graph: bool,
    device: str | None,
    compile_mode: str | None,
    no_progress: bool,
) -> None:
    """Generate images from PROMPT (or every line of --batch-file) via ONNX Runtime (default),
    TensorRT or PyTorch.

    With no options it runs the built-in tiny model on the CPU, so it works on a fresh machine.
    Each PNG carries its settings (prompt, seed, steps, backend, model and gate hashes...) in
    its metadata.
    """
    from maskattn_deploy.errors import UserError
    from maskattn_deploy.runtime.api import GenerateOptions, run_generate

    if (prompt is None) == (batch_file is None):
        raise UserError("pass either a PROMPT or --batch-file FILE")
    options = GenerateOptions(
        prompt=prompt or "",
        negative_prompt=negative_prompt,
        backend=backend,
        export_dir=export_dir,
        model=choice.model,
        gates=choice.gates,
        no_gates=choice.no_gates,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        seed=seed,
        height=height,
        width=width,
        num_images=num_images,
        out=out,
        save_masks=save_masks,
        json_path=json_path,
        warmup=warmup,
        ort_provider=ort_provider,
        cuda_graph=cuda_graph,
        device=device,
        compile_mode=compile_mode,
        progress=not no_progress,
    )
    if batch_file is not None:
        _run_batch_file(options, batch_file)
        return
    report = run_generate(options, say=lambda line: click.echo(line, err=True))
    for path in report.images:
        click.echo(f"wrote {path}")
    for path in report.mask_grids:
        click.echo(f"wrote {path}")
    for note in report.notes:
        click.echo(f"note: {note}")
    parts = ", ".join(f"{name}: {how}" for name, how in report.backend.items())
    click.echo(f"backend {options.backend} ({parts})")
    click.echo(report.result.timings.table())
    if json_path is not None:
        click.echo(f"wrote {json_path}")


def _run_batch_file(options, batch_file: Path) -> None:
    from maskattn_deploy.runtime.batch_file import run_generate_batch

    report = run_generate_batch(options, batch_file, say=lambda line: click.echo(line, err=True))
    for path in report.images:
        click.echo(f"wrote {path}")
    count = len(report.results)
    sizes = ", ".join(str(len(batch)) for batch in report.batches)
    click.echo(
        f"{count} request(s) in {len(report.batches)} batch(es) of {sizes}: "
        f"{report.seconds:.2f} s, {report.seconds / count * 1e3:.0f} ms per request"
    )
    if options.json_path is not None:
        click.echo(f"wrote {options.json_path}")
