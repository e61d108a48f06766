"""TensorRT optimization profiles derived from an export recipe (pure functions, no TensorRT).

A recipe's ``[[profiles]]`` give batch, pixel height and width as ``[min, opt, max]``; text
tokens come from ``[shapes].text_tokens`` (77). Each component's input tensor gets a
``(min, opt, max)`` shape per profile, using the tensor names of
:mod:`maskattn_deploy.export.spec`, latents at pixel / 8, and the fixed widths (channels,
text embedding widths) read from the export manifest's input shapes when present.

Batch counts UNet rows (classifier-free guidance doubles it), as in the recipes. The text
encoders see the same rows. The VAE sees images, so its batch range is ``1 .. max``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import COMPONENT_IO

logger = logging.getLogger(__name__)

LATENT_FACTOR = 8
DEFAULT_TEXT_TOKENS = 77

# Per input: one entry per axis. Strings are symbolic: B batch, T text tokens, h/w latent
# height/width (pixels / 8), H/W pixel height/width. Ints are default widths (SDXL), replaced by
# the manifest's static value when it has one.
INPUT_AXES: dict[str, dict[str, tuple[str | int, ...]]] = {
    "unet": {
        "sample": ("B", 4, "h", "w"),
        "timestep": ("B",),
        "encoder_hidden_states": ("B", "T", 2048),
        "text_embeds": ("B", 1280),
        "time_ids": ("B", 6),
    },
    "text_encoder": {"input_ids": ("B", "T")},
    "text_encoder_2": {"input_ids": ("B", "T")},
    "vae_decoder": {"latent_sample": ("B", 4, "h", "w")},
    "vae_encoder": {"sample": ("B", 3, "H", "W")},
}
_SYMBOLS = frozenset("BThwHW")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max of one input tensor."""

    min: Shape
    opt: Shape
    max: Shape

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one component: input name -> shape range."""

    name: str
    shapes: dict[str, ShapeRange] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: v.as_dict() for k, v in self.shapes.items()}}


@dataclass(frozen=True)
class Ranges:
    """Symbol -> (min, opt, max) for one recipe profile."""

    name: str
    values: dict[str, tuple[int, int, int]]


def _triple(value: Any, what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, int) for v in value):
        lo, opt, hi = value
        if 0 < lo <= opt <= hi:
            return (lo, opt, hi)
    raise UserError(
        f"recipe {what} must be [min, opt, max] with 0 < min <= opt <= max, got {value!r}"
    )


def recipe_ranges(recipe: Mapping[str, Any]) -> list[Ranges]:
    """Symbol ranges per ``[[profiles]]`` entry (or one profile from ``[shapes]`` if none)."""
    shapes = recipe.get("shapes", {})
    entries = recipe.get("profiles") or [{"name": "default", **shapes}]
    default_t = shapes.get("text_tokens", DEFAULT_TEXT_TOKENS)
    result = []
    for i, entry in enumerate(entries):
        name = str(entry.get("name", f"profile{i}"))
        values = {
            "B": _triple(entry.get("batch", shapes.get("batch")), f"profile {name} batch"),
            "H": _triple(entry.get("height", shapes.get("height")), f"profile {name} height"),
            "W": _triple(entry.get("width", shapes.get("width")), f"profile {name} width"),
            "T": _triple(entry.get("text_tokens", default_t), f"profile {name} text_tokens"),
        }
        for axis in ("H", "W"):
            if any(v % LATENT_FACTOR for v in values[axis]):
                raise UserError(
                    f"profile {name}: pixel sizes must be multiples of {LATENT_FACTOR}, got {values[axis]}"
                )
            values[axis.lower()] = tuple(v // LATENT_FACTOR for v in values[axis])  # type: ignore[assignment]
        result.append(Ranges(name, values))
    return result


def _component_ranges(component: str, ranges: Ranges) -> dict[str, tuple[int, int, int]]:
    if not component.startswith("vae"):
        return ranges.values
    lo, opt, hi = ranges.values["B"]
    return {**ranges.values, "B": (1, max(1, opt // 2), hi)}


def _axes_for(component: str, name: str, manifest_shape: Sequence[Any] | None) -> list[str | int]:
    """Axis kinds of one input, merging the template with the manifest's static dims."""
    template = INPUT_AXES.get(component, {}).get(name)
    if manifest_shape is None:
        if template is None:
            raise UserError(f"{component} input {name!r}: unknown shape; re-export with a manifest")
        return list(template)
    if template is None or len(template) != len(manifest_shape):
        # Inputs outside the spec: static dims, or dims named with the recipe's symbols.
        if all((isinstance(d, int) and d > 0) or d in _SYMBOLS for d in manifest_shape):
            return list(manifest_shape)
        raise UserError(
            f"{component} input {name!r} has shape {list(manifest_shape)} that maskattn-deploy "
            "cannot map to the recipe's batch/size/text axes; re-export with this version"
        )
    axes: list[str | int] = []
    for kind, dim in zip(template, manifest_shape, strict=True):
        if isinstance(dim, int) and dim > 0:
            axes.append(dim if isinstance(kind, int) else _pinned(kind, dim))
        else:
            axes.append(kind)
    return axes


def _pinned(kind: str | int, dim: int) -> str:
    """A symbolic axis the export made static: keep it as a symbol checked against the ranges."""
    return f"{kind}={dim}"


def _resolve(
    axes: list[str | int], values: Mapping[str, tuple[int, int, int]], where: str
) -> ShapeRange:
    lo, opt, hi = [], [], []
    for axis in axes:
        if isinstance(axis, int):
            triple = (axis, axis, axis)
        elif "=" in axis:
            kind, fixed = axis.split("=")
            if values[kind] != (int(fixed),) * 3:
                raise UserError(
                    f"{where}: the ONNX export fixes axis {kind} to {fixed} but the profile asks "
                    f"for {list(values[kind])}; pick a matching --recipe or re-export with dynamic shapes"
                )
            triple = values[kind]
        else:
            triple = values[axis]
        lo.append(triple[0])
        opt.append(triple[1])
        hi.append(triple[2])
    return ShapeRange(tuple(lo), tuple(opt), tuple(hi))


def component_profiles(
    recipe: Mapping[str, Any], component: str, inputs: Sequence[Mapping[str, Any]] | None = None
) -> list[Profile]:
    """Profiles for one component; ``inputs`` is the manifest's ``[{"name","dtype","shape"}]``."""
    if inputs is None:
        if component not in COMPONENT_IO:
            raise UserError(f"unknown component {component!r}; known: {', '.join(COMPONENT_IO)}")
        inputs = [{"name": n, "shape": None} for n in COMPONENT_IO[component][0]]
    profiles = []
    for ranges in recipe_ranges(recipe):
        values = _component_ranges(component, ranges)
        shapes = {}
        for spec in inputs:
            name = spec["name"]
            axes = _axes_for(component, name, spec.get("shape"))
            shapes[name] = _resolve(
                axes, values, f"{component} input {name!r} profile {ranges.name}"
            )
        profiles.append(Profile(ranges.name, shapes))
    return profiles


def export_profiles(
    recipe: Mapping[str, Any], manifest: Mapping[str, Any]
) -> dict[str, list[Profile]]:
    """Profiles for every component of an export manifest."""
    components = manifest.get("components", {})
    return {
        name: component_profiles(recipe, name, info.get("inputs"))
        for name, info in components.items()
    }
