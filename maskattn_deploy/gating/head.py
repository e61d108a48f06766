"""The gate head: a token-conditioned map of gate logits ``g [b, n, t]``.

``u = MLP_x(x)`` on the latent tokens entering attn2 and ``v = MLP_e(ctx)`` on the raw encoder
hidden states (before to_k); ``g = u v^T / sqrt(k) + beta``. The text MLP and the logits are
always fp32; the latent MLP is fp32 by default and may run in the activation dtype
(:class:`~maskattn_deploy.gating.modes.HeadPrecision`). ``v`` comes from its own method,
:meth:`GateHead.text_features`, so that a shared head computes it once per UNet forward
(:mod:`maskattn_deploy.gating.text_cache`); the forward takes it as an input.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from maskattn_deploy.gating.modes import HeadPrecision

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


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type`` if it is on (the head picks its own dtypes)."""
    # A constant tuple, not torch.amp.is_autocast_available: torch.compile (2.11) cannot
    # trace that builtin and would break the graph in every gated layer. "meta" (shape-only
    # runs) has no autocast.
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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

    def forward(
        self,
        latents: torch.Tensor,
        text_features: torch.Tensor,
        precision: HeadPrecision = HeadPrecision.FP32,
    ) -> torch.Tensor:
        """Gate logits ``[b, n, t]`` fp32 from latents ``[b, n, c]`` and ``v`` ``[b, t, k]``.

        ``v`` is :meth:`text_features` of the context (computed once per forward and head by
        the GateSet). A module call, so an export scopes these nodes under the head.
        """
        self._check_width("latent", latents, self.latent_dim)
        with _without_autocast(latents.device.type):
            u = self._latent_features(latents, precision)  # [b, n, k] fp32
            return torch.matmul(u, text_features.transpose(-1, -2)) * self.scale + self.bias

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        """``v = MLP_e(ctx)``: context ``[b, t, e]`` -> ``[b, t, k]`` fp32 (even in autocast)."""
        self._check_width("text", context, self.text_dim)
        with _without_autocast(context.device.type):
            return self.text_mlp(context.float())

    def _latent_features(self, latents: torch.Tensor, precision: HeadPrecision) -> torch.Tensor:
        if precision is HeadPrecision.FP32 or latents.dtype == torch.float32:
            return self.latent_mlp(latents.float())
        # The MLP in the activation dtype: the weights are cast (k x c, small), the activation
        # is not copied. PyTorch's LayerNorm keeps its statistics in fp32 for fp16/bf16 input.
        dtype = latents.dtype
        norm, first, _, second = self.latent_mlp
        x = F.layer_norm(
            latents, norm.normalized_shape, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps
        )
        x = F.silu(F.linear(x, first.weight.to(dtype), first.bias.to(dtype)))
        return F.linear(x, second.weight.to(dtype), second.bias.to(dtype)).float()

    def _check_width(self, what: str, x: torch.Tensor, expected: int) -> None:
        if x.shape[-1] != expected:
            raise ValueError(
                f"gate head expects {what} width {expected}, got {x.shape[-1]}: "
                "the gates belong to another model"
            )
