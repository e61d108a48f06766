"""The gate head: a token-conditioned map of gate logits ``g [b, n, t]``.

``u = MLP_x(x)`` on the latent tokens entering attn2 and ``v = MLP_e(ctx)`` on the raw encoder
hidden states (before to_k); ``g = u v^T / sqrt(k) + beta``. Always computed in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Device types with an autocast mode that a gated UNet runs on.
AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "hpu")


def _mlp(in_dim: int, hidden_dim: int) -> nn.Sequential:
    # LayerNorm -> Linear -> SiLU -> Linear (indices 0, 1, 3 hold parameters).
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, hidden_dim),
    )


class GateHead(nn.Module):
    """Gate logits for one layer (or one stage when heads are shared)."""

    def __init__(self, latent_dim: int, text_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.text_dim = text_dim
        self.hidden_dim = hidden_dim
        self.latent_mlp = _mlp(latent_dim, hidden_dim)
        self.text_mlp = _mlp(text_dim, hidden_dim)
        self.bias = nn.Parameter(torch.zeros(()))
        self.scale = 1.0 / math.sqrt(hidden_dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents ``[b, n, c]``, context ``[b, t, e]`` -> gate logits ``[b, n, t]`` in fp32."""
        if latents.shape[-1] != self.latent_dim or context.shape[-1] != self.text_dim:
            raise ValueError(
                f"gate head expects widths {self.latent_dim}/{self.text_dim}, got "
                f"{latents.shape[-1]}/{context.shape[-1]}: the gates belong to another model"
            )
        device_type = latents.device.type  # "meta" (shape-only runs) has no autocast
        # A constant tuple, not torch.amp.is_autocast_available: torch.compile (2.11) cannot
        # trace that builtin and would break the graph in every gated layer.
        autocast = device_type in AUTOCAST_DEVICE_TYPES
        if autocast and torch.is_autocast_enabled(device_type):  # fp32 even inside autocast
            with torch.autocast(device_type, enabled=False):
                return self._logits(latents, context)
        return self._logits(latents, context)

    def _logits(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        u = self.latent_mlp(latents.float())  # [b, n, k]
        v = self.text_mlp(context.float())  # [b, t, k]
        return torch.matmul(u, v.transpose(-1, -2)) * self.scale + self.bias  # [b, n, t]
