"""The built-in ``tiny`` model: a complete SDXL-architecture pipeline small enough for a CPU.

It mirrors SDXL's structure so stage and placement names mean the same thing: three down
blocks (the first without cross-attention), a cross-attention mid block, three mirrored up
blocks, several transformer layers in the inner stages, text_time add-embeds, two CLIP text
encoders (the second with a projection), a VAE with scale factor 8 and an Euler scheduler.
Weights are random but deterministic (fixed seeds); the pipeline is cached on disk after the
first build, so later loads take a fraction of a second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.export.spec import LATENT_FACTOR, TEXT_TOKENS

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-sdxl-v1"
TINY_RESOLUTION = 256  # default image size in pixels (latent 32x32)
TEXT_DIM_1, TEXT_DIM_2 = 32, 32  # hidden sizes of the two text encoders (concat -> 64)


def cache_root() -> Path:
    """Folder for built artefacts (override with MASKATTN_DEPLOY_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskattn-deploy"
    return Path(os.environ.get("MASKATTN_DEPLOY_CACHE", default))


def tiny_unet_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // LATENT_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),  # diffusers' name for the number of heads (head dim 16)
        cross_attention_dim=TEXT_DIM_1 + TEXT_DIM_2,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM_2,
    )


def build_tiny_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


def build_tiny_sd15_unet(seed: int = 0) -> torch.nn.Module:
    """An SD 1.x-shaped UNet (four levels, cross-attention in the first three, no add-embeds)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=24,
        norm_num_groups=8,
    ).eval()


def _text_encoders(vocab_size: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    enc1 = CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_DIM_1, **common))
    torch.manual_seed(seed + 1)
    enc2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=TEXT_DIM_2, projection_dim=TEXT_DIM_2, **common)
    )
    return enc1.eval(), enc2.eval()


def _vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
    ).eval()


def build_tiny_pipeline(seed: int = 0):  # -> StableDiffusionXLPipeline
    """Build the tiny SDXL pipeline from code (deterministic, no network)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from maskattn_deploy.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    enc1, enc2 = _text_encoders(len(tokenizer), seed + 10)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 20),
        text_encoder=enc1,
        text_encoder_2=enc2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        unet=build_tiny_unet(seed),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def cached_pipeline_dir(name: str, build: Callable[[], Any]) -> Path:
    """``cache_root() / name``, holding ``build()`` saved as a diffusers folder (built once,
    atomically: an interrupted build leaves nothing half-written)."""
    from maskattn_deploy.utils import atomic_dir, build_once

    target = cache_root() / name

    def write() -> None:
        log.info("building %s into %s", name, target)
        with atomic_dir(target, overwrite=True) as tmp:
            build().save_pretrained(tmp, safe_serialization=True)

    build_once(target, lambda path: (path / "model_index.json").is_file(), write, log.info)
    return target


def tiny_pipeline_dir() -> Path:
    """The on-disk cache of the tiny pipeline, built on first use."""
    return cached_pipeline_dir(TINY_VERSION, build_tiny_pipeline)


def tiny_default_gates_dir(seed: int = 1234) -> Path:
    """Seeded, untrained gates for the tiny model (default ``mid`` placement), cached on disk.

    They let ``generate`` and ``export`` run on a fresh machine before any training; their
    metadata says ``untrained``. ``maskattn-deploy train --recipe tiny-synthetic`` makes real ones.
    """
    from maskattn_deploy.gating import GateConfig, GateSet, select_layers
    from maskattn_deploy.gating.checkpoint import checkpoint_from_gates, write_checkpoint
    from maskattn_deploy.utils import build_once

    target = cache_root() / f"tiny-gates-seeded-{seed}"

    def write() -> None:
        unet = build_tiny_unet()
        config = GateConfig()
        torch.manual_seed(seed)
        gates = GateSet(config, select_layers(unet, config))
        meta = {"kind": "untrained", "seed": seed}
        write_checkpoint(checkpoint_from_gates(gates, unet, step=0, metadata=meta), target)

    build_once(target, lambda path: (path / "gates.json").is_file(), write, log.info)
    return target
