"""GateSet: the trainable part of MaskAttn, and installing it on / removing it from a UNet."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from maskattn_deploy.gating.config import GateConfig
from maskattn_deploy.gating.head import GateHead
from maskattn_deploy.gating.modes import GateMode
from maskattn_deploy.gating.placement import GatedLayer, head_id, select_layers

_ATTR = "_maskattn_gates"
_ORIGINAL = "_maskattn_original_processors"


class GateSet(nn.Module):
    """All gate heads of one UNet plus the layer -> head map (fp32, follows the UNet's device).

    How the heads and processors run (inference path, straight-through training, observing
    the open masks, head precision) is one :class:`GateMode`, changed with :meth:`mode`.
    """

    def __init__(self, config: GateConfig, layers: list[GatedLayer]) -> None:
        super().__init__()
        self.config = config
        self.layer_info = {layer.name: layer for layer in layers}
        self.layer_to_head = {layer.name: head_id(layer, config.share_heads) for layer in layers}
        self.heads = nn.ModuleDict()
        for layer in layers:
            key = self.layer_to_head[layer.name]
            if key not in self.heads:
                self.heads[key] = GateHead(layer.latent_dim, layer.text_dim, config.hidden_dim)
        self.threshold = float(config.threshold)
        self._mode = GateMode()
        self._last_open: dict[str, torch.Tensor] = {}
        self._records: dict[str, list[torch.Tensor]] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.layer_info)

    def stage_of(self, layer: str) -> str:
        return self.layer_info[layer].stage

    @property
    def current_mode(self) -> GateMode:
        """The mode the gated processors run in now (change it with :meth:`mode`)."""
        return self._mode

    @contextlib.contextmanager
    def mode(self, mode: GateMode | None = None, /, **changes: Any) -> Iterator[GateMode]:
        """Run the block in ``mode`` (default: the current one) with ``changes`` applied.

        ``gates.mode(attention="op")``, ``gates.mode(GateMode.for_training("relaxed"))``; the
        previous mode comes back on exit, exceptions included. Yields the mode in force.
        """
        new = (mode or self._mode).replace(**changes)
        previous, self._mode = self._mode, new
        try:
            yield new
        finally:
            self._mode = previous

    def gate_logits(self, layer: str, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """fp32 gate logits ``[b, n, t]`` of ``layer``; moves the heads to the input's device."""
        head = self.heads[self.layer_to_head[layer]]
        if head.bias.device != latents.device:
            self.to(latents.device)
        return head(latents, context)

    def observe(self, layer: str, is_open: torch.Tensor) -> None:
        self._last_open[layer] = is_open
        if self._records is not None:
            self._records[layer].append(is_open.cpu())

    def open_fractions(self) -> dict[str, float]:
        """Fraction of open gate entries per stage in the last observed forward."""
        by_stage: dict[str, list[torch.Tensor]] = defaultdict(list)
        for layer, is_open in self._last_open.items():
            by_stage[self.stage_of(layer)].append(is_open.float().mean())
        return {stage: float(torch.stack(v).mean()) for stage, v in sorted(by_stage.items())}

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record every forward's open mask ``[b, n, t]`` (bool, CPU) per layer."""
        records: dict[str, list[torch.Tensor]] = defaultdict(list)
        previous, self._records = self._records, records
        try:
            with self.mode(observing=True):
                yield records
        finally:
            self._records = previous

    @contextlib.contextmanager
    def forced_open(self) -> Iterator[None]:
        """Open every gate (threshold -inf): the UNet then equals the ungated one."""
        previous, self.threshold = self.threshold, float("-inf")
        try:
            yield
        finally:
            self.threshold = previous

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def install_gates(unet: nn.Module, config: GateConfig, gates: GateSet | None = None) -> GateSet:
    """Install gate processors on the selected attn2 layers of ``unet`` and freeze the backbone.

    Backbone weights are never modified; only ``requires_grad`` flags are cleared. Returns the
    :class:`GateSet` (new, fp32, on the UNet's device) unless ``gates`` is given.
    """
    from maskattn_deploy.gating.processor import MaskAttnProcessor

    if getattr(unet, _ATTR, None) is not None:
        raise ValueError("gates are already installed on this UNet; call remove_gates first")
    layers = select_layers(unet, config)
    if gates is None:
        device = next(unet.parameters()).device
        gates = GateSet(config, layers).to(device=device, dtype=torch.float32)
    elif set(gates.layers) != {layer.name for layer in layers}:
        raise ValueError("the GateSet was built for other layers than this UNet/config selects")
    for param in unet.parameters():
        param.requires_grad_(False)
    original = dict(unet.attn_processors)
    processors = dict(original)
    for layer in layers:
        processors[f"{layer.name}.processor"] = MaskAttnProcessor(gates, layer.name)
    unet.set_attn_processor(processors)
    object.__setattr__(unet, _ATTR, gates)
    object.__setattr__(unet, _ORIGINAL, original)
    return gates


def remove_gates(unet: nn.Module) -> GateSet | None:
    """Restore the processors that were there before :func:`install_gates`."""
    gates = getattr(unet, _ATTR, None)
    if gates is None:
        return None
    unet.set_attn_processor(getattr(unet, _ORIGINAL))
    object.__setattr__(unet, _ATTR, None)
    object.__setattr__(unet, _ORIGINAL, None)
    return gates


def installed_gates(unet: nn.Module) -> GateSet | None:
    """The GateSet installed on ``unet``, if any."""
    return getattr(unet, _ATTR, None)
