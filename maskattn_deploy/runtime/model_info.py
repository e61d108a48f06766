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

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import hidden_state, penultimate_state
from maskattn_deploy.export.spec import EXPORT_FORMAT, LATENT_FACTOR, MANIFEST_NAME

log = logging.getLogger(__name__)

SDXL_VAE_SCALING = 0.13025

Range = tuple[int, int]


class ExportFolderError(UserError):
    """An export folder is missing, incomplete, or does not match the requested model/gates."""


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
    width_range: Range | None = None
    batch_range: Range | None = None  # UNet rows (CFG doubles the image count)
    precision: str = "fp32"
    export_dir: Path | None = None
    # The text encoders' outputs the UNet is conditioned on (their penultimate hidden states).
    text_states: tuple[str, str] | None = None
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
            text_states=(
                hidden_state(int(pipe.text_encoder.config.num_hidden_layers) - 1),
                hidden_state(int(pipe.text_encoder_2.config.num_hidden_layers) - 1),
            ),
        )

    @classmethod
    def from_export(cls, export_dir: str | Path) -> ModelInfo:
        """Facts of an export folder (manifest, tokenizer/, tokenizer_2/, scheduler/)."""
        from transformers import CLIPTokenizer

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        model = manifest.get("model", {})
        shapes = manifest.get("shapes") or (manifest.get("recipe") or {}).get("shapes", {})
        vae = _vae_facts(export_dir, manifest)
        height, width = _range(shapes.get("height")), _range(shapes.get("width"))
        opt = _opt_size(shapes)
        return cls(
            tokenizer=_load(CLIPTokenizer, export_dir / "tokenizer"),
            tokenizer_2=_load(CLIPTokenizer, export_dir / "tokenizer_2"),
            scheduler_config=_scheduler_config(export_dir),
            unet_fingerprint=str(model.get("unet_fingerprint", "")),
            model_spec=str(model.get("spec", "")),
            gates_sha256=gates_sha256_of(manifest),
            vae_scaling_factor=float(vae.get("scaling_factor", SDXL_VAE_SCALING)),
            vae_latents_mean=vae.get("latents_mean"),
            vae_latents_std=vae.get("latents_std"),
            force_zeros_for_empty_prompt=bool(
                model.get("force_zeros_for_empty_prompt", manifest.get("force_zeros", True))
            ),
            default_size=opt or (1024, 1024),
            height_range=height,
            width_range=width,
            batch_range=_range(shapes.get("batch")),
            precision=str(manifest.get("precision", "fp32")),
            export_dir=export_dir,
            text_states=_text_states(manifest),
            extra={"manifest": manifest},
        )

    @property
    def manifest(self) -> dict[str, Any]:
        return self.extra.get("manifest", {})


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The export manifest, or a one-line error that says how to make one."""
    path = Path(export_dir) / MANIFEST_NAME
    if not Path(export_dir).is_dir():
        raise ExportFolderError(
            f"export folder {export_dir} does not exist; create it with maskattn-deploy export"
        )
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportFolderError(
            f"{export_dir} is not an export folder (no {MANIFEST_NAME}); "
            "create one with maskattn-deploy export"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportFolderError(
            f"{path} is unreadable ({exc}); re-run maskattn-deploy export"
        ) from exc
    fmt = manifest.get("format", EXPORT_FORMAT)
    if fmt != EXPORT_FORMAT or "components" not in manifest:
        raise ExportFolderError(
            f"{path} has format {fmt!r} (expected {EXPORT_FORMAT!r}); re-run maskattn-deploy export"
        )
    return manifest


def gates_sha256_of(manifest: dict[str, Any]) -> str | None:
    """SHA-256 of the gate tensors baked into an export (None for an ungated export)."""
    gates = manifest.get("gates")
    if not gates:
        return None
    if isinstance(gates, str):
        return gates
    return gates.get("sha256") or gates.get("tensors_sha256")


def _text_states(manifest: dict[str, Any]) -> tuple[str, str] | None:
    """The penultimate hidden-state outputs of both text encoders (None: not exported)."""
    components = manifest.get("components", {})
    if "text_encoder" not in components or "text_encoder_2" not in components:
        return None
    first, second = (
        penultimate_state(o["name"] for o in components[name].get("outputs", []))
        for name in ("text_encoder", "text_encoder_2")
    )
    return first, second


def _load(cls: Any, folder: Path) -> Any:
    if not folder.is_dir():
        raise ExportFolderError(f"{folder} is missing; re-run maskattn-deploy export")
    return cls.from_pretrained(folder)


def _scheduler_config(export_dir: Path) -> dict[str, Any]:
    path = export_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportFolderError(f"{path} is missing; re-run maskattn-deploy export")
    return json.loads(path.read_text())


def _vae_facts(export_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """VAE scaling (and SD3-style mean/std when present) from the manifest or the VAE config."""
    for key in ("vae", "vae_decoder"):
        section = manifest.get(key) or (manifest.get("model") or {}).get(key)
        if isinstance(section, dict) and "scaling_factor" in section:
            return section
    for candidate in ("vae/config.json", "vae_decoder/config.json"):
        path = export_dir / candidate
        if path.is_file():
            return json.loads(path.read_text())
    scaling = (manifest.get("model") or {}).get("vae_scaling_factor")
    if scaling is not None:
        return {"scaling_factor": scaling}
    log.warning("the export records no VAE scaling factor; assuming SDXL's %s", SDXL_VAE_SCALING)
    return {"scaling_factor": SDXL_VAE_SCALING}


def _range(value: Any) -> Range | None:
    if not value:
        return None
    if isinstance(value, (int, float)):
        return int(value), int(value)
    return int(min(value)), int(max(value))


def _opt_size(shapes: dict[str, Any]) -> tuple[int, int] | None:
    height, width = shapes.get("height"), shapes.get("width")
    if not height or not width:
        return None
    return _opt(height), _opt(width)


def _opt(value: Any) -> int:
    """The opt entry of [min, opt, max] (or the single value)."""
    if isinstance(value, (int, float)):
        return int(value)
    return int(value[1]) if len(value) == 3 else int(value[0])
