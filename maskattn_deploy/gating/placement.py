"""Which cross-attention layers of a UNet get gates, and which stage each belongs to.

Stages are defined by resolution so they mean the same on SDXL, the tiny model and SD 1.x/2.x:
the highest-resolution cross-attention level is ``high``, the other down/up cross-attention
levels are ``mid``, the UNet mid block is ``low``. On SDXL this is down_blocks.1/up_blocks.1 ->
high, down_blocks.2/up_blocks.0 -> mid, mid_block -> low (the reference implementation's map).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from maskattn_deploy.gating.config import GateConfig


@dataclass(frozen=True)
class GatedLayer:
    """One selected ``attn2`` module."""

    name: str  # module path, e.g. "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    stage: str  # high | mid | low
    latent_dim: int
    text_dim: int


def _cross_attention_levels(unet: nn.Module) -> list[int]:
    return [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]


def stage_of(unet: nn.Module, layer_name: str) -> str:
    """Stage label of an attn2 layer name (high / mid / low)."""
    levels = _cross_attention_levels(unet)
    if layer_name.startswith("mid_block."):
        return "low"
    part, index = layer_name.split(".")[:2]
    level = int(index)
    if part == "up_blocks":
        level = len(unet.down_blocks) - 1 - level
    return "high" if levels and level == min(levels) else "mid"


def _location(layer_name: str) -> str:
    return {"down_blocks": "encoder", "up_blocks": "decoder", "mid_block": "bridge"}.get(
        layer_name.split(".")[0], "other"
    )


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of every cross-attention ``attn2`` module, in module order."""
    names = []
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and getattr(module, "is_cross_attention", False):
            names.append(name)
    return names


def select_layers(unet: nn.Module, config: GateConfig) -> list[GatedLayer]:
    """The attn2 layers matching ``config``; raises ValueError when nothing matches."""
    all_layers = cross_attention_layers(unet)
    if not all_layers:
        raise ValueError(
            "this UNet has no cross-attention (attn2) layers; MaskAttn needs a text-conditioned "
            "UNet2DConditionModel such as SDXL or SD 1.x/2.x"
        )
    chosen = []
    for name in all_layers:
        location = _location(name)
        if config.placement == "encoder" and location != "encoder":
            continue
        if config.placement == "decoder" and location != "decoder":
            continue
        stage = stage_of(unet, name)
        if config.stage not in ("all", stage):
            continue
        attn = unet.get_submodule(name)
        chosen.append(GatedLayer(name, stage, int(attn.query_dim), int(attn.cross_attention_dim)))
    if not chosen:
        raise ValueError(
            f"no cross-attention layer matches stage={config.stage} placement={config.placement} "
            "(the 'low' stage is the mid block, which only placement=both includes)"
        )
    return chosen


def head_id(layer: GatedLayer, share_heads: bool) -> str:
    """Key of the gate head serving ``layer`` (module-dict safe: no dots)."""
    if share_heads:
        return f"{layer.stage}_{layer.latent_dim}"
    return layer.name.replace(".", "_")
