"""The gated cross-attention processor (a diffusers attention processor for ``attn2``).

It mirrors diffusers' ``AttnProcessor2_0`` projections and output path, but computes the
attention probabilities explicitly so the gate can restrict the softmax:

    s = q k^T * scale          [b, h, n, t]
    g = gate_head(x, ctx)      [b, n, t]   (fp32)
    p = masked_softmax(s, g)   [b, h, n, t]  (exact mask at inference, STE when training)
    o = p v                    [b, h, n, d]

How the probabilities are formed is chosen in one place, :meth:`MaskAttnProcessor._attend`, by
the GateSet's :class:`~maskattn_deploy.gating.modes.GateMode`: its ``attention`` field picks the
inference path (:class:`~maskattn_deploy.gating.modes.AttentionImpl`: ``sdpa`` hands the open
set to PyTorch's fused attention as a -inf bias, ``op`` calls the ``maskattn::masked_softmax``
custom op, ``fused`` and ``flex`` the ``maskattn::gated_attention`` op (QK^T, masked softmax
and PV in one call: the fused Triton kernel or FlexAttention), ``reference`` the oracle,
``auto`` is ``sdpa`` on the CPU and ``fused`` on CUDA); exports trace ``fused`` as one
``MaskedCrossAttention`` node per gated layer and every other mode as ``op`` (one
``MaskedSoftmax`` node), and training mode takes the straight-through path. The processor is a plain object (not an nn.Module) so that casting the
UNet to fp16 never casts the gates, which stay fp32 in their :class:`GateSet`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from maskattn_deploy.gating.mask import training_softmax
from maskattn_deploy.gating.modes import AttentionImpl, GateMode
from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask
from maskattn_deploy.ops.torch_op import gated_attention_op, masked_softmax_op

if TYPE_CHECKING:
    from maskattn_deploy.gating.gateset import GateSet


class MaskAttnProcessor:
    """Processor for one gated ``attn2`` layer; the heads live in the shared :class:`GateSet`."""

    def __init__(self, gates: GateSet, layer_name: str) -> None:
        self.gates = gates
        self.layer_name = layer_name
        # Here, not in __call__: a registration inside the forward is a graph break for
        # torch.compile (a cached function holding a lock) in every gated layer.
        _register_cuda_kernel()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer_name}: MaskAttn gates only apply to cross-attention")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        gate_logits = self.gates.gate_logits(self.layer_name, hidden_states, encoder_hidden_states)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, n, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, t, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, t, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        out = self._attend(query, key, value, gate_logits, mask, attn.scale)  # [b, h, n, d]

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_logits: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Gated attention ``[b, h, n, d]``: the one place that picks the implementation.

        q ``[b, h, n, d]``, k/v ``[b, h, t, d]``, fp32 gate logits ``[b, n, t]``, an optional
        additive mask ``[b, h, n|1, t]``; the path follows the GateSet's mode.
        """
        mode = self.gates.current_mode
        impl = _implementation(mode, query)
        if impl is AttentionImpl.SDPA:
            return self._sdpa(query, key, value, gate_logits, mask, scale, mode)
        if impl in _FUSED_KERNELS and mask is None:  # the op takes no additive mask
            if mode.observing:
                self.gates.observe(self.layer_name, open_mask(gate_logits, self.gates.threshold))
            return gated_attention_op(
                query, key, value, gate_logits, self.gates.threshold, scale,
                impl=_FUSED_KERNELS[impl],
            )  # fmt: skip
        logits = torch.matmul(query, key.transpose(-1, -2)) * scale  # [b, h, n, t]
        if mask is not None:
            logits = logits + mask.to(logits.dtype)
        probs = self._probabilities(logits, gate_logits, mode, impl)
        return torch.matmul(probs.to(value.dtype), value)

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_logits: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        mode: GateMode,
    ) -> torch.Tensor:
        """Same semantics as the op: closed tokens get exp(-inf) = 0 exactly, rows never empty."""
        is_open = open_mask(gate_logits, self.gates.threshold)  # [b, n, t]
        if mode.observing:
            self.gates.observe(self.layer_name, is_open)
        bias = torch.zeros(is_open.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill_(~is_open, float("-inf"))[:, None]  # [b, 1, n, t]
        if mask is not None:
            bias = bias + mask.to(bias.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)

    def _probabilities(
        self,
        logits: torch.Tensor,
        gate_logits: torch.Tensor,
        mode: GateMode,
        impl: AttentionImpl,
    ) -> torch.Tensor:
        """Explicit masked probabilities ``[b, h, n, t]`` (training, op or reference path)."""
        threshold = self.gates.threshold
        if mode.observing:
            self.gates.observe(self.layer_name, open_mask(gate_logits.detach(), threshold))
        if mode.training:
            return training_softmax(logits, gate_logits, threshold, mode.estimator)
        if impl is AttentionImpl.REFERENCE:
            return masked_softmax_reference(logits, gate_logits[:, None], threshold)
        return masked_softmax_op(logits, gate_logits[:, None], threshold)


# gated_attention op implementation of each fused mode (maskattn_deploy.ops.attention).
_FUSED_KERNELS = {AttentionImpl.FUSED: "triton", AttentionImpl.FLEX: "flex"}


def _implementation(mode: GateMode, query: torch.Tensor) -> AttentionImpl:
    """The concrete path (never ``AUTO``).

    Training needs explicit probabilities; an export traces one custom node per gated layer:
    ``MaskedCrossAttention`` in ``FUSED`` mode, ``MaskedSoftmax`` in every other mode.
    """
    if mode.training:
        return AttentionImpl.OP
    if _exporting():
        return AttentionImpl.FUSED if mode.attention is AttentionImpl.FUSED else AttentionImpl.OP
    if mode.attention is AttentionImpl.AUTO:
        return AttentionImpl.FUSED if query.is_cuda else AttentionImpl.SDPA
    return mode.attention


def _exporting() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.onnx.is_in_onnx_export()


@functools.cache
def _register_cuda_kernel() -> bool:
    """Route the op to the Triton kernel on CUDA (once; False without Triton or CUDA)."""
    from maskattn_deploy.plugins.torch_kernel import register

    return register()
