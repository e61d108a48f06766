"""Hard masks and the straight-through estimator used for training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskattn_deploy.gating.modes import ESTIMATORS, Estimator
from maskattn_deploy.ops.contract import TRAINING_NEGATIVE_BIAS
from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask


def straight_through_gate(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Forward: the hard mask (with argmax fallback) exactly; backward: d sigmoid(g - threshold).

    ``hard + (soft - soft.detach())`` has the value of ``hard`` exactly (x - x == 0 in floating
    point) and the gradient of ``soft``.
    """
    soft = torch.sigmoid(gate_logits.float() - threshold)
    hard = open_mask(gate_logits, threshold).to(soft.dtype)
    return hard + (soft - soft.detach())


def training_softmax(
    logits: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float,
    estimator: Estimator | str = Estimator.BIAS,
) -> torch.Tensor:
    """Masked softmax for training: the hard mask forward, an estimated gradient for the gates.

    logits ``[b, h, n, t]``, gate logits ``[b, n, t]``; returns fp32 probabilities. See
    :class:`~maskattn_deploy.gating.modes.Estimator`.
    """
    if estimator == Estimator.RELAXED:
        return relaxed_training_softmax(logits, gate_logits, threshold)
    if estimator != Estimator.BIAS:
        raise ValueError(f"unknown gate estimator {estimator!r}; choose {', '.join(ESTIMATORS)}")
    gate = straight_through_gate(gate_logits, threshold)  # [b, n, t], values in {0, 1}
    bias = (1.0 - gate) * TRAINING_NEGATIVE_BIAS
    return torch.softmax(logits.float() + bias[:, None], dim=-1)


def relaxed_training_softmax(
    logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Exact masked softmax forward; gate gradient of ``softmax(s + log sigmoid(g - threshold))``.

    The value is the exact masked softmax (``x - x == 0``); the logits get the exact masked
    softmax's gradient and the gate logits the relaxed one's, which is bounded and non-zero for
    closed tokens too.
    """
    s = logits.float()
    exact = masked_softmax_reference(s, gate_logits.detach()[:, None], threshold)
    soft_bias = F.logsigmoid(gate_logits.float() - threshold)[:, None]  # [b, 1, n, t]
    relaxed = torch.softmax(s.detach() + soft_bias, dim=-1)
    return exact + (relaxed - relaxed.detach())
