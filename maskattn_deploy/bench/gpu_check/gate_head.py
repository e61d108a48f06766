"""The ``gate_head`` part: does the gate head's latent MLP in the activation dtype flip gates?

The latent MLP can run in the UNet's dtype (``HeadPrecision.ACTIVATION``) instead of on an fp32
copy of the whole activation, which is cheaper; it stays off by default unless it flips no gate
on the check's inputs. On the run's UNet (an fp16 copy of the tiny UNet on the dry run), each
gated layer's recorded inputs go through the head both ways and parity's gate-agreement tool
counts the flips (``maskattn_deploy.bench.gate_head``, what ``bench --gate-head`` reports).
"""

from __future__ import annotations

import copy

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.model import GATE_STAGE, shared_model
from maskattn_deploy.bench.gpu_check.results import GateFlips, GateHeadData, Part


def gate_head_part(part: Part[GateHeadData], ctx: RunContext) -> None:
    from maskattn_deploy.bench.gate_head import count_gate_flips
    from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

    model = shared_model(ctx)
    gates = model.gates
    data = part.data = GateHeadData(ctx.plan.model, len(gates.layers), len(gates.heads))
    dtype = getattr(torch, ctx.plan.flip_dtype)
    unet, own_copy = model.gated, False
    if next(unet.parameters()).dtype != dtype:  # the dry run's fp32 tiny UNet: an fp16 copy
        unet, own_copy = copy.deepcopy(model.unet).to(dtype), True
        install_gates(unet, GateConfig(stage=GATE_STAGE), gates=gates)
    feed = {k: v if k == "timestep" else v.to(dtype) for k, v in model.inputs.items()}
    try:
        flips = count_gate_flips(unet, gates, feed, ctx.plan.flip_dtype.replace("float", "fp"))
    finally:
        if own_copy:
            remove_gates(unet)
    data.flips = GateFlips(**vars(flips))
    ctx.echo(f"  gate flips, activation-dtype latent MLP vs fp32 head ({flips.dtype}): "
             f"{flips.flips}/{flips.entries} ({flips.tolerated} within the parity margin)")  # fmt: skip
