"""Hard masks and the straight-through estimator used for training."""

from __future__ import annotations

import torch

from maskattn_deploy.ops.contract import TRAINING_NEGATIVE_BIAS
from maskattn_deploy.ops.reference import open_mask


def straight_through_gate(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Forward: the hard mask (with argmax fallback) exactly; backward: d sigmoid(g - threshold).

    ``hard + (soft - soft.detach())`` has the value of ``hard`` exactly (x - x == 0 in floating
    point) and the gradient of ``soft``.
    """
    soft = torch.sigmoid(gate_logits.float() - threshold)
    hard = open_mask(gate_logits, threshold).to(soft.dtype)
    return hard + (soft - soft.detach())


def training_softmax(
    logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Masked softmax for training: a finite negative bias on closed tokens, STE gradient.

    logits ``[b, h, n, t]``, gate logits ``[b, n, t]``; returns fp32 probabilities.
    """
    gate = straight_through_gate(gate_logits, threshold)  # [b, n, t], values in {0, 1}
    bias = (1.0 - gate) * TRAINING_NEGATIVE_BIAS
    return torch.softmax(logits.float() + bias[:, None], dim=-1)
