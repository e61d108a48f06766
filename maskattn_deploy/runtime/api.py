"""``generate`` as a library call: resolve model, gates, export folder and backend, run, write.

The CLI (:mod:`maskattn_deploy.cli.generate`) only turns flags into :class:`GenerateOptions`
and prints the :class:`GenerateReport`. Validation happens here, before any heavy work, with
one-line :class:`~maskattn_deploy.errors.UserError` messages that name the fix.

Defaults make a fresh machine work: the built-in tiny model with its seeded (untrained) gates,
on ONNX Runtime CPU. Without ``--export-dir`` the tiny model is exported once into
``cache_root()/exports/<fingerprint>-<gates>-<precision>-r<revision>`` and reused afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportFolder, ExportFolderError, ExportManifest
from maskattn_deploy.export.spec import GRAPH_REVISION
from maskattn_deploy.models.choice import TINY, ModelChoice
from maskattn_deploy.runtime.base import Backend, check_backend_name
from maskattn_deploy.runtime.limits import check_request
from maskattn_deploy.runtime.masks import render_mask_grid
from maskattn_deploy.runtime.model_info import ModelInfo
from maskattn_deploy.runtime.outputs import save_png, save_run_pngs, write_json
from maskattn_deploy.runtime.pipeline import GenerateConfig, GenerateResult, Pipeline
from maskattn_deploy.utils import check_output_folder

log = logging.getLogger(__name__)

DEFAULT_STEPS = {"tiny": 8, "other": 30}
EXPORTS_CACHE = "exports"

Say = Callable[[str], None]


@dataclass
class GenerateOptions:
    """Everything ``maskattn-deploy generate`` accepts (see the CLI help for each flag)."""

    prompt: str
    negative_prompt: str = ""
    backend: str = "onnxruntime"
    export_dir: Path | None = None
    model: str | None = None
    gates: Path | None = None
    no_gates: bool = False
    steps: int | None = None
    guidance: float = 5.0
    scheduler: str = "euler"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    out: Path = Path("out/images")
    save_masks: bool = False
    json_path: Path | None = None
    warmup: bool = False
    ort_provider: str = "auto"
    cuda_graph: bool = False
    device: str | None = None  # torch backend: cpu / cuda (default: cuda when available)
    compile_mode: str | None = None  # torch backend: torch.compile mode of the UNet (None: eager)
    progress: bool = True

    @property
    def choice(self) -> ModelChoice:
        """``model`` / ``gates`` / ``no_gates`` as one checked value."""
        return ModelChoice(self.model, self.gates, self.no_gates)


@dataclass
class GenerateReport:
    """What one ``generate`` call did and wrote."""

    result: GenerateResult
    images: list[Path]
    mask_grids: list[Path]
    export_dir: Path | None
    backend: dict[str, str]
    cache: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        result = self.result
        return {
            "settings": result.settings,
            "images": [str(p) for p in self.images],
            "mask_grids": [str(p) for p in self.mask_grids],
            "timings": result.timings.as_dict(),
            "backend_components": self.backend,
            "export_dir": str(self.export_dir) if self.export_dir else None,
            "export_cache": self.cache,
            "warnings": result.warnings,
            "notes": self.notes,
            "tokens": result.token_labels,
        }


# ---------------------------------------------------------------------- resolution helpers


def model_fingerprint(spec: str) -> str:
    """UNet fingerprint of a model spec without loading weights where it can.

    For folders the UNet is built from its config on the meta device (no memory, a fraction
    of a second), so defaults missing from an older config.json are filled exactly as when the
    model is loaded; hub ids and single files are loaded.
    """
    from maskattn_deploy.models import load_pipeline, unet_fingerprint

    folder = _model_folder(spec)
    if folder is not None:
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(folder / "unet")
        with torch.device("meta"):
            return unet_fingerprint(UNet2DConditionModel.from_config(config))
    return unet_fingerprint(load_pipeline(spec).unet)


def _model_folder(spec: str) -> Path | None:
    if spec == TINY:
        from maskattn_deploy.models.tiny import tiny_pipeline_dir

        return tiny_pipeline_dir()
    path = Path(spec)
    return path if (path / "unet" / "config.json").is_file() else None


def gates_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    from maskattn_deploy.gating.checkpoint import read_checkpoint

    return read_checkpoint(path).sha256


def exports_cache_dir(name: str) -> Path:
    """``cache_root()/exports/<name>-r<GRAPH_REVISION>``; older graph code's exports stay unused."""
    from maskattn_deploy.models.tiny import cache_root

    return cache_root() / EXPORTS_CACHE / f"{name}-r{GRAPH_REVISION}"


