"""Reference (oracle) masked softmax: the semantics every other implementation must match.

Shapes: logits ``S [b, h, n, t]`` (fp16/bf16/fp32), gate logits ``G [b, 1, n, t]`` (fp32 or the
dtype of S; broadcast over heads). Output ``P [b, h, n, t]`` in the dtype of S.

Open set of a row (b, n): tokens with ``g > threshold``; a row with no open token opens exactly
the token with the largest g (ties: lowest index). Probabilities are a softmax over the open set
computed in fp32; closed tokens get exactly 0. Non-finite logits only affect their own row.

Gated attention (:func:`gated_attention_reference`) is the explicit path around it:
``o = masked_softmax(scale * q k^T, G) v`` with ``q [b,h,n,d]``, ``k, v [b,h,t,d]`` and gate
logits ``G [b,n,t]``; every fused implementation (the Triton kernel, FlexAttention) is tested
against it.
"""

from __future__ import annotations

import torch

from maskattn_deploy.ops.contract import DEFAULT_THRESHOLD


def open_mask(gate_logits: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Boolean open set ``[..., t]`` with the argmax fallback for rows that would be empty."""
    g = gate_logits.float()
    is_open = g > threshold
    row_empty = ~is_open.any(dim=-1, keepdim=True)
    # torch.argmax returns the first maximal index, which is the tie rule of the contract.
    fallback = torch.zeros_like(is_open).scatter_(-1, g.argmax(dim=-1, keepdim=True), True)
    return torch.where(row_empty, fallback, is_open)


def masked_softmax_reference(
    logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Softmax of ``logits`` over the open set of ``gate_logits`` (see module docstring)."""
    check_shapes(logits, gate_logits)
    is_open = open_mask(gate_logits, threshold)  # [b, 1, n, t]
    s = logits.float().masked_fill(~is_open, float("-inf"))  # [b, h, n, t]
    p = torch.softmax(s, dim=-1)
    return p.masked_fill(~is_open, 0.0).to(logits.dtype)


def check_shapes(logits: torch.Tensor, gate_logits: torch.Tensor) -> None:
    """Raise a clear error unless S is [b,h,n,t] and G is [b,1,n,t] (or [b,h,n,t])."""
    if logits.dim() != 4 or gate_logits.dim() != 4:
        raise ValueError(
            f"masked_softmax expects logits [b,h,n,t] and gate logits [b,1,n,t]; got "
            f"{tuple(logits.shape)} and {tuple(gate_logits.shape)}"
        )
    b, h, n, t = logits.shape
    gb, gh, gn, gt = gate_logits.shape
    if (gb, gn, gt) != (b, n, t) or gh not in (1, h):
        raise ValueError(
            f"gate logits {tuple(gate_logits.shape)} do not match logits {tuple(logits.shape)}: "
            "expected [b,1,n,t] with the same b, n and t"
        )
    if not logits.is_floating_point() or not gate_logits.is_floating_point():
        raise TypeError("masked_softmax needs floating-point logits and gate logits")


def gated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | None = None,
) -> torch.Tensor:
    """``masked_softmax(scale * q k^T, G) v``, the explicit path (``o [b,h,n,d]``, q's dtype).

    Logits and probabilities are rounded to q's dtype in between, as the gated processor's
    explicit path computes them; ``scale`` defaults to ``d ** -0.5``.
    """
    check_attention_shapes(q, k, v, gate_logits)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, h, n, t]
    probs = masked_softmax_reference(logits, gate_logits[:, None], threshold)
    return torch.matmul(probs.to(v.dtype), v)  # [b, h, n, d]


def check_attention_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor
) -> None:
    """Raise a clear error unless q [b,h,n,d], k/v [b,h,t,d] and G [b,n,t] agree."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or gate_logits.dim() != 3:
        raise ValueError(
            "gated_attention expects q [b,h,n,d], k and v [b,h,t,d], gate logits [b,n,t]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(gate_logits.shape)}"
        )
    b, h, n, d = q.shape
    if tuple(k.shape) != tuple(v.shape) or tuple(k.shape[:2]) != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [b,h,t,d] with q's "
            f"b={b}, h={h}, d={d}"
        )
    if tuple(gate_logits.shape) != (b, n, k.shape[2]):
        raise ValueError(
            f"gate logits {tuple(gate_logits.shape)} do not match: expected [b,n,t] = "
            f"{(b, n, k.shape[2])}"
        )
    if len({q.dtype, k.dtype, v.dtype}) != 1 or not q.is_floating_point():
        raise TypeError(
            f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not gate_logits.is_floating_point():
        raise TypeError(f"gate logits must be floating point, got {gate_logits.dtype}")
