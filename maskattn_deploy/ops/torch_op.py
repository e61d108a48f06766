"""``maskattn::masked_softmax`` as a torch.library custom op.

The op is what the gated attention processor calls at inference time. It is one node for the
dynamo ONNX exporter (see :mod:`maskattn_deploy.export`) and dispatches to the Triton kernel on
CUDA when that is available (registered by :func:`maskattn_deploy.plugins.torch_kernel.register`),
falling back to the reference everywhere else.
"""

from __future__ import annotations

import torch

from maskattn_deploy.ops.contract import DEFAULT_THRESHOLD, TORCH_QUALNAME
from maskattn_deploy.ops.reference import masked_softmax_reference


@torch.library.custom_op(TORCH_QUALNAME, mutates_args=())
def masked_softmax(
    logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Masked softmax over the open set of ``gate_logits`` (reference semantics)."""
    return masked_softmax_reference(logits, gate_logits, threshold)


@masked_softmax.register_fake
def _(logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.empty_like(logits)


def masked_softmax_op(
    logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Call the custom op (keyword default for the threshold)."""
    return masked_softmax(logits, gate_logits, float(threshold))