def tiny_export_dir(gates: Path | None, precision: str = "fp32") -> Path:
    """Cache folder of the tiny export for these gates: fingerprint + gate hash + precision."""
    sha = gates_sha256(gates)
    return exports_cache_dir(
        f"{model_fingerprint(TINY)}-{sha[:16] if sha else 'nogates'}-{precision}"
    )


def ensure_tiny_export(gates: Path | None, say: Say, precision: str = "fp32") -> tuple[Path, dict]:
    """Export the tiny model once into the cache (reused afterwards); returns (dir, cache info)."""
    from maskattn_deploy.utils import build_once

    target = tiny_export_dir(gates, precision)
    start = time.perf_counter()

    def export() -> None:
        from maskattn_deploy.export import export_pipeline

        say(f"exporting the tiny model to ONNX into {target} (one-time step, reused next time)")
        export_pipeline(
            TINY,
            gates,
            target,
            fp16=precision == "fp16",
            recipe=TINY,
            overwrite=True,
            no_gates=gates is None,
            progress=lambda line: log.info("export: %s", line),
        )
        say(f"export done in {time.perf_counter() - start:.1f} s")

    # Concurrent runs on a cold cache: one exports, the others wait for it and reuse it.
    if not build_once(target, ExportFolder.exists, export, say):
        return target, {"path": str(target), "created": False}
    seconds = time.perf_counter() - start
    return target, {"path": str(target), "created": True, "seconds": round(seconds, 2)}


def check_export_matches(
    info: ModelInfo, model: str | None, gates: Path | None, no_gates: bool
) -> None:
    """Refuse an export made for another model, or with other gates than the ones named."""
    where = info.export_dir
    if model is not None:
        wanted = model_fingerprint(model)
        if info.unet_fingerprint and wanted != info.unet_fingerprint:
            raise ExportFolderError(
                f"export folder {where} was made for UNet {info.unet_fingerprint}, but model "
                f"{model} has UNet {wanted}: export it with maskattn-deploy export, or pass the "
                "export folder made for it",
                params=("model",),
            )
    if no_gates and info.gates_sha256:
        raise ExportFolderError(
            f"export folder {where} has gates built in; for the ungated model export it with "
            "no_gates, or use the torch backend with no_gates",
            params=("no_gates",),
        )
    if gates is not None:
        sha = gates_sha256(gates)
        if sha != info.gates_sha256:
            raise ExportFolderError(
                f"gates {gates} (sha256 {str(sha)[:12]}) are not the ones in {where} "
                f"(sha256 {str(info.gates_sha256)[:12]}); re-export with these or drop gates",
                params=("gates",),
            )


def torch_device(requested: str | None) -> torch.device:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                "device cuda needs a CUDA build of torch and a GPU; this torch sees none",
                params=("device",),
            )
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- backends


def torch_pipeline(
    model: str, gates: Path | None, device: torch.device, compile_mode: str | None = None
) -> Pipeline:
    """The reference pipeline: diffusers modules, gate processors installed unless ``gates`` is
    None; ``compile_mode`` (``default`` | ``reduce-overhead``) runs the UNet through
    torch.compile."""
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.runtime.torch_backend import torch_backend

    pipe = load_pipeline(model, device=device)
    sha = None
    if gates is not None:
        gate_set = load_gates(gates, pipe.unet)
        sha = getattr(gate_set, "checkpoint_sha256", None)
    backend = torch_backend(pipe, device, compile_mode=compile_mode)
    return Pipeline(backend, ModelInfo.from_pipe(pipe, model, sha))


