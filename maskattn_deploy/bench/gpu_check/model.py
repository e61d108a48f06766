"""The UNet the ``gate_head`` and ``unet`` parts share: built once, with its inputs and gates.

SDXL's UNet (random fp16 weights, built on the GPU from :mod:`maskattn_deploy.bench.sdxl_config`,
no download) or, in the dry run, the built-in tiny UNet; gates on the default ``mid`` stage;
one CFG step's inputs (batch 2, ``latent`` x ``latent`` latents, 77 text tokens) from the UNet's
component spec, called through the spec's module adapter as the export traces it.

The masked and the unmasked step run on two module trees over the same weights: the stock
UNet, and a twin of it (:func:`twin`) with the gates installed once. Installing and removing
gates between steps would give ``torch.compile`` new processor objects and hooks every time,
and every switch in an interleaved pair would recompile.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.plan import CFG_BATCH, Plan

GATE_STAGE = "mid"


def build_unet(plan: Plan, device: torch.device, seed: int) -> torch.nn.Module:
    """SDXL (random weights, built on the device) or the built-in tiny UNet."""
    dtype = getattr(torch, plan.unet_dtype)
    if plan.model == "sdxl":
        from maskattn_deploy.bench.sdxl_config import build_sdxl_unet

        return build_sdxl_unet(device, dtype, seed)
    from maskattn_deploy.models.tiny import build_tiny_unet

    unet = build_tiny_unet(seed)
    if dtype != torch.float32 or device.type != "cpu":
        unet = unet.to(device=device, dtype=dtype)
    return unet


def unet_inputs(
    unet: torch.nn.Module, latent: int, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, Any]:
    """One CFG step's inputs: the UNet spec's dummy inputs at batch 2 and ``latent``x``latent``
    latents (77 text tokens), in the graph dtypes of ``dtype`` (timestep and time_ids fp32)."""
    from maskattn_deploy.export.component_spec import (
        FLOAT,
        ModelDims,
        ShapePoint,
        component_spec,
    )
    from maskattn_deploy.export.spec import LATENT_FACTOR

    spec = component_spec("unet", ModelDims.from_unet_config(unet.config))
    size = latent * LATENT_FACTOR
    feed = spec.dummy_inputs(ShapePoint(CFG_BATCH, size, size), seed)
    return {
        t.name: feed[t.name].to(device=device, dtype=dtype if t.dtype == FLOAT else None)
        for t in spec.inputs
    }


def unet_step_module(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet's spec adapter: takes :func:`unet_inputs` positionally, as the export does."""
    from maskattn_deploy.export.component_spec import spec_template

    return spec_template("unet").adapter(unet)


def shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    """Input name -> shape (nested dicts stay nested)."""
    return {k: shapes(v) if isinstance(v, dict) else list(v.shape) for k, v in inputs.items()}


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors (no weight memory)."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, shared)


@dataclass
class Model:
    """The stock UNet, its gated twin (same weights), the step inputs and the gates."""

    unet: torch.nn.Module  # diffusers' processors, no gates
    gated: torch.nn.Module  # gates installed on every mid-stage attn2
    inputs: dict[str, Any]
    gates: Any  # GateSet
    build_s: float


def shared_model(ctx: RunContext) -> Model:
    """The run's UNet, built on first use (the first part that needs it pays the build)."""
    if ctx.model is None:
        from maskattn_deploy.gating import GateConfig, install_gates

        start = time.perf_counter()
        unet = build_unet(ctx.plan, ctx.device, ctx.config.seed).eval()
        ctx.timer.sync()
        dtype = getattr(torch, ctx.plan.unet_dtype)
        inputs = unet_inputs(unet, ctx.plan.latent, dtype, ctx.device, ctx.config.seed)
        gated = twin(unet)
        gates = install_gates(gated, GateConfig(stage=GATE_STAGE))
        ctx.model = Model(unet, gated, inputs, gates, time.perf_counter() - start)
        ctx.echo(f"  {ctx.plan.model} UNet built in {ctx.model.build_s:.1f} s "
                 f"({len(gates.layers)} gated layers)")  # fmt: skip
    return ctx.model


def release_model(ctx: RunContext) -> None:
    """Drop the UNet and compiled code (the tuning part needs the memory, not the model)."""
    import torch._dynamo as dynamo

    ctx.model = None
    ctx.outputs.clear()
    dynamo.reset()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
