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
from maskattn_deploy.export.folder import ExportFolder, ExportManifest
from maskattn_deploy.export.spec import LATENT_FACTOR

# A parity / bench shape case is a spec shape point (batch rows, pixel height and width).
ShapeCase = ShapePoint
MAX_BATCH = 64  # UNet rows of one measured case
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
        cases.append(ShapeCase(*(int(v) for v in match.groups())))
    check_shape_cases(cases)
    return cases


def check_shape_cases(cases: list[ShapeCase] | None) -> None:
    """Each case: batch 1..MAX_BATCH, height/width multiples of 8 up to MAX_SIZE pixels."""
    from maskattn_deploy.runtime.limits import MAX_SIZE

    for case in cases or ():
        ok = all(isinstance(v, int) for v in (case.batch, case.height, case.width))
        ok = ok and 1 <= case.batch <= MAX_BATCH
        ok = ok and all(
            0 < v <= MAX_SIZE and not v % LATENT_FACTOR for v in (case.height, case.width)
        )
        if not ok:
            raise UserError(
                f"shapes {case.label}: batch must be in 1..{MAX_BATCH} and height/width "
                f"multiples of {LATENT_FACTOR} in {LATENT_FACTOR}..{MAX_SIZE} px",
                params=("shapes",),
            )


def check_cases_for_export(cases: list[ShapeCase], folder: ExportFolder) -> None:
    """Refuse cases the export was not made for: outside its recipe's ranges, or sizes its
    UNet does not run at (the graph fails at a skip connection's Concat)."""
    from maskattn_deploy.runtime.model_info import export_size_multiple

    ranges = folder.manifest.export_recipe().shapes
    multiple = export_size_multiple(folder.path)
    for case in cases:
        inside = all(
            low <= value <= high and (axis == "batch" or not value % multiple)
            for axis, value, (low, _, high) in (
                ("batch", case.batch, ranges.batch),
                ("height", case.height, ranges.height),
                ("width", case.width, ranges.width),
            )
        )
        if not inside:
            raise UserError(
                f"shapes {case.label} is outside what {folder.path} was exported for: batch "
                f"{ranges.batch[0]}..{ranges.batch[2]}, height {ranges.height[0]}.."
                f"{ranges.height[2]} and width {ranges.width[0]}..{ranges.width[2]} px, sizes "
                f"multiples of {multiple}",
                params=("shapes",),
            )


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
