"""``maskattn::masked_softmax`` and ``maskattn::gated_attention`` as torch.library custom ops.

The gated attention processor calls them at inference time. Each is one node for the dynamo
ONNX exporter (see :mod:`maskattn_deploy.export`). ``masked_softmax`` dispatches to the Triton
kernel on CUDA when that is available (registered by
:func:`maskattn_deploy.plugins.torch_kernel.register`), falling back to the reference everywhere
else. ``gated_attention`` (``scale * q k^T -> masked softmax -> p v`` in one call) picks its
implementation with its ``impl`` argument (:mod:`maskattn_deploy.ops.attention`). Both have fake
kernels, so ``torch.compile`` traces them without a graph break.
"""

from __future__ import annotations

import torch

from maskattn_deploy.ops.attention import empty_output, run_impl
from maskattn_deploy.ops.contract import (
    DEFAULT_ATTENTION_IMPL,
    DEFAULT_THRESHOLD,
    TORCH_ATTENTION_QUALNAME,
    TORCH_QUALNAME,
)
from maskattn_deploy.ops.reference import check_attention_shapes, masked_softmax_reference


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


@torch.library.custom_op(TORCH_ATTENTION_QUALNAME, mutates_args=())
def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float,
    scale: float,
    impl: str,
) -> torch.Tensor:
    """``o = masked_softmax(scale * q k^T, gate_logits) v``; ``o [b,h,n,d]`` in [b,n,h,d] memory."""
    return run_impl(q, k, v, gate_logits, threshold, scale, impl)


@gated_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float,
    scale: float,
    impl: str,
) -> torch.Tensor:
    check_attention_shapes(q, k, v, gate_logits)
    return empty_output(q)


def gated_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | None = None,
    *,
    impl: str = DEFAULT_ATTENTION_IMPL,
) -> torch.Tensor:
    """Call the gated-attention op (defaults: threshold 0, scale ``d ** -0.5``, Triton kernel).

    q ``[b,h,n,d]``, k and v ``[b,h,t,d]``, gate logits ``[b,n,t]`` (fp32 or q's dtype).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return gated_attention(q, k, v, gate_logits, float(threshold), float(scale), impl)
