"""Each shared gate head's text features, computed once per UNet forward instead of per layer.

With shared heads every gated layer of a stage computes ``v = MLP_e(ctx)`` from the same
encoder hidden states with the same weights: the same tensor, recomputed in each layer (50
times per SDXL step for the published ``mid`` stage). :class:`TextFeatureCache` keeps the first
layer's ``v`` for the others, scoped to one UNet forward:

- a forward pre-hook on the UNet opens the scope (empty) and a forward hook closes it, also
  when the forward raises, so a value never outlives the forward that computed it: the next
  forward (the other CFG half, the next denoising step, the forward after an optimizer update)
  computes its own;
- only the context tensor the scope first saw is served (``is``, not equality), so a layer fed
  other hidden states computes its own ``v``; calls outside a UNet forward are never cached;
- the scope stays closed when the UNet recomputes activations in backward (gradient
  checkpointing with grad enabled): a recomputed block must run the same ops as its forward.

The cached value is the very tensor the first layer computed, so outputs are bit-identical to
computing it per layer, and autograd sums the layers' gradients through it. Under
torch.compile the hooks are traced with the UNet (dict and attribute updates are ordinary side
effects, the ``is`` test is resolved at trace time), and an exported graph simply computes
``v`` once per head.
"""

from __future__ import annotations

from typing import Any

import torch


class TextFeatureCache:
    """``head id -> v [b, t, k]`` for the running UNet forward (empty outside one)."""

    def __init__(self) -> None:
        self.active = False
        self.context: torch.Tensor | None = None
        self.values: dict[str, torch.Tensor] = {}

    def open(self, unet: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook of the UNet: a fresh, empty scope for this forward."""
        self.values.clear()
        self.context = None
        self.active = not (torch.is_grad_enabled() and _recomputes_in_backward(unet))

    def close(self, unet: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook of the UNet (registered with ``always_call``): drop the scope's values."""
        self.values.clear()
        self.context = None
        self.active = False

    def get(self, head: str, context: torch.Tensor) -> torch.Tensor | None:
        """The features of ``head`` for ``context`` if this forward computed them already."""
        if self.active and self.context is context:
            return self.values.get(head)
        return None

    def put(self, head: str, context: torch.Tensor, features: torch.Tensor) -> None:
        """Keep ``features`` for the rest of the forward (only for the scope's context)."""
        if not self.active:
            return
        if self.context is None:
            self.context = context
        if self.context is context:
            self.values[head] = features


def _recomputes_in_backward(unet: torch.nn.Module) -> bool:
    """Whether the UNet recomputes blocks in backward (diffusers gradient checkpointing)."""
    return bool(getattr(unet, "is_gradient_checkpointing", False))
