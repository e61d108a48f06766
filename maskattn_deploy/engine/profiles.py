"""TensorRT optimization profiles derived from an export recipe (pure functions, no TensorRT).

Each ``[[profiles]]`` entry of the recipe (checked by
:class:`~maskattn_deploy.export.recipe.ExportRecipe`: inside ``[shapes]``, pixel sizes
multiples of 64) gives every input of a component a ``(min, opt, max)`` shape. The axes come
from the component's spec (:mod:`maskattn_deploy.export.component_spec`): dynamic symbols take
the profile's ranges (latents at pixels / 8, the VAE's batch by its spec's image rule), static
widths come from the shapes the export manifest records, text tokens from the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import (
    DYNAMIC_SYMBOLS,
    SPECS,
    TOKENS,
    ComponentSpec,
    ShapePoint,
)
from maskattn_deploy.export.recipe import ExportRecipe, ProfileRange, resolve_recipe
from maskattn_deploy.export.spec import BATCH, STEPS

Shape = tuple[int, ...]
Triple = tuple[int, int, int]


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


def symbol_ranges(
    spec: ComponentSpec | None, profile: ProfileRange, text_tokens: int
) -> dict[str, Triple]:
    """Symbol -> (min, opt, max) of one profile (``spec``'s batch rule applied; None: the
    batch counts UNet rows)."""
    lo, opt, hi = (
        ShapePoint(profile.batch[i], profile.height[i], profile.width[i]) for i in range(3)
    )
    values = {
        symbol: (lo.symbols()[symbol], opt.symbols()[symbol], hi.symbols()[symbol])
        for symbol in DYNAMIC_SYMBOLS
    }
    values["B"] = spec.batch_range(profile.batch) if spec is not None else profile.batch
    # Timesteps: the runtime feeds one (broadcast in the graph), a per-row feed up to the batch.
    values[STEPS] = (1, 1, values["B"][2])
    values[TOKENS] = (text_tokens,) * 3
    return values


def _axes_for(
    spec: ComponentSpec | None, component: str, name: str, recorded: Sequence[Any]
) -> list[str | int]:
    """Axes of one input: the spec's symbols, with the widths (and any axis the export made
    static) taken from the recorded shape."""
    template = (
        None if spec is None else next((t.shape for t in spec.inputs if t.name == name), None)
    )
    if template is None or len(template) != len(recorded):
        # Inputs outside the spec: static dims, or dims named with the dynamic symbols.
        if all((isinstance(d, int) and d > 0) or d in DYNAMIC_SYMBOLS | {TOKENS} for d in recorded):
            return list(recorded)
        raise UserError(
            f"{component} input {name!r} has shape {list(recorded)} that maskattn-deploy "
            "cannot map to the recipe's batch/size/text axes; re-export with this version"
        )
    axes: list[str | int] = []
    for kind, dim in zip(template, recorded, strict=True):
        if isinstance(dim, int) and dim > 0:
            axes.append(f"{kind}={dim}" if kind in DYNAMIC_SYMBOLS else dim)
        elif kind == STEPS and dim == BATCH:
            axes.append(BATCH)  # exports before graph revision 3 tie the timestep to the batch
        else:
            axes.append(kind)
    return axes


def _resolve(axes: list[str | int], values: Mapping[str, Triple], where: str) -> ShapeRange:
    lo, opt, hi = [], [], []
    for axis in axes:
        if isinstance(axis, int):
            triple = (axis, axis, axis)
        elif "=" in axis:  # a dynamic axis the export fixed: the profile must agree
            kind, fixed = axis.split("=")
            if values[kind] != (int(fixed),) * 3:
                raise UserError(
                    f"{where}: the ONNX export fixes axis {kind} to {fixed} but the profile asks "
                    f"for {list(values[kind])}; pick a matching recipe or re-export with dynamic "
                    "shapes"
                )
            triple = values[kind]
        elif axis in values:
            triple = values[axis]
        else:
            raise UserError(f"{where}: axis {axis!r} has no size; re-export with this version")
        lo.append(triple[0])
        opt.append(triple[1])
        hi.append(triple[2])
    return ShapeRange(tuple(lo), tuple(opt), tuple(hi))


def component_profiles(
    recipe: ExportRecipe | Mapping[str, Any],
    component: str,
    inputs: Sequence[Mapping[str, Any]],
) -> list[Profile]:
    """Profiles for one component; ``inputs`` is the manifest's ``[{"name","dtype","shape"}]``."""
    recipe = resolve_recipe(recipe)
    spec = SPECS.get(component)
    profiles = []
    for entry in recipe.profiles:
        values = symbol_ranges(spec, entry, recipe.shapes.text_tokens)
        shapes = {}
        for tensor in inputs:
            name = tensor["name"]
            axes = _axes_for(spec, component, name, tensor.get("shape") or ())
            shapes[name] = _resolve(
                axes, values, f"{component} input {name!r} profile {entry.name}"
            )
        profiles.append(Profile(entry.name, shapes))
    return profiles


def spec_profiles(recipe: ExportRecipe | Mapping[str, Any], spec: ComponentSpec) -> list[Profile]:
    """Profiles for a spec with resolved widths (see :func:`component_spec`), no manifest."""
    return component_profiles(recipe, spec.name, [t.record("fp32") for t in spec.inputs])
