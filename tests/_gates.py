"""Gate checkpoints the export tests build on (no training: seeded, deterministic)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_distinct_gates(folder: Path) -> Path:
    """Seeded untrained gates on the mid stage, one head per layer, written under ``folder``.

    Each head's bias is distinct (0.01, 0.02, ...), so no two bias initializers coincide in an
    export and no gate logit sits at the threshold, where fp32 rounding could flip a gate
    between PyTorch and ONNX Runtime.
    """
    from maskattn_deploy.gating import GateConfig, GateSet, select_layers
    from maskattn_deploy.gating.checkpoint import checkpoint_from_gates, write_checkpoint
    from maskattn_deploy.models.tiny import build_tiny_unet

    unet = build_tiny_unet()
    config = GateConfig(share_heads=False)
    torch.manual_seed(7)
    gates = GateSet(config, select_layers(unet, config))
    with torch.no_grad():
        for i, head in enumerate(gates.heads.values()):
            head.bias.fill_(0.01 * (i + 1))
    ckpt = checkpoint_from_gates(gates, unet, step=0, metadata={"kind": "test"})
    return write_checkpoint(ckpt, folder / "gates")
