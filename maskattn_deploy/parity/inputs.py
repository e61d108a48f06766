"""Seeded, non-zero inputs for each component, and the shape cases parity runs on.

Every backend gets the very same tensors (fp32 / int64 on the CPU; each runner casts to its
graph's dtype), drawn from one ``torch.Generator`` per (component, case) so a rerun sees the
same numbers. Values look like the real thing: unit-variance latents, timesteps inside the
training range, token ids framed by the start and end tokens, SDXL micro-conditioning.
"""

from __future__ import annotations

import re
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import ModelDims, ShapePoint, component_spec
from maskattn_deploy.export.folder import ExportManifest
from maskattn_deploy.export.spec import LATENT_FACTOR

# A parity / bench shape case is a spec shape point (batch rows, pixel height and width).
ShapeCase = ShapePoint
_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_shapes(text: str) -> list[ShapeCase]:
    """``"2x256x256,1x128x192"`` (batch x height x width, pixels) -> shape cases."""
    cases = []
    for part in text.split(","):
        match = _SHAPE.match(part)
        if not match:
            raise UserError(
                f"shapes {part.strip()!r} is not BATCHxHEIGHTxWIDTH (e.g. 2x256x256; pixels, "
                "comma-separated for several)",
                params=("shapes",),
            )
        batch, height, width = (int(v) for v in match.groups())
        if batch < 1 or height % LATENT_FACTOR or width % LATENT_FACTOR or not height or not width:
            raise UserError(
                f"shapes {part.strip()}: batch must be >= 1 and height/width positive "
                f"multiples of {LATENT_FACTOR}",
                params=("shapes",),
            )
        cases.append(ShapeCase(batch, height, width))
    return cases


def default_case(manifest: ExportManifest | None) -> ShapeCase:
    """The export recipe's optimum shape (the middle of [min, opt, max]); 2x256x256 without an
    export."""
    if manifest is None:
        return ShapeCase(2, 256, 256)
    return manifest.export_recipe().shapes.opt_point()


def make_feed(component: str, case: ShapeCase, dims: ModelDims, seed: int = 0) -> dict[str, Any]:
    """The inputs of ``component`` for ``case``: its spec's seeded dummy inputs (fp32 / int64 on
    the CPU; each runner casts to its graph's dtypes)."""
    return dict(component_spec(component, dims).dummy_inputs(case, seed))


__all__ = ["ModelDims", "ShapeCase", "default_case", "make_feed", "parse_shapes"]
