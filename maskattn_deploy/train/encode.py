"""SDXL conditioning for training: VAE latents and the two-encoder text embeddings.

These mirror what ``StableDiffusionXLPipeline`` feeds its UNet at inference, so gates learn on
the same inputs they see in production:

- ``encoder_hidden_states`` = concat(penultimate hidden state of text_encoder,
  penultimate hidden state of text_encoder_2) along the feature axis ``[b, 77, 768 + 1280]``;
- ``text_embeds`` = text_encoder_2's pooled projection ``[b, 1280]``;
- ``time_ids`` = (original_h, original_w, crop_top, crop_left, target_h, target_w) ``[b, 6]``.

The VAE posterior is kept as (mean, std) so that cached and uncached runs sample latents the
same way: ``latents = (mean + std * eps) * scaling_factor`` with eps from the run's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextEncoders:
    """The two CLIP tokenizers and encoders of an SDXL pipeline."""

    tokenizers: tuple[Any, Any]
    encoders: tuple[torch.nn.Module, torch.nn.Module]

    @classmethod
    def from_pipeline(cls, pipe: Any) -> TextEncoders:
        return cls((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2))

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds ``[b, t, e1 + e2]``, pooled ``[b, p]``) for ``captions``."""
        hidden: list[torch.Tensor] = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL uses
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        assert pooled is not None
        return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) ``[b, 4, h/8, w/8]`` in fp32 for pixels in [-1, 1]."""
    param = next(vae.parameters())
    posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def scale_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Apply the VAE's shift (if any) and scaling factor, as diffusers pipelines do."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.scaling_factor
