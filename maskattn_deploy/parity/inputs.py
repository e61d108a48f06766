"""Seeded, non-zero inputs for each component, and the shape cases parity runs on.

Every backend gets the very same tensors (fp32 / int64 on the CPU; each runner casts to its
graph's dtype), drawn from one ``torch.Generator`` per (component, case) so a rerun sees the
same numbers. Values look like the real thing: unit-variance latents, timesteps inside the
training range, token ids framed by the start and end tokens, SDXL micro-conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from maskattn_deploy.errors import UserError

LATENT_FACTOR = 8
LATENT_CHANNELS = 4
_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShapeCase:
    """UNet batch rows (CFG with one image is 2) and the image size in pixels."""

    batch: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // LATENT_FACTOR, self.width // LATENT_FACTOR


def parse_shapes(text: str) -> list[ShapeCase]:
    """``"2x256x256,1x128x192"`` (batch x height x width, pixels) -> shape cases."""
    cases = []
    for part in text.split(","):
        match = _SHAPE.match(part)
        if not match:
            raise UserError(
                f"--shapes {part.strip()!r} is not BATCHxHEIGHTxWIDTH (e.g. 2x256x256; pixels, "
                "comma-separated for several)"
            )
        batch, height, width = (int(v) for v in match.groups())
        if batch < 1 or height % LATENT_FACTOR or width % LATENT_FACTOR or not height or not width:
            raise UserError(
                f"--shapes {part.strip()}: batch must be >= 1 and height/width positive "
                f"multiples of {LATENT_FACTOR}"
            )
        cases.append(ShapeCase(batch, height, width))
    return cases


def default_case(manifest: dict[str, Any]) -> ShapeCase:
    """The recipe's optimum shape (the middle of [min, opt, max]); 2x256x256 if none recorded."""
    shapes = (manifest.get("recipe") or {}).get("shapes", {})

    def opt(key: str, fallback: int) -> int:
        value = shapes.get(key)
        if value is None:
            return fallback
        if isinstance(value, (int, float)):
            return int(value)
        return int(value[1] if len(value) == 3 else value[0])

    return ShapeCase(opt("batch", 2), opt("height", 256), opt("width", 256))


@dataclass(frozen=True)
class ModelDims:
    """Widths and token facts the feeds need (read from the reference pipeline)."""

    context_dim: int  # encoder_hidden_states width (both CLIPs concatenated)
    pooled_dim: int  # text_embeds width
    vocab_size: int = 49408  # CLIP's (only the text encoders' feeds use the token facts)
    bos_id: int = 49406
    eos_id: int = 49407
    text_tokens: int = 77

    @classmethod
    def from_pipe(cls, pipe: Any) -> ModelDims:
        tok = pipe.tokenizer
        return cls(
            context_dim=int(pipe.unet.config.cross_attention_dim),
            pooled_dim=int(pipe.text_encoder_2.config.projection_dim),
            vocab_size=int(pipe.text_encoder.config.vocab_size),
            bos_id=int(tok.bos_token_id),
            eos_id=int(tok.eos_token_id),
            text_tokens=int(tok.model_max_length),
        )

    @classmethod
    def from_unet_config(cls, config: Any) -> ModelDims:
        """The UNet's feed widths from its config alone (no weights needed).

        SDXL's add-embedding input is the pooled text projection plus six time ids, each
        embedded to ``addition_time_embed_dim``.
        """
        cfg = dict(config)
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
            cfg["addition_time_embed_dim"]
        )
        return cls(context_dim=int(cfg["cross_attention_dim"]), pooled_dim=pooled)


def _seed_for(component: str, case: ShapeCase, seed: int) -> int:
    # A stable per-(component, case) seed (Python's hash() is salted per process).
    text = f"{component}:{case.label}:{seed}"
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2**31)


def make_feed(component: str, case: ShapeCase, dims: ModelDims, seed: int = 0) -> dict[str, Any]:
    """The inputs of ``component`` for ``case`` (see :data:`maskattn_deploy.export.spec.COMPONENT_IO`)."""
    gen = torch.Generator().manual_seed(_seed_for(component, case, seed))
    h, w = case.latent_hw
    b = case.batch
    if component == "unet":
        return {
            "sample": torch.randn(b, LATENT_CHANNELS, h, w, generator=gen),
            "timestep": torch.randint(1, 1000, (b,), generator=gen).float(),
            "encoder_hidden_states": torch.randn(
                b, dims.text_tokens, dims.context_dim, generator=gen
            ),
            "text_embeds": torch.randn(b, dims.pooled_dim, generator=gen),
            "time_ids": torch.tensor(
                [[case.height, case.width, 0, 0, case.height, case.width]], dtype=torch.float32
            ).repeat(b, 1),
        }
    if component in ("text_encoder", "text_encoder_2"):
        return {"input_ids": _token_ids(b, dims, gen)}
    if component == "vae_decoder":
        return {"latent_sample": torch.randn(b, LATENT_CHANNELS, h, w, generator=gen)}
    if component == "vae_encoder":
        return {"sample": torch.rand(b, 3, case.height, case.width, generator=gen) * 2 - 1}
    raise UserError(f"no parity inputs for component {component!r}")


def _token_ids(batch: int, dims: ModelDims, gen: torch.Generator) -> torch.Tensor:
    """``[batch, 77]`` int64: start token, 3..20 random word ids, end token, end-token padding."""
    t = dims.text_tokens
    ids = torch.full((batch, t), dims.eos_id, dtype=torch.long)
    special = {dims.bos_id, dims.eos_id}
    for row in range(batch):
        length = int(torch.randint(3, min(21, t - 1), (1,), generator=gen))
        words = torch.randint(0, dims.vocab_size, (length,), generator=gen)
        words = torch.where(
            torch.isin(words, torch.tensor(sorted(special))), torch.ones_like(words), words
        )
        ids[row, 0] = dims.bos_id
        ids[row, 1 : 1 + length] = words
        ids[row, 1 + length] = dims.eos_id
    return ids
