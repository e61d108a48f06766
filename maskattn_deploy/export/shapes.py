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
from maskattn_deploy.export.spec import (
    BATCH,
    LATENT_FACTOR,
    LATENT_H,
    LATENT_W,
    PIXEL_H,
    PIXEL_MULTIPLE,
    PIXEL_W,
    TEXT_TOKENS,
)

Triple = tuple[int, int, int]


def _triple(value: Any, what: str, multiple: int = 1) -> Triple:
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
        """Parse and check ``[shapes]``; ``[[profiles]]`` must lie inside it."""
        name = recipe.get("name", "?")
        shapes = recipe.get("shapes")
        if not isinstance(shapes, Mapping):
            raise UserError(f"export recipe {name!r} has no [shapes] table")
        ranges = cls(
            batch=_triple(shapes.get("batch"), f"recipe {name}: shapes.batch"),
            height=_triple(shapes.get("height"), f"recipe {name}: shapes.height", PIXEL_MULTIPLE),
            width=_triple(shapes.get("width"), f"recipe {name}: shapes.width", PIXEL_MULTIPLE),
            text_tokens=shapes.get("text_tokens", TEXT_TOKENS),
        )
        if ranges.text_tokens != TEXT_TOKENS:
            raise UserError(
                f"recipe {name}: shapes.text_tokens must be {TEXT_TOKENS} (the CLIP encoders' "
                f"position limit), got {ranges.text_tokens!r}"
            )
        for i, profile in enumerate(recipe.get("profiles") or []):
            ranges._check_profile(profile, f"recipe {name}: profile {profile.get('name', i)}")
        return ranges

    def _check_profile(self, profile: Mapping[str, Any], what: str) -> None:
        for axis, multiple in (("batch", 1), ("height", PIXEL_MULTIPLE), ("width", PIXEL_MULTIPLE)):
            lo, _, hi = _triple(profile.get(axis, getattr(self, axis)), f"{what} {axis}", multiple)
            bounds = getattr(self, axis)
            if lo < bounds[0] or hi > bounds[2]:
                raise UserError(
                    f"{what} {axis} [{lo}..{hi}] lies outside the exported range "
                    f"[{bounds[0]}..{bounds[2]}] of [shapes]; widen [shapes] or narrow the profile"
                )

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "text_tokens": self.text_tokens,
        }

    def symbol_values(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Symbol -> size at one point (pixels in, latents derived)."""
        return {
            BATCH: batch,
            PIXEL_H: height,
            PIXEL_W: width,
            LATENT_H: height // LATENT_FACTOR,
            LATENT_W: width // LATENT_FACTOR,
        }

    def trace_point(self) -> tuple[int, int, int]:
        """(batch, height, width) for tracing: batch 2 and h != w so nothing specialises."""
        height = max(self.height[1], 2 * PIXEL_MULTIPLE)
        return 2, height, height + PIXEL_MULTIPLE

    def validation_points(self) -> list[tuple[int, int, int]]:
        """Two cheap points that differ in batch, height and width (the second only if the
        ranges allow), so validation proves the axes are dynamic."""
        first = (self.batch[0], self.height[0], self.width[0])
        second = (
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

    _, trace_h, trace_w = ranges.trace_point()
    k_max = max(ranges.height[2], ranges.width[2], trace_h, trace_w) // PIXEL_MULTIPLE
    batch = Dim(BATCH, min=1, max=max(ranges.batch[2], 2))
    k_h = Dim("k_h", min=1, max=k_max)
    k_w = Dim("k_w", min=1, max=k_max)
    step = PIXEL_MULTIPLE // LATENT_FACTOR
    return {
        BATCH: batch,
        LATENT_H: step * k_h,
        LATENT_W: step * k_w,
        PIXEL_H: PIXEL_MULTIPLE * k_h,
        PIXEL_W: PIXEL_MULTIPLE * k_w,
    }
