"""GateSet: the trainable part of MaskAttn, and installing it on / removing it from a UNet."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from maskattn_deploy.gating.config import GateConfig
from maskattn_deploy.gating.head import GateHead
from maskattn_deploy.gating.modes import GateMode
from maskattn_deploy.gating.placement import GatedLayer, head_id, select_layers
from maskattn_deploy.gating.text_cache import TextFeatureCache

_INSTALLED = "_maskattn_installation"


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
        self.text_cache = TextFeatureCache()
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
        previous mode comes back on exit, exceptions included. Yields the mode in force. With
        gradient checkpointing, call ``backward()`` inside the block too: checkpointed blocks
        recompute their forward during backward and read the mode again.
        """
        new = (mode or self._mode).replace(**changes)
        previous, self._mode = self._mode, new
        try:
            yield new
        finally:
            self._mode = previous

    def gate_logits(self, layer: str, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """fp32 gate logits ``[b, n, t]`` of ``layer``; moves the heads to the input's device.

        A shared head's text features come from :attr:`text_cache` after the first layer of a
        UNet forward (``GateMode.text_cache``); the latent MLP runs at the mode's precision.
        """
        key = self.layer_to_head[layer]
        head = self.heads[key]
        if head.bias.device != latents.device:
            self.to(latents.device)
        mode = self._mode
        if mode.text_cache:
            features = self.text_cache.get(key, context)
            if features is None:
                features = head.text_features(context)
                self.text_cache.put(key, context, features)
        else:
            features = head.text_features(context)
        return head(latents, features, mode.latent_precision)

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


@dataclass
class _Installation:
    """What :func:`install_gates` changed on a UNet, so :func:`remove_gates` restores it."""

    gates: GateSet
    processors: dict[str, Any]  # attn processor name -> the processor before install
    requires_grad: dict[str, bool]  # parameter name -> its flag before install
    hooks: tuple[RemovableHandle, ...]  # the text cache's forward pre-hook and forward hook


def install_gates(unet: nn.Module, config: GateConfig, gates: GateSet | None = None) -> GateSet:
    """Install gate processors on the selected attn2 layers of ``unet`` and freeze the backbone.

    Backbone weights are never modified; ``requires_grad`` flags are cleared, two forward
    hooks scope the shared text features to one forward (:mod:`.text_cache`), and the gated
    layers get :class:`~maskattn_deploy.gating.processor.MaskAttnProcessor`s.
    :func:`remove_gates` undoes all three. Returns the :class:`GateSet` (new, fp32, on the
    UNet's device) unless ``gates`` is given.
    """
    from maskattn_deploy.gating.processor import MaskAttnProcessor

    unet = _module(unet)
    if installed_gates(unet) is not None:
        raise ValueError("gates are already installed on this UNet; call remove_gates first")
    layers = select_layers(unet, config)
    if gates is None:
        device = next(unet.parameters()).device
        gates = GateSet(config, layers).to(device=device, dtype=torch.float32)
    elif set(gates.layers) != {layer.name for layer in layers}:
        raise ValueError("the GateSet was built for other layers than this UNet/config selects")
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    for param in unet.parameters():
        param.requires_grad_(False)
    original = dict(unet.attn_processors)
    processors = dict(original)
    for layer in layers:
        processors[f"{layer.name}.processor"] = MaskAttnProcessor(gates, layer.name)
    unet.set_attn_processor(processors)
    hooks = (
        unet.register_forward_pre_hook(gates.text_cache.open),
        unet.register_forward_hook(gates.text_cache.close, always_call=True),
    )
    object.__setattr__(unet, _INSTALLED, _Installation(gates, original, requires_grad, hooks))
    return gates


def remove_gates(unet: nn.Module) -> GateSet | None:
    """Undo :func:`install_gates`: the processors, ``requires_grad`` flags and hooks before it."""
    unet = _module(unet)
    installation: _Installation | None = unet.__dict__.get(_INSTALLED)
    if installation is None:
        return None
    unet.set_attn_processor(installation.processors)
    for handle in installation.hooks:
        handle.remove()
    for name, param in unet.named_parameters():
        param.requires_grad_(installation.requires_grad.get(name, param.requires_grad))
    object.__delattr__(unet, _INSTALLED)
    return installation.gates


def installed_gates(unet: nn.Module) -> GateSet | None:
    """The GateSet installed on ``unet``, if any."""
    installation: _Installation | None = _module(unet).__dict__.get(_INSTALLED)
    return None if installation is None else installation.gates


def _module(unet: nn.Module) -> nn.Module:
    """The UNet itself when ``unet`` is its ``torch.compile`` wrapper."""
    return getattr(unet, "_orig_mod", unet)
