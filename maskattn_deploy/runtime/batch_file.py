"""``generate --batch-file``: many prompts, run in batches that share UNet calls.

A batch file has one request per line. A plain line is a prompt; it gets the command's other
settings and the seed ``--seed + its request number`` (0, 1, 2... in file order), so every
prompt has its own reproducible seed. A line starting with ``{`` is a JSON object that may
also set ``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``scheduler``, ``height`` and
``width`` for that request. Blank lines and lines starting with ``#`` are skipped.

Requests that agree on size, steps, sampler and guidance on/off run together
(:func:`~maskattn_deploy.runtime.batching.plan_batches`, at most the export's UNet batch per
call); each image is the one ``generate`` makes for the same prompt and settings, within the
tolerance stated in docs/serving.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.runtime.batching import plan_batches
from maskattn_deploy.runtime.outputs import save_run_pngs, write_json
from maskattn_deploy.runtime.pipeline import GenerateConfig, GenerateResult

# Keys a JSON line may set (the GenerateConfig fields a request owns).
LINE_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "scheduler",
    "height",
    "width",
)
_TYPES = {f.name: f.type for f in fields(GenerateConfig)}


@dataclass
class BatchReport:
    """What ``generate --batch-file`` ran and wrote."""

    results: list[GenerateResult]
    images: list[Path]
    batches: list[list[int]]  # request numbers per batch, in run order
    seconds: float
    backend: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": [
                {
                    "settings": result.settings,
                    "image": str(path),
                    "warnings": result.warnings,
                    "batch_size": result.batch_size,
                    "timings": result.timings.as_dict(),
                }
                for result, path in zip(self.results, self.images, strict=True)
            ],
            "batches": self.batches,
            "seconds": self.seconds,
            "backend_components": self.backend,
            "notes": self.notes,
        }


def read_batch_file(path: str | Path, base: GenerateConfig) -> list[GenerateConfig]:
    """One :class:`GenerateConfig` per request line of ``path`` (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--batch-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--batch-file {path} is unreadable: {exc}") from exc
    configs: list[GenerateConfig] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        request = replace(base, prompt=text, seed=base.seed + len(configs))
        configs.append(_from_json(text, request, where) if text.startswith("{") else request)
    if not configs:
        raise UserError(f"--batch-file {path} has no prompts (one prompt per line)")
    return configs


def _from_json(text: str, request: GenerateConfig, where: str) -> GenerateConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: not valid JSON ({exc.msg}); write a prompt or a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: a JSON line must be an object with at least a 'prompt'")
    unknown = sorted(set(data) - set(LINE_KEYS))
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LINE_KEYS)}"
        )
    if not isinstance(data.get("prompt"), str):
        raise UserError(f"{where}: 'prompt' must be given as a string")
    for key, value in data.items():
        _check_type(key, value, where)
    if "steps" in data and data["steps"] < 1:
        raise UserError(f"{where}: 'steps' must be at least 1")
    return replace(request, **data)


def _check_type(key: str, value: Any, where: str) -> None:
    kind = _TYPES[key].replace(" | None", "")
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(kind, True)
    if not ok:
        raise UserError(f"{where}: '{key}' must be {kind}, got {type(value).__name__}")


def run_batch(
    pipeline: Any, configs: list[GenerateConfig], out: Path, progress: bool
) -> BatchReport:
    """Run ``configs`` in batches on ``pipeline`` and write one PNG per image into ``out``."""
    resolved = [pipeline.resolve(config) for config in configs]
    batches = plan_batches(resolved, pipeline.max_rows)
    results: list[GenerateResult | None] = [None] * len(resolved)
    start = time.perf_counter()
    with pipeline.backend:
        for batch in batches:
            for index, result in zip(
                batch, pipeline.generate_batch([resolved[i] for i in batch], progress), strict=True
            ):
                results[index] = result
        described = pipeline.backend.describe()
    seconds = time.perf_counter() - start
    done = [r for r in results if r is not None]
    images = [(r, i, image) for r in done for i, image in enumerate(r.images)]
    paths = save_run_pngs(
        [image for _, _, image in images],
        out,
        lambda run, k: f"{run:05d}-{k:03d}-s{images[k][0].config.seed}-{images[k][1]}.png",
        lambda k: {**images[k][0].settings, "image_index": images[k][1]},
    )
    firsts = []
    for k, (_, i, _) in enumerate(images):
        if i == 0:
            firsts.append(paths[k])
    return BatchReport(done, firsts, batches, seconds, described)


def write_report(report: BatchReport, json_path: Path | None) -> None:
    if json_path is not None:
        write_json(json_path, report.as_json())


def run_generate_batch(options: Any, batch_file: Path, say: Any = print) -> BatchReport:
    """``generate --batch-file``: the requests of ``batch_file`` with ``options`` as defaults."""
    from maskattn_deploy.runtime.api import (
        build_pipeline,
        default_steps,
        early_checks,
        request_config,
    )

    if options.save_masks or options.warmup:
        raise UserError("--batch-file runs without --save-masks and --warmup; drop those flags")
    early_checks(replace(options, prompt=options.prompt or "(from --batch-file)"))
    # steps None: the model's default, known once it is loaded
    base = request_config(options, "", options.steps)
    configs = read_batch_file(batch_file, base)  # before loading anything: fail fast
    pipeline, _ = build_pipeline(options, say)
    steps = default_steps(pipeline)
    configs = [replace(c, steps=steps) if c.steps is None else c for c in configs]
    report = run_batch(pipeline, configs, Path(options.out), options.progress)
    write_report(report, options.json_path)
    return report
