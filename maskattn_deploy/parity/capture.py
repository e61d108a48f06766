"""Record, during a torch UNet forward, each gated layer's gate logits and attention probabilities.

Nothing in the model is patched: a forward pre-hook on every gated ``attn2`` module notes which
layer is running, and a ``TorchDispatchMode`` sees each call of the ``maskattn::masked_softmax``
custom op (the one the gated processor calls at inference), whose inputs are the logits
``S [b, h, n, t]`` and gate logits ``G [b, 1, n, t]`` and whose output is ``P [b, h, n, t]``.
The reference therefore reports exactly what its own op saw and returned. Eager inference
normally takes the processor's SDPA path (same semantics, no probabilities to see), so the
GateSet runs in its ``op`` mode for the duration of the capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maskattn_deploy.gating.modes import AttentionImpl
from maskattn_deploy.ops.contract import TORCH_NAMESPACE, TORCH_OP_NAME


@dataclass
class LayerRecord:
    """What one gated layer computed in one forward (CPU, fp32 gate logits)."""

    layer: str
    gate_logits: torch.Tensor  # [b, n, t]
    probs: torch.Tensor  # [b, h, n, t]
    threshold: float


@dataclass
class Capture:
    """Records in execution order (the order localisation walks)."""

    records: list[LayerRecord] = field(default_factory=list)
    keep_probs: bool = True

    def by_layer(self) -> dict[str, LayerRecord]:
        return {record.layer: record for record in self.records}


class _OpRecorder(TorchDispatchMode):
    """Sees every op; keeps the masked-softmax calls, attributed to the running layer."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture
        self.layer: str | None = None
        self.op = getattr(getattr(torch.ops, TORCH_NAMESPACE), TORCH_OP_NAME).default

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func is self.op and self.layer is not None:
            threshold = args[2] if len(args) > 2 else (kwargs or {}).get("threshold", 0.0)
            probs = out.detach().cpu() if self.capture.keep_probs else torch.empty(0)
            self.capture.records.append(
                LayerRecord(self.layer, args[1][:, 0].detach().float().cpu(), probs, threshold)
            )
            self.layer = None
        return out


@contextlib.contextmanager
def capture_gated_layers(
    unet: torch.nn.Module, gates: Any, keep_probs: bool = True
) -> Iterator[Capture]:
    """Within the block, every forward of ``unet`` appends one record per layer of ``gates``."""
    layers = gates.layers
    capture = Capture(keep_probs=keep_probs)
    recorder = _OpRecorder(capture)

    def hook_for(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            recorder.layer = name

        return hook

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in layers
    ]
    try:
        with gates.mode(attention=AttentionImpl.OP), recorder:
            yield capture
    finally:
        for handle in handles:
            handle.remove()
