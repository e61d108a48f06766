"""What the exporter exports: a component's spec, its adapter module and its gate facts.

The I/O contract (names, axes, dtypes, dummy inputs, tolerances) is the component's
:class:`~maskattn_deploy.export.component_spec.ComponentSpec`; this module adds what only an
export needs: the module to trace (the spec's adapter), the export precision, the gated layers
and the optional per-layer probability outputs of ``--per-layer`` exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from maskattn_deploy.export.component_spec import (
    FLOAT,
    ComponentSpec,
    ModelDims,
    ShapePoint,
    TensorSpec,
    Tolerance,
    component_spec,
)
from maskattn_deploy.export.spec import BATCH, LATENT_H, LATENT_W, per_layer_output
from maskattn_deploy.gating import GateSet


@dataclass
class Component:
    """One component to export: spec, adapter module, precision and gate facts."""

    spec: ComponentSpec
    module: nn.Module
    precision: str  # fp32 | fp16
    gated_layers: list[str] = field(default_factory=list)
    threshold: float | None = None
    per_layer_outputs: dict[str, TensorSpec] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.outputs

    @property
    def tolerance(self) -> Tolerance:
        return self.spec.tolerance(self.precision)

    def graph_inputs(self, point: ShapePoint, seed: int) -> dict[str, torch.Tensor]:
        """The spec's dummy inputs at ``point`` in this export's graph dtypes."""
        return self.spec.graph_inputs(point, seed, self.precision)


def unet_component(
    unet: nn.Module, gates: GateSet | None, precision: str, dims: ModelDims | None = None
) -> Component:
    """The (gated) UNet. The caller casts ``unet`` for fp16; gates stay fp32."""
    spec = component_spec("unet", dims or ModelDims.from_unet_config(unet.config))
    return Component(
        spec=spec,
        module=spec.adapter(unet, gates).eval(),
        precision=precision,
        gated_layers=list(gates.layers) if gates is not None else [],
        threshold=float(gates.threshold) if gates is not None else None,
        per_layer_outputs=_per_layer_specs(unet, gates, spec.dims.text_tokens),  # type: ignore[union-attr]
    )


def _per_layer_specs(
    unet: nn.Module, gates: GateSet | None, text_tokens: int
) -> dict[str, TensorSpec]:
    """Shapes of the optional ``probs/<layer>`` outputs: [B, heads, tokens of the level, T]."""
    if gates is None:
        return {}
    levels = len(unet.down_blocks)
    specs = {}
    for layer in gates.layers:
        part, index = layer.split(".")[:2]
        if part == "down_blocks":
            level = int(index)
        elif part == "up_blocks":
            level = levels - 1 - int(index)
        else:  # mid_block: the lowest resolution
            level = levels - 1
        tokens = f"{LATENT_H}*{LATENT_W}" + (f"/{4**level}" if level else "")
        heads = int(unet.get_submodule(layer).heads)
        name = per_layer_output(layer)
        specs[name] = TensorSpec(name, (BATCH, heads, tokens, text_tokens), FLOAT)
    return specs


def pipeline_component(name: str, pipe: nn.Module, precision: str, dims: ModelDims) -> Component:
    """``text_encoder``, ``text_encoder_2``, ``vae_decoder`` or ``vae_encoder`` of ``pipe``."""
    spec = component_spec(name, dims)
    module = getattr(pipe, PIPELINE_ATTR[name])
    return Component(spec=spec, module=spec.adapter(module).eval(), precision=precision)


# component -> the pipeline attribute holding its module
PIPELINE_ATTR = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
