"""The export folders ``maskattn-deploy bench`` runs on ONNX Runtime and TensorRT: the gated
export (given, or the tiny model's, exported once into the cache), the same UNet exported
without gates for the masked/unmasked ratio, and the backend opened on either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskattn_deploy.bench.config import SDXL_RANDOM, TINY, BenchConfig, BenchSetup, Say
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportFolder


def open_backend(
    name: str, export_dir: Path, config: BenchConfig, components: tuple[str, ...] | None = None
) -> Any:
    """The ``onnxruntime`` or ``tensorrt`` backend on ``export_dir``: ``components``, else the
    whole pipeline's with end-to-end timing, else the UNet's."""
    from maskattn_deploy.runtime.base import PIPELINE_COMPONENTS

    manifest = ExportFolder.open(export_dir).manifest
    wanted = components or (PIPELINE_COMPONENTS if config.end_to_end else ("unet",))
    if name == "onnxruntime":
        from maskattn_deploy.runtime.ort_backend import ort_backend

        return ort_backend(export_dir, manifest, config.ort_provider, wanted, config.threads)
    from maskattn_deploy.runtime.trt_backend import trt_backend

    return trt_backend(export_dir, manifest, wanted)


def masked_export(setup: BenchSetup, say: Say) -> Path:
    """The gated export the exported backends run: given, or the tiny model's cached export."""
    if setup.export_dir is not None:
        return setup.export_dir
    if setup.model == SDXL_RANDOM:
        raise UserError(
            f"{SDXL_RANDOM} is a torch-only UNet benchmark; for onnxruntime/tensorrt pass an "
            "SDXL export folder (maskattn-deploy export --model SDXL --fp16 ...)"
        )
    if setup.model != TINY:
        raise UserError(
            f"onnxruntime/tensorrt run an export folder: maskattn-deploy export --model "
            f"{setup.model} --gates CKPT --out DIR, then pass DIR to bench"
        )
    from maskattn_deploy.runtime.api import ensure_tiny_export

    path, _ = ensure_tiny_export(setup.gates, say, setup.precision)
    return path


def unmasked_export(config: BenchConfig, setup: BenchSetup, say: Say) -> Path:
    """The same UNet exported without gates: given, or exported once into the cache.

    Same recipe (so the same dynamic axes and opset) and precision as the masked export; only
    the UNet is exported, without validation (parity is the validation). The cache key holds the
    UNet fingerprint, precision, recipe name and graph revision.
    """
    if config.unmasked_export_dir is not None:
        return config.unmasked_export_dir
    from maskattn_deploy.export import export_unet
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.runtime.api import exports_cache_dir, model_fingerprint
    from maskattn_deploy.utils import build_once

    recipe = setup.manifest.recipe if setup.manifest is not None else TINY
    name = recipe.get("name", "custom") if isinstance(recipe, dict) else recipe
    target = exports_cache_dir(
        f"{model_fingerprint(setup.model)}-unet-nogates-{setup.precision}-{name}"
    )
    if not ExportFolder.exists(target) and not config.export_unmasked:
        raise UserError(
            "no plain-UNet export in the cache; run maskattn-deploy bench (it exports one "
            "once) or pass --unmasked-export DIR"
        )

    def export() -> None:
        say(
            f"exporting the {setup.model} UNet without gates into {target} (one-time, for the ratio)"
        )
        pipe = load_pipeline(setup.model)
        export_unet(
            pipe.unet,
            target,
            fp16=setup.precision == "fp16",
            recipe=recipe,
            overwrite=True,
            validate=False,
            inplace=True,
            source=setup.model,
            progress=say,
        )

    build_once(target, ExportFolder.exists, export, say)
    return target
