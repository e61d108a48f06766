"""``maskattn-deploy demo``: the whole job on the built-in tiny model, in one folder.

Stages (each prints one line with the elapsed time when it ends)::

    train     gates on the tiny-fitted recipe (the tiny model with a UNet fitted to use its
              text, and the relaxed gate estimator: the held-out loss falls)
    export    the gated pipeline to ONNX, with per-layer outputs for gate agreement
    generate  a few images through ONNX Runtime (and TensorRT when present) + mask pictures
    parity    every backend against the torch fp32 reference
    bench     a short UNet / pipeline benchmark, masked vs unmasked
    report    OUT/report.md with all of the above

It is the README's first command and CI's end-to-end proof; on 2 CPU cores it takes a few
minutes. Nothing here is special-cased for the demo: each stage calls the same library
function as its own command.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError

log = logging.getLogger(__name__)

Say = Callable[[str], None]
TINY = "tiny"
# The random tiny model's denoising loss does not depend on its gates, so training it shows a
# flat loss; the fitted tiny backbone uses its text and its held-out loss falls (train/tiny-fitted.toml).
TRAIN_RECIPE = "tiny-fitted"
TRAIN_MODEL = "tiny-fitted"
REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.json"
PROMPTS: tuple[str, ...] = (
    "a red circle left of a blue square",
    "a green triangle above a yellow circle",
)


@dataclass
class DemoConfig:
    """What the demo runs (the CLI builds it from flags)."""

    out: Path = Path("out/demo")
    model: str = TRAIN_MODEL  # the model trained, exported and served
    train_steps: int | None = None  # None: the recipe's (150 steps, ~20 s on 2 cores)
    steps: int = 8  # denoising steps of the demo images
    prompts: tuple[str, ...] = PROMPTS
    bench_repeats: int = 5
    overwrite: bool = False
    gates: Path | None = None  # skip training and use these gates

    def __post_init__(self) -> None:
        from maskattn_deploy.checks import check_int
        from maskattn_deploy.runtime.limits import MAX_STEPS

        if self.train_steps is not None:
            check_int("train_steps", self.train_steps, 1, 1_000_000)
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("bench_repeats", self.bench_repeats, 1, 100_000)


@dataclass
class StageTime:
    name: str
    seconds: float
    detail: str = ""
    cpu_seconds: float = 0.0  # process CPU time (all threads): the work, without waiting


@dataclass
class DemoResult:
    """Where everything went and how long each stage took."""

    out: Path
    stages: list[StageTime] = field(default_factory=list)
    gates_dir: Path | None = None
    export_dir: Path | None = None
    images: list[Path] = field(default_factory=list)
    mask_grids: list[Path] = field(default_factory=list)
    train: Any = None
    parity: Any = None
    bench: Any = None
    generate_notes: list[str] = field(default_factory=list)
    tensorrt: str = ""
    report: Path | None = None

    @property
    def total_s(self) -> float:
        return sum(s.seconds for s in self.stages)


class _Stages:
    """Times stages and prints ``[  12.3s] name: detail`` lines as they finish."""

    def __init__(self, say: Say, result: DemoResult) -> None:
        self.say, self.result, self.t0 = say, result, time.perf_counter()

    def run(self, name: str, fn: Callable[[], str]) -> None:
        self.say(f"[{time.perf_counter() - self.t0:6.1f}s] {name} ...")
        tic, cpu = time.perf_counter(), time.process_time()
        detail = fn()
        seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
        self.result.stages.append(StageTime(name, seconds, detail, cpu))
        self.say(
            f"[{time.perf_counter() - self.t0:6.1f}s] {name} done in {seconds:.1f}s "
            f"(CPU {cpu:.1f}s): {detail}"
        )


def _prepare_out(config: DemoConfig) -> Path:
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise UserError(
                f"{out} already exists and is not empty; pass overwrite or another out",
                params=("overwrite", "out"),
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {out}: {exc.strerror}; choose a writable out", params=("out",)
        ) from exc
    return out


def run_demo(config: DemoConfig, say: Say = print) -> DemoResult:
    """Run every stage and write ``OUT/report.md``; returns what was written."""
    out = _prepare_out(config)
    result = DemoResult(out)
    stages = _Stages(say, result)
    stages.run("train", lambda: _train(config, result))
    stages.run("export", lambda: _export(config, result, say))
    stages.run("generate", lambda: _generate(config, result, say))
    stages.run("parity", lambda: _parity(result, say))
    stages.run("bench", lambda: _bench(config, result, say))
    stages.run("report", lambda: _report(result))
    say(f"demo finished in {result.total_s:.1f}s: {result.report}")
    return result


# --------------------------------------------------------------------------- stages


def _train(config: DemoConfig, result: DemoResult) -> str:
    if config.gates is not None:
        result.gates_dir = Path(config.gates)
        return f"using given gates {config.gates}"
    from maskattn_deploy.train.config import apply_overrides, load_train_config
    from maskattn_deploy.train.loop import run_training

    train_config = load_train_config(TRAIN_RECIPE, [f"model={config.model}"])
    steps = config.train_steps or train_config.train.steps
    overrides = [
        f"train.steps={steps}",
        f"log.eval_every={steps}",
        f"log.checkpoint_every={steps}",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    if config.train_steps is not None:
        overrides.append(f"optim.warmup_steps={max(1, min(10, steps // 4))}")
    apply_overrides(train_config, overrides)
    train = run_training(train_config.validate(), result.out / "train", cpu=True)
    result.train = train
    result.gates_dir = Path(train.gates_dir)
    opened = ", ".join(f"{k} {v:.0%}" for k, v in train.open_end.items())
    return (
        f"{train.step} steps; {heldout_loss_text(train)}; open gates {opened}; "
        f"gates in {train.gates_dir}"
    )


def heldout_loss_text(train: Any) -> str:
    """What the training number means, in one phrase."""
    start, end = train.eval_loss_start, train.eval_loss_end
    if start is None or end is None:
        return "no held-out loss measured"
    change = (end - start) / start * 100 if start else 0.0
    return (
        f"held-out loss {start:.4f} -> {end:.4f} ({change:+.2f} %; the denoising loss on "
        "held-out images, lower = the gates help the frozen model)"
    )


def _export(config: DemoConfig, result: DemoResult, say: Say) -> str:
    from maskattn_deploy.export import export_pipeline
    from maskattn_deploy.export.folder import ExportFolder

    target = result.out / "export"
    # Validation is left to the parity stage, which checks the same things and more.
    export_pipeline(
        config.model,
        result.gates_dir,
        target,
        recipe=TINY,
        per_layer=True,
        overwrite=True,
        validate=False,
        progress=lambda line: say(f"{'':10}{line}"),
    )
    result.export_dir = target
    components = ExportFolder.open(target).manifest.components
    return f"{', '.join(components)} -> {target}"


def _generate(config: DemoConfig, result: DemoResult, say: Say) -> str:
    from maskattn_deploy.engine.cuda_check import missing_for_tensorrt
    from maskattn_deploy.runtime.api import GenerateOptions, run_generate

    backends = ["onnxruntime"]
    why_not = missing_for_tensorrt()
    if why_not is None:
        _build_engines(result, say)
        backends.append("tensorrt")
        result.tensorrt = "engines built and used"
    else:
        result.tensorrt = f"skipped: {why_not}"
    for backend in backends:
        for index, prompt in enumerate(config.prompts):
            report = run_generate(
                GenerateOptions(
                    prompt=prompt,
                    backend=backend,
                    export_dir=result.export_dir,
                    gates=result.gates_dir,
                    steps=config.steps,
                    seed=index,
                    out=result.out / "images" / backend,
                    save_masks=True,
                    progress=False,
                ),
                say=say,
            )
            result.images += report.images
            result.mask_grids += report.mask_grids
            result.generate_notes += [n for n in report.notes if n not in result.generate_notes]
    return f"{len(result.images)} images, {len(result.mask_grids)} mask pictures ({', '.join(backends)})"


def _build_engines(result: DemoResult, say: Say) -> None:
    """TensorRT engines for the export (only reached when TensorRT and a GPU are present)."""
    from maskattn_deploy.engine.builder import build_engines

    say("building TensorRT engines (TensorRT and a GPU are present)")
    build_engines(result.export_dir, progress=lambda line: say(f"{'':10}{line}"))


def _parity(result: DemoResult, say: Say) -> str:
    from maskattn_deploy.parity.run import ParityConfig, run_parity

    parity = run_parity(
        ParityConfig(
            export_dir=result.export_dir,
            backends=("torch", "onnxruntime", "tensorrt"),
            per_layer=True,
            gates=result.gates_dir,
        ),
        say=lambda line: say(f"{'':10}{line}"),
    )
    result.parity = parity
    return parity.summary()


def _bench(config: DemoConfig, result: DemoResult, say: Say) -> str:
    from maskattn_deploy.bench.run import BenchConfig, run_bench

    bench = run_bench(
        BenchConfig(
            export_dir=result.export_dir,
            gates=result.gates_dir,
            backends=("torch", "onnxruntime", "tensorrt"),
            repeats=config.bench_repeats,
            warmup=1,
            steps=4,
            e2e_repeats=1,
            export_unmasked=False,  # a second UNet export would double the export stage
        ),
        say=lambda line: say(f"{'':10}{line}"),
    )
    result.bench = bench
    ratios = ", ".join(f"{u.backend} {u.ratio:.2f}" for u in bench.unet if u.ratio is not None)
    steps = ", ".join(f"{u.backend} {u.masked.median * 1e3:.0f} ms" for u in bench.unet)
    return f"UNet step {steps}; masked/unmasked {ratios or 'n/a'}"


def _report(result: DemoResult) -> str:
    from maskattn_deploy.utils import atomic_path, write_json_atomic

    path = result.out / REPORT_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(demo_markdown(result))
    write_json_atomic(result.out / SUMMARY_NAME, _summary(result))
    result.report = path
    return str(path)


def _summary(result: DemoResult) -> dict[str, Any]:
    return {
        "stages": {s.name: round(s.seconds, 2) for s in result.stages},
        "stages_cpu": {s.name: round(s.cpu_seconds, 2) for s in result.stages},
        "images": [str(p) for p in result.images],
        "mask_grids": [str(p) for p in result.mask_grids],
        "gates": str(result.gates_dir),
        "export": str(result.export_dir),
        "parity": result.parity.as_dict() if result.parity is not None else None,
        "bench": result.bench.as_dict() if result.bench is not None else None,
        "tensorrt": result.tensorrt,
    }


# --------------------------------------------------------------------------- report


def demo_markdown(result: DemoResult) -> str:
    """``report.md``: stages and times, images and mask pictures, parity verdicts, timings."""
    from maskattn_deploy.bench.report import bench_markdown
    from maskattn_deploy.parity.report import machine_line, md_table, parity_markdown

    out = [
        "# maskattn-deploy demo",
        "",
        f"Built-in tiny SDXL-shaped model, trained gates, ONNX export, ONNX Runtime images, "
        f"parity against the torch reference, and a short benchmark. Machine: {machine_line()}.",
        "",
        "## Stages",
        "",
        md_table(
            ["stage", "seconds", "CPU seconds", "result"],
            [[s.name, f"{s.seconds:.1f}", f"{s.cpu_seconds:.1f}", s.detail] for s in result.stages],
        ),
        "",
        f"Total: {result.total_s:.1f} s. TensorRT: {result.tensorrt or 'not tried'}.",
        "",
    ]
    out += _train_section(result)
    out += _images_section(result)
    if result.parity is not None:
        out += [_demote(parity_markdown(result.parity, title="Parity"))]
    if result.bench is not None:
        out += ["", bench_markdown(result.bench, title="Benchmark (short)", level=2)]
    return "\n".join(out) + "\n"


def _demote(markdown: str) -> str:
    """Nest a stand-alone report one heading level deeper."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _train_section(result: DemoResult) -> list[str]:
    train = result.train
    if train is None:
        return ["## Gates", "", f"Given: `{result.gates_dir}`", ""]
    return [
        f"## Gate training ({TRAIN_RECIPE} recipe)",
        "",
        "The tiny model with a UNet fitted to use its text, synthetic shapes at 64 px, gates on "
        "the high stage, relaxed gate estimator. The held-out loss is the denoising loss on a "
        "fixed batch of images the training never sees: lower means the gates help the frozen "
        "model predict the noise. It is a toy-scale check that training learns, not a quality "
        "figure.",
        "",
        f"- steps: {train.step} ({train.train_s:.1f} s, {train.images_per_s:.2f} images/s)",
        f"- {heldout_loss_text(train)}",
        f"- open gates per stage: start {_fractions(train.open_start)}, end {_fractions(train.open_end)}",
        f"- gates: `{_rel(result, Path(train.gates_dir))}`",
        "",
    ]


def _fractions(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in values.items()) or "-"


def _rel(result: DemoResult, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(result.out.resolve()))
    except ValueError:
        return str(path)


def _images_section(result: DemoResult) -> list[str]:
    out = ["## Images and gate masks", ""]
    out += [f"![{_rel(result, p)}]({_rel(result, p)})" for p in result.images]
    out += [""]
    if result.mask_grids:
        out += [
            "Mask pictures (per gated stage, one panel per prompt token; bright = the token may "
            "be attended there):",
            "",
        ]
        out += [f"![{_rel(result, p)}]({_rel(result, p)})" for p in result.mask_grids]
        out += [""]
    out += [f"- {note}" for note in result.generate_notes]
    return out + [""]
