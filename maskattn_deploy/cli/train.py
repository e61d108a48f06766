"""``maskattn-deploy train``: learn MaskAttn gate heads with the SDXL backbone frozen."""

from __future__ import annotations

import click

EPILOG = """\b
Examples:
  maskattn-deploy train --recipe tiny-synthetic --out runs/tiny
  maskattn-deploy train --recipe sdxl-coco-512 --out runs/512 \\
      --data coco:annotations/captions_train2017.json:train2017 optim.lr=2e-4
  accelerate launch --num_processes 8 -m maskattn_deploy.cli.main train \\
      --recipe sdxl-coco-512 --out runs/512 --data coco:...

\b
Overrides are KEY=VALUE with KEY = section.name (or a unique name), typed by the recipe:
  train.steps=500  train.batch_size=4  optim.lr=1e-3  optim.betas=0.9,0.99
  data.resolution=512  data.cache=latents  gates.stage=all  log.every=50
--max-steps stops early without changing the learning-rate schedule; --resume continues.
"""


@click.command(
    "train",
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--recipe",
    "-r",
    required=True,
    help="Recipe name in train/ (tiny-synthetic, sdxl-coco-512, ...) or a .toml file.",
)
@click.option(
    "--out",
    "-o",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder: checkpoints, metrics, final gates.",
)
@click.option(
    "--model",
    "-m",
    default=None,
    help="tiny | tiny-fitted | hub id | diffusers folder | .safetensors file (overrides the recipe).",
)
@click.option(
    "--data",
    "-d",
    default=None,
    help="Data spec: synthetic:N[:SEED], coco:ANN.json:IMAGES, manifest:FILE, folder:DIR.",
)
@click.option(
    "--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint."
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Stop at this global step (schedule unchanged; resume later).",
)
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the run summary to this JSON file.",
)
@click.argument("overrides", nargs=-1)
def command(
    recipe: str,
    out_dir: str,
    model: str | None,
    data: str | None,
    resume: bool,
    max_steps: int | None,
    cpu: bool,
    json_out: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Train MaskAttn gate heads with the SDXL backbone frozen.

    OVERRIDES are KEY=VALUE settings applied on top of the recipe.
    """
    from maskattn_deploy.train.config import load_train_config

    extra = list(overrides)
    if model is not None:
        extra.append(f"model={model}")
    if data is not None:
        extra.append(f"data.spec={data}")
    config = load_train_config(recipe, extra)

    from maskattn_deploy.train.loop import run_training

    result = run_training(config, out_dir, resume=resume, max_steps=max_steps, cpu=cpu)
    if not _is_main():  # under accelerate launch only process 0 reports
        return
    _print_summary(result)
    if json_out:
        from dataclasses import asdict

        from maskattn_deploy.utils import write_json_atomic

        write_json_atomic(json_out, asdict(result))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") in ("0", "")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(result) -> None:  # result: TrainResult
    state = (
        "complete" if result.complete else f"stopped at step {result.step} (resume with --resume)"
    )
    opens = ", ".join(
        f"{stage} {result.open_start.get(stage, float('nan')):.3f} -> {value:.3f}"
        for stage, value in result.open_end.items()
    )
    rows = [
        ("steps", f"{result.step}/{result.total_steps} ({state})"),
        ("this run", f"{result.steps_this_run} steps in {result.train_s:.1f} s "
                     f"(wall {result.wall_s:.1f} s incl. setup)"),
        ("throughput", f"{result.steps_per_s:.2f} steps/s, {result.images_per_s:.1f} images/s "
                       f"on {result.device} x{result.world} ({result.precision})"),
        ("train loss", f"{_fmt(result.loss_first)} -> {_fmt(result.loss_last)}"),
        ("eval loss", f"{_fmt(result.eval_loss_start, '.5f')} -> {_fmt(result.eval_loss_end, '.5f')}"),
        ("open gates", opens or "-"),
        ("skipped", ", ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "none"),
        ("checkpoint", result.checkpoint or "-"),
        ("gates", result.gates_dir),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
