"""Shape ranges of an export recipe: validation, torch.export dims and example points.

A recipe's ``[shapes]`` gives ``batch``, ``height`` and ``width`` as ``[min, opt, max]`` (pixels;
batch counts UNet rows) and ``text_tokens`` (77). The ONNX graphs are dynamic in batch and size;
the ranges are what TensorRT profiles and the validation use, so they are checked here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import ShapePoint
from maskattn_deploy.export.spec import (
    BATCH,
    LATENT_FACTOR,
    LATENT_H,
    LATENT_W,
    PIXEL_H,
    PIXEL_MULTIPLE,
    PIXEL_W,
    STEPS,
    TEXT_TOKENS,
)

Triple = tuple[int, int, int]


def check_triple(value: Any, what: str, multiple: int = 1) -> Triple:
    """``[min, opt, max]`` (or one int for all three), each a multiple of ``multiple``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value, value]
    if not (
        isinstance(value, Sequence)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1] <= value[2]
    ):
        raise UserError(f"{what} must be [min, opt, max] with 0 < min <= opt <= max, got {value!r}")
    if any(v % multiple for v in value):
        raise UserError(
            f"{what} must be multiples of {multiple} pixels (latents multiple of "
            f"{multiple // LATENT_FACTOR}), got {list(value)}"
        )
    return (value[0], value[1], value[2])


@dataclass(frozen=True)
class ShapeRanges:
    """Validated ranges of one recipe (pixels for height/width)."""

    batch: Triple
    height: Triple
    width: Triple
    text_tokens: int = TEXT_TOKENS

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> ShapeRanges:
        """Parse and check ``[shapes]`` (:class:`~maskattn_deploy.export.recipe.ExportRecipe`
        checks the ``[[profiles]]`` against it)."""
        name = recipe.get("name", "?")
        shapes = recipe.get("shapes")
        if not isinstance(shapes, Mapping):
            raise UserError(f"export recipe {name!r} has no [shapes] table")
        ranges = cls(
            batch=check_triple(shapes.get("batch"), f"recipe {name}: shapes.batch"),
            height=check_triple(
                shapes.get("height"), f"recipe {name}: shapes.height", PIXEL_MULTIPLE
            ),
            width=check_triple(shapes.get("width"), f"recipe {name}: shapes.width", PIXEL_MULTIPLE),
            text_tokens=shapes.get("text_tokens", TEXT_TOKENS),
        )
        if ranges.text_tokens != TEXT_TOKENS:
            raise UserError(
                f"recipe {name}: shapes.text_tokens must be {TEXT_TOKENS} (the CLIP encoders' "
                f"position limit), got {ranges.text_tokens!r}"
            )
        return ranges

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "text_tokens": self.text_tokens,
        }

    def trace_point(self) -> ShapePoint:
        """The point traced: batch 2 and height != width so nothing specialises."""
        height = max(self.height[1], 2 * PIXEL_MULTIPLE)
        return ShapePoint(2, height, height + PIXEL_MULTIPLE)

    def opt_point(self) -> ShapePoint:
        """The recipe's optimum (the middle of each [min, opt, max])."""
        return ShapePoint(self.batch[1], self.height[1], self.width[1])

    def validation_points(self) -> list[ShapePoint]:
        """Two cheap points that differ in batch, height and width (the second only if the
        ranges allow), so validation proves the axes are dynamic."""
        first = ShapePoint(self.batch[0], self.height[0], self.width[0])
        second = ShapePoint(
            min(self.batch[0] + 1, self.batch[2]),
            min(self.height[0] + PIXEL_MULTIPLE, self.height[2]),
            self.width[0],
        )
        return [first] if second == first else [first, second]


def torch_dims(ranges: ShapeRanges) -> dict[str, Any]:
    """Symbol -> ``torch.export`` dimension expression.

    Latents are ``8 * k`` (pixels ``64 * k``) so the UNet's up-sampling never needs the odd-size
    branch. The lower bounds are generous (1) and the upper bounds cover the recipe and the
    trace point: the ranges only feed torch.export's guards, the ONNX axes stay symbolic.
    """
    from torch.export import Dim

    trace = ranges.trace_point()
    trace_h, trace_w = trace.height, trace.width
    k_max = max(ranges.height[2], ranges.width[2], trace_h, trace_w) // PIXEL_MULTIPLE
    batch = Dim(BATCH, min=1, max=max(ranges.batch[2], 2))
    k_h = Dim("k_h", min=1, max=k_max)
    k_w = Dim("k_w", min=1, max=k_max)
    step = PIXEL_MULTIPLE // LATENT_FACTOR
    return {
        BATCH: batch,
        # Traced as one timestep per row; graph.broadcast_steps then lets [1] in as well.
        STEPS: batch,
        LATENT_H: step * k_h,
        LATENT_W: step * k_w,
        PIXEL_H: PIXEL_MULTIPLE * k_h,
        PIXEL_W: PIXEL_MULTIPLE * k_w,
    }
