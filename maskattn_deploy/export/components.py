"""Exportable components: the torch modules, their I/O described as data, and example inputs.

Each :class:`Component` says what is exported (a small wrapper module with positional tensor
inputs named as in :data:`~maskattn_deploy.export.spec.COMPONENT_IO`), the symbolic shape and
dtype of every input/output (the manifest records them as is), how to make seeded random
inputs at a given point, and the validation tolerance of each output with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from maskattn_deploy.export.spec import (
    BATCH,
    COMPONENT_IO,
    FP32_INPUTS,
    LATENT_H,
    LATENT_W,
    PIXEL_H,
    PIXEL_W,
    TEXT_TOKENS,
)
from maskattn_deploy.gating import GateSet

Dim = str | int
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype name and symbolic shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def concrete(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(values[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max|ort - torch| <= atol + rtol * max|torch|``."""

    atol: float
    rtol: float
    reason: str

    def limit(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max


@dataclass
class Component:
    """A module to export with its I/O contract."""

    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str  # fp32 | fp16
    make_input: Callable[[TensorSpec, tuple[int, ...], torch.Generator], torch.Tensor]
    tolerances: dict[str, Tolerance]
    gated_layers: list[str] = field(default_factory=list)
    threshold: float | None = None
    per_layer_outputs: dict[str, TensorSpec] = field(default_factory=dict)

    def random_inputs(self, values: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
        """Seeded, non-zero inputs at the point ``values`` (symbol -> size), graph dtypes."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            tensor = self.make_input(spec, spec.concrete(values), gen)
            out[spec.name] = tensor.to(DTYPES[spec.dtype])
        return out


# --- wrapper modules -----------------------------------------------------------------------


class UNetModule(nn.Module):
    """UNet + its GateSet as one module, so the gate heads export as part of the graph."""

    def __init__(self, unet: nn.Module, gates: GateSet | None) -> None:
        super().__init__()
        self.unet = unet
        self.gates = gates  # a registered submodule: its weights become initializers

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        # diffusers concatenates text_embeds with the fp32 time-id embedding; eager torch
        # promotes that concat to fp32, the dynamo exporter does not (docs/design.md section 6.3), so the
        # promotion is made explicit. A no-op in fp32 exports.
        cond = {"text_embeds": text_embeds.float(), "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False
        )[0]


class TextEncoderModule(nn.Module):
    """CLIP text encoder -> penultimate hidden states (and pooled projection for encoder 2)."""

    def __init__(self, encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class VaeDecoderModule(nn.Module):
    """Latents (already divided by the scaling factor) -> image in [-1, 1] (unclamped)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderModule(nn.Module):
    """Image in [-1, 1] -> mean of the latent distribution (not scaled)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.mean


# --- inputs and tolerances ------------------------------------------------------------------


def _float_dtype(precision: str) -> str:
    return "float16" if precision == "fp16" else "float32"


def _unet_input(spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if spec.name == "timestep":
        return torch.randint(1, 1000, shape, generator=gen).float()
    if spec.name == "time_ids":
        # SDXL micro-conditioning: original size, crop offset, target size (pixels).
        base = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
        jitter = torch.randint(0, 9, shape, generator=gen).float() * 64
        return base + jitter * (base > 0)
    return torch.randn(shape, generator=gen)


def _ids_input(vocab_size: int) -> Callable[..., torch.Tensor]:
    def make(spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        batch, tokens = shape
        ids = torch.randint(1, vocab_size - 2, shape, generator=gen)
        # BOS first, EOS at a random position, EOS padding after it (like CLIPTokenizer).
        ids[:, 0] = vocab_size - 2
        for row in range(batch):
            end = int(torch.randint(2, tokens, (1,), generator=gen))
            ids[row, end:] = vocab_size - 1
        return ids

    return make


def _image_input(spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if spec.name == "sample" and shape[1] == 3:  # VAE encoder image in [-1, 1]
        return torch.rand(shape, generator=gen) * 2 - 1
    return torch.randn(shape, generator=gen)


FP32_TOL = Tolerance(1e-4, 0.0, "fp32 graph vs fp32 torch: only op-order rounding")
VAE_FP32_TOL = Tolerance(
    1e-4, 1e-4, "fp32 VAE decoder: 4 up-blocks of 3x3 convolutions sum many more terms"
)
FP16_TOL = Tolerance(
    2e-2, 1e-2, "fp16 graph vs fp32 torch: fp16 storage (2^-11 relative) through deep stacks"
)


# --- builders ------------------------------------------------------------------------------


def unet_component(
    unet: nn.Module, gates: GateSet | None, precision: str, text_tokens: int = TEXT_TOKENS
) -> Component:
    """The (gated) UNet. The caller casts ``unet`` for fp16; gates stay fp32."""
    cfg = unet.config
    fdt = _float_dtype(precision)
    text_width = int(cfg.projection_class_embeddings_input_dim) - 6 * int(
        cfg.addition_time_embed_dim
    )
    names = COMPONENT_IO["unet"][0]
    shapes: dict[str, tuple[Dim, ...]] = {
        "sample": (BATCH, int(cfg.in_channels), LATENT_H, LATENT_W),
        "timestep": (BATCH,),
        "encoder_hidden_states": (BATCH, text_tokens, int(cfg.cross_attention_dim)),
        "text_embeds": (BATCH, text_width),
        "time_ids": (BATCH, 6),
    }
    inputs = [
        TensorSpec(n, "float32" if n in FP32_INPUTS["unet"] else fdt, shapes[n]) for n in names
    ]
    out = COMPONENT_IO["unet"][1][0]
    outputs = [TensorSpec(out, fdt, (BATCH, int(cfg.out_channels), LATENT_H, LATENT_W))]
    return Component(
        name="unet",
        module=UNetModule(unet, gates).eval(),
        inputs=inputs,
        outputs=outputs,
        precision=precision,
        make_input=_unet_input,
        tolerances={out: FP16_TOL if precision == "fp16" else FP32_TOL},
        gated_layers=list(gates.layers) if gates is not None else [],
        threshold=float(gates.threshold) if gates is not None else None,
        per_layer_outputs=_per_layer_specs(unet, gates, fdt, text_tokens),
    )


def _per_layer_specs(
    unet: nn.Module, gates: GateSet | None, dtype: str, text_tokens: int
) -> dict[str, TensorSpec]:
    """Shapes of the optional ``probs/<layer>`` outputs: [B, heads, tokens of the level, T]."""
    from maskattn_deploy.export.spec import per_layer_output

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
        specs[name] = TensorSpec(name, dtype, (BATCH, heads, tokens, text_tokens))
    return specs


def text_encoder_component(
    name: str, encoder: nn.Module, precision: str, text_tokens: int = TEXT_TOKENS
) -> Component:
    """``text_encoder`` (hidden states) or ``text_encoder_2`` (hidden states + pooled)."""
    pooled = name == "text_encoder_2"
    cfg = encoder.config
    fdt = _float_dtype(precision)
    in_names, out_names = COMPONENT_IO[name]
    outputs = [TensorSpec(out_names[0], fdt, (BATCH, text_tokens, int(cfg.hidden_size)))]
    if pooled:
        outputs.append(TensorSpec(out_names[1], fdt, (BATCH, int(cfg.projection_dim))))
    tol = FP16_TOL if precision == "fp16" else FP32_TOL
    return Component(
        name=name,
        module=TextEncoderModule(encoder, pooled).eval(),
        inputs=[TensorSpec(in_names[0], "int64", (BATCH, text_tokens))],
        outputs=outputs,
        precision=precision,
        make_input=_ids_input(int(cfg.vocab_size)),
        tolerances={o.name: tol for o in outputs},
    )


def vae_component(name: str, vae: nn.Module, precision: str) -> Component:
    """``vae_decoder`` or ``vae_encoder``."""
    cfg = vae.config
    fdt = _float_dtype(precision)
    latent = (BATCH, int(cfg.latent_channels), LATENT_H, LATENT_W)
    image = (BATCH, int(cfg.in_channels), PIXEL_H, PIXEL_W)
    (in_name,), (out_name,) = COMPONENT_IO[name]
    decoder = name == "vae_decoder"
    fp32_tol = VAE_FP32_TOL if decoder else FP32_TOL
    return Component(
        name=name,
        module=(VaeDecoderModule(vae) if decoder else VaeEncoderModule(vae)).eval(),
        inputs=[TensorSpec(in_name, fdt, latent if decoder else image)],
        outputs=[TensorSpec(out_name, fdt, image if decoder else latent)],
        precision=precision,
        make_input=_image_input,
        tolerances={out_name: FP16_TOL if precision == "fp16" else fp32_tol},
    )
