"""The SDXL base UNet written out in code, so a full-size UNet builds with no download.

The values are those of ``unet/config.json`` in ``stabilityai/stable-diffusion-xl-base-1.0``
(diffusers ``UNet2DConditionModel``): 2,567,463,684 parameters, 1024x1024 images as 128x128
latents, three levels of widths (320, 640, 1280) with (1, 2, 10) transformer layers, 64-wide
attention heads (diffusers' ``attention_head_dim`` is the head *count* here: 5, 10, 20), text
width 2048 (the two CLIP encoders concatenated) and "text_time" add-embeds (pooled text 1280 +
six size/crop ids x 256 = 2816). The GPU validation run instantiates it with random weights;
the tests instantiate it on the meta device to prove it is the documented architecture.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Published parameter count of the SDXL base UNet (2.57 B).
SDXL_UNET_PARAMETERS = 2_567_463_684
SDXL_POOLED_TEXT_DIM = 1280

_SDXL_BASE_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 2816,
    "num_class_embeds": None,
    "upcast_attention": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}


def sdxl_unet_config() -> dict[str, Any]:
    """Keyword arguments of ``UNet2DConditionModel`` for the SDXL base UNet (a fresh copy)."""
    return dict(_SDXL_BASE_UNET)


def build_sdxl_unet(
    device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, seed: int = 0
) -> torch.nn.Module:
    """The SDXL base UNet with random weights, built directly on ``device``.

    ``device="meta"`` allocates nothing (shapes, dtypes and parameter counts only). On CUDA the
    weights are created and initialised on the GPU (seconds instead of a minute of CPU
    initialisation of 2.6 B parameters), then cast to ``dtype``.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    unet = unet.to(device=device, dtype=dtype)  # also moves anything created on the CPU
    logger.info("built the SDXL UNet on %s (%s)", device, dtype)
    return unet.eval()


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
