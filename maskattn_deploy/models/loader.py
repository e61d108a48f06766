"""Load an SDXL pipeline from ``tiny``, a hub id, a local diffusers folder or a single file."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from maskattn_deploy.errors import ModelLoadError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _tiny_dir() -> Path:
    from maskattn_deploy.models.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir()


def _tiny_fitted_dir() -> Path:
    from maskattn_deploy.models.tiny_fitted import tiny_fitted_pipeline_dir

    return tiny_fitted_pipeline_dir()


# Built-in models (no network): name -> cached pipeline folder, built on first use.
BUILT_IN = {"tiny": _tiny_dir, "tiny-fitted": _tiny_fitted_dir}


def load_pipeline(
    spec: str = "tiny",
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
):  # -> StableDiffusionXLPipeline
    """Load an SDXL pipeline.

    spec: ``tiny`` or ``tiny-fitted`` (built-in, no network; see
    :mod:`maskattn_deploy.models.tiny_fitted`), a local diffusers folder (with model_index.json),
    a single-file checkpoint (``.safetensors``; diffusers' single-file loader), or a hub id
    such as ``stabilityai/stable-diffusion-xl-base-1.0`` (needs network or the HF cache;
    HF_HUB_OFFLINE=1 is honoured).
    """
    from diffusers import StableDiffusionXLPipeline

    with quiet_loading():
        if spec in BUILT_IN:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                BUILT_IN[spec](), torch_dtype=torch_dtype, **_memory_kwargs()
            )
        elif Path(spec).is_dir():
            pipe = _from_folder(Path(spec), torch_dtype, variant)
        elif spec.endswith(SINGLE_FILE_SUFFIXES):
            pipe = _from_single_file(Path(spec), torch_dtype)
        else:
            pipe = _from_hub(spec, torch_dtype, variant)
    _check_sdxl(pipe, spec)
    return pipe.to(device)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No library progress bars while a model is loaded or saved (the command prints its own
    progress); the previous state is restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [
        (lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


def _memory_kwargs() -> dict[str, bool]:
    """``low_cpu_mem_usage`` only with accelerate installed: diffusers warns "install accelerate"
    on every load otherwise (it is an optional speed-up, see the ``train`` extra)."""
    from maskattn_deploy._lazy import available

    return {} if available("accelerate") else {"low_cpu_mem_usage": False}


def _from_folder(path: Path, torch_dtype: torch.dtype, variant: str | None):
    from diffusers import StableDiffusionXLPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    import json

    cls = json.loads(index.read_text()).get("_class_name", "")
    if "XL" not in cls:
        raise ModelLoadError(
            f"{path} holds a {cls or 'non-SDXL'} pipeline; maskattn-deploy serves SDXL pipelines "
            "(StableDiffusionXLPipeline). Gates alone work on other UNets through the Python API."
        )
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            path, torch_dtype=torch_dtype, variant=variant, **_memory_kwargs()
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the pipeline in {path}: {exc}") from exc


def _from_single_file(path: Path, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    try:
        return StableDiffusionXLPipeline.from_single_file(str(path), torch_dtype=torch_dtype)
    except Exception as exc:  # diffusers raises many types here (config fetch, key errors)
        raise ModelLoadError(
            f"cannot load single-file checkpoint {path}: {exc}. Single-file loading needs the "
            "SDXL configs from the hub (or its cache); offline, convert once online or pass a "
            "diffusers folder instead."
        ) from exc


def _from_hub(repo_id: str, torch_dtype: torch.dtype, variant: str | None):
    from diffusers import StableDiffusionXLPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if repo_id.count("/") != 1 or Path(repo_id).suffix:
        raise ModelLoadError(
            f"model {repo_id!r} is not 'tiny', an existing folder, a .safetensors file or a "
            "hub id of the form owner/name"
        )
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            repo_id,
            torch_dtype=torch_dtype,
            variant=variant,
            local_files_only=offline,
            **_memory_kwargs(),
        )
    except Exception as exc:  # hub errors come in many types; the message is what matters
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else str(exc).splitlines()[0]
        )
        raise ModelLoadError(
            f"cannot load model {repo_id!r} from the Hugging Face hub ({why}); check the id, "
            "your network, or pass a local folder / 'tiny'"
        ) from exc


def _check_sdxl(pipe, spec: str) -> None:
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ModelLoadError(
            f"{spec} is not an SDXL pipeline (its UNet has no text_time add-embeds)"
        )
