"""Module adapters: each component's torch module with the spec's positional I/O.

The exporter traces these modules, the torch backend runs them, training calls the UNet
adapter and the GPU check times it, so the PyTorch reference is the module that was traced.
Inputs are positional in the order of
:data:`~maskattn_deploy.export.component_spec.SPECS` and outputs come back in the spec's
output order (a tuple when a component has several).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class UNetModule(nn.Module):
    """The SDXL UNet called with flat inputs instead of ``added_cond_kwargs``.

    ``gates`` (a GateSet) becomes a registered submodule so an export writes the gate weights
    as initializers; running and training pass None (the gates act through the UNet's
    attention processors either way).
    """

    def __init__(self, unet: nn.Module, gates: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.gates = gates

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        # diffusers concatenates text_embeds with the fp32 time-id embedding; eager torch
        # promotes that concat to fp32, the dynamo exporter does not (docs/design.md section
        # 6.3), so the promotion is made explicit. Numerically a no-op in eager torch.
        cond = {"text_embeds": text_embeds.float(), "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False
        )[0]


class TextEncoderModule(nn.Module):
    """CLIP text encoder -> Optimum's output layout: (``text_embeds``,) ``last_hidden_state``,
    then every hidden state (the embeddings, then each layer's output).

    SDXL conditions on the penultimate hidden state of both encoders and on the second one's
    pooled projection; the other outputs are what Optimum's pipeline reads by name.
    """

    def __init__(self, encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        first = (out.text_embeds,) if self.pooled else ()
        return (*first, out.last_hidden_state, *out.hidden_states)


class VaeDecoderModule(nn.Module):
    """Latents (already divided by the scaling factor) -> image in [-1, 1] (unclamped)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderModule(nn.Module):
    """Image in [-1, 1] -> mean of the latent distribution (not scaled)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.mean


_ADAPTERS: dict[str, Callable[[nn.Module, nn.Module | None], nn.Module]] = {
    "unet": UNetModule,
    "text_encoder": lambda m, _: TextEncoderModule(m, pooled=False),
    "text_encoder_2": lambda m, _: TextEncoderModule(m, pooled=True),
    "vae_decoder": lambda m, _: VaeDecoderModule(m),
    "vae_encoder": lambda m, _: VaeEncoderModule(m),
}


def adapter_for(component: str, module: nn.Module, gates: nn.Module | None = None) -> nn.Module:
    """The adapter of ``component`` around ``module`` (a diffusers / transformers model)."""
    return _ADAPTERS[component](module, gates)


def inner_module(adapter: nn.Module) -> nn.Module:
    """The wrapped diffusers / transformers model of an adapter."""
    for attr in ("unet", "encoder", "vae"):
        if isinstance(getattr(adapter, attr, None), nn.Module):
            return getattr(adapter, attr)
    return adapter


def as_outputs(component_outputs: tuple[str, ...], result: Any) -> dict[str, torch.Tensor]:
    """An adapter's return value as output name -> tensor."""
    values = result if isinstance(result, (tuple, list)) else (result,)
    return dict(zip(component_outputs, values, strict=True))