def export_pipeline_for(options: GenerateOptions, say: Say) -> tuple[Pipeline, dict]:
    """Pipeline over an export folder (given, or the cached tiny export) on ORT / TensorRT."""
    cache: dict[str, Any] = {}
    if options.export_dir is not None:
        export_dir = Path(options.export_dir)
    else:
        model = options.model or TINY
        if model != TINY:
            raise UserError(
                f"the {options.backend} backend runs an export folder: run maskattn-deploy "
                f"export --model {model} --out DIR first, then pass export_dir",
                params=("export_dir",),
            )
        if options.backend == "tensorrt":
            raise UserError(
                "the tensorrt backend runs engines: maskattn-deploy export --model tiny --out DIR, "
                "maskattn-deploy build DIR, then pass export_dir",
                params=("export_dir",),
            )
        export_dir, cache = ensure_tiny_export(options.choice.gate_checkpoint(TINY), say)
    info = ModelInfo.from_export(export_dir)
    check_export_matches(info, options.model, options.gates, options.no_gates)
    backend = _export_backend(options, export_dir, info.export_manifest)
    return Pipeline(backend, info), cache


def _export_backend(
    options: GenerateOptions, export_dir: Path, manifest: ExportManifest
) -> Backend:
    if options.backend == "tensorrt":
        from maskattn_deploy.runtime.trt_backend import trt_backend

        return trt_backend(export_dir, manifest, cuda_graph=options.cuda_graph)
    from maskattn_deploy.runtime.ort_backend import ort_backend

    return ort_backend(export_dir, manifest, options.ort_provider)


def build_pipeline(options: GenerateOptions, say: Say) -> tuple[Pipeline, dict]:
    """The pipeline for ``options`` (and export-cache facts), after early validation."""
    check_backend_name(options.backend)
    if options.backend == "tensorrt":
        from maskattn_deploy.engine.cuda_check import require_tensorrt_and_gpu

        require_tensorrt_and_gpu()
    if options.backend != "torch":
        return export_pipeline_for(options, say)
    choice = options.choice
    model = choice.model
    if model is None and options.export_dir is not None:
        model = ExportFolder.open(options.export_dir).manifest.model.spec
        if not model:
            raise UserError(
                f"{options.export_dir} does not say what was exported: pass model",
                params=("model",),
            )
    model = model or TINY
    gates = choice.gate_checkpoint(model)
    pipeline = torch_pipeline(model, gates, torch_device(options.device), options.compile_mode)
    if options.export_dir is not None:
        info = ModelInfo.from_export(options.export_dir)
        if info.unet_fingerprint and info.unet_fingerprint != pipeline.info.unet_fingerprint:
            raise ExportFolderError(
                f"export folder {options.export_dir} was made for UNet {info.unet_fingerprint}, "
                f"but model {model} has UNet {pipeline.info.unet_fingerprint}"
            )
    return pipeline, {}


# ---------------------------------------------------------------------- masks


