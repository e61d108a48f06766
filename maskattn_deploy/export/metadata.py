"""Hugging Face metadata beside the ONNX files, so Optimum and diffusers tools read the folder.

Optimum's ``ORTStableDiffusionXLPipeline.from_pretrained(EXPORT_DIR)`` (see docs/optimum.md)
needs, besides the ``<component>/model.onnx`` files:

- ``model_index.json`` at the top: the pipeline class, the scheduler and tokenizer classes it
  instantiates, a ``unet`` entry, and pipeline options such as ``force_zeros_for_empty_prompt``;
- ``config.json`` in every component folder: the diffusers / transformers config of the module
  that was exported (Optimum reads e.g. the UNet's ``in_channels``/``sample_size``/
  ``time_cond_proj_dim``, the VAE's ``scaling_factor``/``force_upcast``/latents mean and std,
  the text encoders' ``num_hidden_layers``/``projection_dim``);
- tokenizer files that both transformers majors load: ``vocab.json`` + ``merges.txt``
  (transformers 4.x's ``CLIPTokenizer``) and ``tokenizer.json`` (transformers 5.x).

The configs are captured from the pipeline before the export starts (the exporter releases each
module once written, and diffusers then records it as absent in ``pipe.config``) and written
after the graphs, so component sizes in the manifest count the ONNX files alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import ExportError
from maskattn_deploy.export.spec import component_dir
from maskattn_deploy.utils import write_json_atomic

MODEL_INDEX = "model_index.json"
CONFIG_FILE = "config.json"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
# Files each tokenizer folder must hold: transformers 4.x's CLIPTokenizer reads the first two,
# transformers 5.x (and 4.x's CLIPTokenizerFast) reads tokenizer.json.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
# Keys that describe where a module was loaded from on the exporting machine, not the model.
_LOCAL_KEYS = ("_name_or_path",)
# Export component -> the pipeline attribute whose config it carries.
_CONFIG_SOURCE = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


@dataclass(frozen=True)
class FolderMetadata:
    """What :func:`write_metadata` writes: ``model_index.json`` and each ``config.json``."""

    model_index: dict[str, Any] | None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def module_config(module: Any) -> dict[str, Any]:
    """The JSON config of a diffusers model or a transformers model, without local paths."""
    if hasattr(module, "to_json_string"):  # diffusers ConfigMixin (UNet, VAE)
        data = json.loads(module.to_json_string())
    elif hasattr(getattr(module, "config", None), "to_json_string"):  # transformers
        data = json.loads(module.config.to_json_string(use_diff=False))
    else:
        raise ExportError(f"{type(module).__name__} has no diffusers or transformers config")
    return _without_local_keys(data)


def model_index(pipe: Any) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline (class, component classes, options)."""
    from diffusers import __version__ as diffusers_version

    data = json.loads(json.dumps(dict(pipe.config), default=str))
    data = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers_version, **data}
    if not data.get("unet") or data["unet"][0] is None:
        raise ExportError("the pipeline has no UNet to record in model_index.json")
    return _without_local_keys(data)


def collect_metadata(
    pipe: Any | None, components: Iterable[str], unet: Any = None
) -> FolderMetadata:
    """Capture the metadata of ``components`` from ``pipe`` (or a lone ``unet``) before export."""
    configs = {}
    for name in components:
        module = unet if pipe is None and name == "unet" else getattr(pipe, _CONFIG_SOURCE[name])
        configs[name] = module_config(module)
    return FolderMetadata(model_index(pipe) if pipe is not None else None, configs)


def write_metadata(metadata: FolderMetadata, root: Path) -> list[Path]:
    """Write ``model_index.json`` and ``<component>/config.json`` under ``root``."""
    written = []
    if metadata.model_index is not None:
        path = root / MODEL_INDEX
        write_json_atomic(path, metadata.model_index)
        written.append(path)
    for name, config in metadata.configs.items():
        path = root / component_dir(name) / CONFIG_FILE
        write_json_atomic(path, config)
        written.append(path)
    return written


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` plus whichever of :data:`TOKENIZER_FILES` it did not write.

    transformers 5.x writes only ``tokenizer.json``; its ``tokenizers`` model saves the BPE
    vocabulary and merges in the 4.x format. transformers 4.x's slow tokenizer writes only the
    vocabulary files; its converter builds the ``tokenizers`` object that gives
    ``tokenizer.json``.
    """
    tokenizer.save_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tokenizer)
    if not (folder / "tokenizer.json").is_file():
        backend.save(str(folder / "tokenizer.json"))
    if not all((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
        backend.model.save(str(folder))
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(
            f"{type(tokenizer).__name__} did not produce {', '.join(missing)} in {folder}; "
            "SDXL exports need CLIP's byte-level BPE tokenizers"
        )


def _without_local_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in _LOCAL_KEYS}
