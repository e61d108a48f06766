"""The Triton kernel as the CUDA implementation of the ``maskattn::masked_softmax`` torch op.

:func:`register` installs it once (the gating processor calls it on CUDA). Without Triton or
without a CUDA device it does nothing and returns False, so the op keeps its reference
implementation; CPU tensors always take the reference path.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_registered = False


def cuda_masked_softmax(logits: Any, gate_logits: Any, threshold: float) -> Any:
    """Kernel path for the op: gate logits shared over heads go to Triton, others to the reference."""
    from maskattn_deploy.plugins.masked_softmax_triton import masked_softmax_triton

    from maskattn_deploy.ops.reference import masked_softmax_reference

    if gate_logits.shape[1] != 1 or logits.dim() != 4:
        return masked_softmax_reference(logits, gate_logits, threshold)
    return masked_softmax_triton(logits, gate_logits, threshold)


def kernel_available() -> bool:
    """True when Triton imports and torch sees a CUDA device."""
    from maskattn_deploy._lazy import available

    if not available("triton"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def register() -> bool:
    """Register the Triton kernel for CUDA tensors; idempotent. False when it cannot run here."""
    global _registered
    with _lock:
        if _registered:
            return True
        if not kernel_available():
            logger.info(
                "Triton or CUDA absent: maskattn::masked_softmax keeps the reference kernel"
            )
            return False
        from maskattn_deploy.ops.torch_op import masked_softmax

        masked_softmax.register_kernel("cuda")(cuda_masked_softmax)
        _registered = True
        logger.info("maskattn::masked_softmax uses the Triton kernel on CUDA")
        return True