def reference_masks(
    options: GenerateOptions, pipeline: Pipeline, result: GenerateResult, gates: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """Masks of an ORT/TensorRT run, recorded by a torch reference pass with the same seed.

    Gate logits depend only on the hidden states entering each attn2 and the text embeddings,
    so a torch pass that follows the same latents records the masks the exported graph applied.
    The note returned says how far the two runs' final latents are apart.
    """
    model = options.model or pipeline.info.model_spec or TINY
    reference = torch_pipeline(model, gates, torch_device(options.device))
    ref = reference.generate(result.config, progress=False, record_masks=True)
    diff = float((ref.latents - result.latents).abs().max())
    note = (
        "masks were recorded by a torch reference pass with the same seed and settings "
        f"(final latents max |difference| vs {pipeline.backend.name}: {diff:.2e})"
    )
    return ref.masks or {}, note


def mask_gates_for(options: GenerateOptions, pipeline: Pipeline) -> Path | None:
    """For --save-masks on an export: the checkpoint to record masks with (checked up front)."""
    if not options.save_masks or options.backend == "torch":
        return None
    if not pipeline.info.gates_sha256 or pipeline.info.export_dir is None:
        raise UserError(
            f"save_masks: the export {pipeline.info.export_dir} has no gates, so there are "
            "no masks to draw",
            params=("save_masks",),
        )
    folder = ExportFolder.open(pipeline.info.export_dir)
    gates = folder.find_gates(options.gates, options.model)
    if gates is None:
        raise UserError(
            "save_masks on this export needs the gate checkpoint it was exported with "
            "(none found beside the export): pass gates",
            params=("save_masks", "gates"),
        )
    return gates


def write_mask_grids(
    result: GenerateResult, masks: dict[str, torch.Tensor], stems: list[Path]
) -> list[Path]:
    """One grid PNG per (image, stage) beside each image: ``<stem>.masks-<stage>.png``."""
    written = []
    labels = result.token_labels
    for index, stem in enumerate(stems):
        for stage, fractions in masks.items():
            title = f"stage {stage}: where each token may be attended (bright = open)"
            grid = render_mask_grid(
                fractions[index, : len(labels)], labels, result.images[index], title
            )
            path = stem.with_name(f"{stem.stem}.masks-{stage}.png")
            written.append(save_png(grid, path, {"stage": stage, **result.settings}))
    return written


# ---------------------------------------------------------------------- entry point


def compile_notes(backend: Any, warmed_up: bool) -> list[str]:
    """One line per torch.compile'd component: how long its first call (the compile) took."""
    compiled = getattr(backend, "compile_warmups", None)
    notes = []
    for name, seconds in (compiled() if compiled else {}).items():
        mode = backend.runners[name].compile_mode
        where = (
            "in the untimed warm-up"
            if warmed_up
            else "in the first step's time (--warmup keeps it out)"
        )
        notes.append(
            f"torch.compile ({mode}) warm-up: the first {name} call took {seconds:.1f} s "
            f"(compile + one call), {where}; later calls reuse the compiled graph"
        )
    return notes


def early_checks(options: GenerateOptions) -> None:
    """Cheap validation before anything is loaded."""
    check_backend_name(options.backend)
    if not options.prompt or not options.prompt.strip():
        raise UserError("the prompt is empty; pass a text prompt, e.g. 'a red square'")
    check_request(
        options.steps,
        options.guidance,
        options.seed,
        options.num_images,
        options.height,
        options.width,
    )
    if options.choice.no_gates and options.save_masks:
        raise UserError(
            "save_masks draws the gate masks, so it cannot be used with no_gates",
            params=("save_masks", "no_gates"),
        )
    check_output_folder(options.out)
    if options.compile_mode is not None:
        from maskattn_deploy.runtime.torch_backend import check_compile_mode

        check_compile_mode(options.compile_mode)
        if options.backend != "torch":
            raise UserError(
                f"compile_mode needs backend torch (torch.compile works on the PyTorch UNet; "
                f"{options.backend} optimizes its own graph)",
                params=("compile_mode", "backend"),
            )


def default_steps(pipeline: Pipeline) -> int:
    """The step count of a request that sets none: fewer for the tiny model."""
    return DEFAULT_STEPS[TINY if pipeline.info.model_spec == TINY else "other"]


def request_config(options: GenerateOptions, prompt: str, steps: int | None) -> GenerateConfig:
    """The request ``options`` describe (sampler, seed, size, count) for ``prompt``."""
    return GenerateConfig(
        prompt=prompt,
        negative_prompt=options.negative_prompt,
        steps=steps,
        guidance=options.guidance,
        scheduler=options.scheduler,
        seed=options.seed,
        height=options.height,
        width=options.width,
        num_images=options.num_images,
    )


def run_generate(options: GenerateOptions, say: Say = print) -> GenerateReport:
    """Generate, write PNGs (+ mask grids, + JSON) and return the report."""
    early_checks(options)
    pipeline, cache = build_pipeline(options, say)
    steps = default_steps(pipeline) if options.steps is None else options.steps
    config = request_config(options, options.prompt, steps)
    record = options.save_masks and options.backend == "torch"
    mask_gates = mask_gates_for(options, pipeline)
    with pipeline.backend:
        result = pipeline.generate(config, options.progress, record, options.warmup)
        described = pipeline.backend.describe()
    notes = compile_notes(pipeline.backend, options.warmup)
    masks = result.masks
    if mask_gates is not None:
        masks, note = reference_masks(options, pipeline, result, mask_gates)
        notes.append(note)
    paths = save_run_pngs(
        result.images,
        Path(options.out),
        lambda run, i: f"{run:05d}-s{options.seed}-{i}.png",
        lambda i: {**result.settings, "image_index": i},
    )
    grids = write_mask_grids(result, masks, paths) if options.save_masks and masks else []
    report = GenerateReport(result, paths, grids, pipeline.info.export_dir, described, cache, notes)
    if options.json_path is not None:
        write_json(options.json_path, report.as_json())
    return report
