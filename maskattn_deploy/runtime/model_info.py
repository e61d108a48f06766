"""What the pipeline needs besides a backend: tokenizers, scheduler config, VAE scaling, limits.

It comes either from a loaded diffusers pipeline (torch backend) or from an export folder's
``manifest.json`` and copied configs (onnxruntime / tensorrt backends), so the same
:class:`~maskattn_deploy.runtime.pipeline.Pipeline` code serves every backend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.export.component_spec import hidden_state, penultimate_state
from maskattn_deploy.export.folder import ExportFolder, ExportFolderError, ExportManifest
from maskattn_deploy.export.spec import LATENT_FACTOR, PIXEL_MULTIPLE, pixel_multiple

log = logging.getLogger(__name__)

SDXL_VAE_SCALING = 0.13025

Range = tuple[int, int]

__all__ = ["ExportFolderError", "ModelInfo"]


@dataclass
class ModelInfo:
    """Static facts about the model being served."""

    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    unet_fingerprint: str
    model_spec: str = "tiny"
    gates_sha256: str | None = None
    vae_scaling_factor: float = SDXL_VAE_SCALING
    vae_latents_mean: list[float] | None = None
    vae_latents_std: list[float] | None = None
    force_zeros_for_empty_prompt: bool = True
    default_size: tuple[int, int] = (1024, 1024)  # (height, width) in pixels
    height_range: Range | None = None  # allowed pixel heights (None: any multiple of 8)
    size_multiple: int = PIXEL_MULTIPLE  # pixel sizes the UNet runs at (export/spec.py)
    latent_channels: int = 4  # the UNet's in_channels (SDXL: 4)
    width_range: Range | None = None
    batch_range: Range | None = None  # UNet rows (CFG doubles the image count)
    precision: str = "fp32"
    export_dir: Path | None = None
    # The text encoders' outputs the UNet is conditioned on (their penultimate hidden states).
    text_states: tuple[str, str] | None = None
    export_manifest: ExportManifest | None = None  # the manifest of ``export_dir``
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pipe(cls, pipe: Any, model_spec: str, gates_sha256: str | None) -> ModelInfo:
        """Facts of a loaded diffusers SDXL pipeline."""
        from maskattn_deploy.models import unet_fingerprint

        vae = pipe.vae.config
        size = int(pipe.unet.config.sample_size) * LATENT_FACTOR
        return cls(
            tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2,
            scheduler_config=dict(pipe.scheduler.config),
            unet_fingerprint=unet_fingerprint(pipe.unet),
            model_spec=model_spec,
            gates_sha256=gates_sha256,
            vae_scaling_factor=float(vae.scaling_factor),
            vae_latents_mean=getattr(vae, "latents_mean", None),
            vae_latents_std=getattr(vae, "latents_std", None),
            force_zeros_for_empty_prompt=bool(
                pipe.config.get("force_zeros_for_empty_prompt", True)
            ),
            default_size=(size, size),
            size_multiple=pixel_multiple(pipe.unet.config),
            latent_channels=int(pipe.unet.config.in_channels),
            text_states=(
                hidden_state(int(pipe.text_encoder.config.num_hidden_layers) - 1),
                hidden_state(int(pipe.text_encoder_2.config.num_hidden_layers) - 1),
            ),
        )

    @classmethod
    def from_export(cls, export_dir: str | Path) -> ModelInfo:
        """Facts of an export folder (manifest, tokenizer/, tokenizer_2/, scheduler/)."""
        from transformers import CLIPTokenizer

        folder = ExportFolder.open(export_dir)
        manifest, export_dir = folder.manifest, folder.path
        shapes = manifest.export_recipe().shapes
        force_zeros = manifest.model.force_zeros_for_empty_prompt
        return cls(
            tokenizer=_load(CLIPTokenizer, export_dir / "tokenizer"),
            tokenizer_2=_load(CLIPTokenizer, export_dir / "tokenizer_2"),
            scheduler_config=_scheduler_config(export_dir),
            unet_fingerprint=manifest.model.unet_fingerprint or "",
            model_spec=manifest.model.spec or "",
            gates_sha256=manifest.gates_sha256,
            vae_scaling_factor=_vae_scaling(manifest),
            vae_latents_mean=(manifest.vae or {}).get("latents_mean"),
            vae_latents_std=(manifest.vae or {}).get("latents_std"),
            force_zeros_for_empty_prompt=True if force_zeros is None else force_zeros,
            default_size=(shapes.height[1], shapes.width[1]),
            height_range=(shapes.height[0], shapes.height[2]),
            size_multiple=export_size_multiple(export_dir),
            latent_channels=int(_unet_config(export_dir).get("in_channels", 4)),
            width_range=(shapes.width[0], shapes.width[2]),
            batch_range=(shapes.batch[0], shapes.batch[2]),
            precision=manifest.precision,
            export_dir=export_dir,
            text_states=_text_states(manifest),
            export_manifest=manifest,
        )


def _text_states(manifest: ExportManifest) -> tuple[str, str] | None:
    """The penultimate hidden-state outputs of both text encoders (None: not exported)."""
    components = manifest.components
    if "text_encoder" not in components or "text_encoder_2" not in components:
        return None
    first, second = (
        penultimate_state(o["name"] for o in components[name].outputs)
        for name in ("text_encoder", "text_encoder_2")
    )
    return first, second


def _unet_config(export_dir: Path) -> dict[str, Any]:
    """The UNet's ``config.json`` in the export ({} for exports made before it was written)."""
    try:
        config = json.loads((export_dir / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def export_size_multiple(export_dir: Path) -> int:
    """From the UNet's config in the export; exports without one ran at multiples of 64."""
    try:
        return pixel_multiple(_unet_config(export_dir))
    except (ValueError, KeyError, TypeError):
        return PIXEL_MULTIPLE


def _load(cls: Any, folder: Path) -> Any:
    if not folder.is_dir():
        raise ExportFolderError(f"{folder} is missing; re-run maskattn-deploy export")
    return cls.from_pretrained(folder)


def _scheduler_config(export_dir: Path) -> dict[str, Any]:
    path = export_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportFolderError(f"{path} is missing; re-run maskattn-deploy export")
    return json.loads(path.read_text())


def _vae_scaling(manifest: ExportManifest) -> float:
    """The VAE scaling factor the export records (a UNet-only export records none)."""
    if manifest.vae is not None and "scaling_factor" in manifest.vae:
        return float(manifest.vae["scaling_factor"])
    if manifest.model.vae_scaling_factor is not None:
        return float(manifest.model.vae_scaling_factor)
    log.warning("the export records no VAE scaling factor; assuming SDXL's %s", SDXL_VAE_SCALING)
    return SDXL_VAE_SCALING
