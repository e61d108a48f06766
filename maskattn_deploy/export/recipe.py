"""Export recipes as a typed object: shape ranges, TensorRT profiles, opset, engine settings.

A recipe is a TOML file (``export/tiny.toml``, ``export/sdxl-1024.toml`` or a path). Its
``[shapes]`` give the ONNX graphs' dynamic ranges, its ``[[profiles]]`` the TensorRT
optimization profiles (each inside ``[shapes]``), ``[engine]`` the builder's workspace and
optimization level. :func:`resolve_recipe` is the one way to get an :class:`ExportRecipe`
from a name, a path, a parsed mapping or an export manifest's record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.shapes import ShapeRanges, Triple, check_triple
from maskattn_deploy.export.spec import PIXEL_MULTIPLE

MIN_OPSET = 18  # the dynamo exporter's floor
DEFAULT_WORKSPACE_GIB = 4.0
DEFAULT_OPT_LEVEL = 3


@dataclass(frozen=True)
class ProfileRange:
    """One TensorRT optimization profile: UNet rows and pixel sizes as (min, opt, max)."""

    name: str
    batch: Triple
    height: Triple
    width: Triple


@dataclass(frozen=True)
class EngineSettings:
    """``[engine]``: the TensorRT builder's workspace (GiB) and optimization level (0-5)."""

    workspace_gib: float = DEFAULT_WORKSPACE_GIB
    builder_optimization_level: int = DEFAULT_OPT_LEVEL


@dataclass(frozen=True)
class ExportRecipe:
    """A parsed, checked export recipe; ``raw`` is the mapping recorded in the manifest."""

    name: str
    opset: int
    shapes: ShapeRanges
    profiles: tuple[ProfileRange, ...]
    engine: EngineSettings
    raw: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, recipe: Mapping[str, Any]) -> ExportRecipe:
        """Check a parsed recipe; one-line errors name the key to fix."""
        name = str(recipe.get("name", "?"))
        shapes = ShapeRanges.from_recipe(recipe)
        opset = recipe.get("opset", MIN_OPSET)
        if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
            raise UserError(
                f"recipe {name}: opset must be an integer >= {MIN_OPSET}, got {opset!r}"
            )
        entries = recipe.get("profiles") or [{"name": "default"}]
        profiles = tuple(_profile(entry, i, shapes, name) for i, entry in enumerate(entries))
        return cls(name, opset, shapes, profiles, _engine(recipe.get("engine") or {}, name), recipe)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as parsed (what an export manifest records)."""
        return dict(self.raw)


def _profile(
    entry: Mapping[str, Any], index: int, shapes: ShapeRanges, recipe: str
) -> ProfileRange:
    name = str(entry.get("name", f"profile{index}"))
    what = f"recipe {recipe}: profile {name}"
    values = {}
    for axis, multiple in (("batch", 1), ("height", PIXEL_MULTIPLE), ("width", PIXEL_MULTIPLE)):
        value = check_triple(entry.get(axis, getattr(shapes, axis)), f"{what} {axis}", multiple)
        bounds = getattr(shapes, axis)
        if value[0] < bounds[0] or value[2] > bounds[2]:
            raise UserError(
                f"{what} {axis} [{value[0]}..{value[2]}] lies outside the exported range "
                f"[{bounds[0]}..{bounds[2]}] of [shapes]; widen [shapes] or narrow the profile"
            )
        values[axis] = value
    return ProfileRange(name, values["batch"], values["height"], values["width"])


def _engine(engine: Mapping[str, Any], recipe: str) -> EngineSettings:
    settings = EngineSettings(
        float(engine.get("workspace_gib", DEFAULT_WORKSPACE_GIB)),
        int(engine.get("builder_optimization_level", DEFAULT_OPT_LEVEL)),
    )
    check_engine_settings(settings.workspace_gib, settings.builder_optimization_level)
    return settings


def check_engine_settings(workspace_gib: float, opt_level: int) -> None:
    if workspace_gib <= 0 or not 0 <= opt_level <= 5:
        raise UserError(
            f"workspace must be > 0 GiB and optimization level 0-5, got {workspace_gib} and "
            f"{opt_level}"
        )


def resolve_recipe(
    recipe: str | Path | Mapping[str, Any] | ExportRecipe | None,
    recorded: Mapping[str, Any] | None = None,
) -> ExportRecipe:
    """The recipe given by name, path, mapping or object; None: ``recorded`` (the one an export
    manifest records)."""
    if isinstance(recipe, ExportRecipe):
        return recipe
    if recipe is None:
        if not isinstance(recorded, Mapping):
            raise UserError(
                "the export records no recipe; pass recipe=NAME (for example sdxl-1024)"
            )
        return ExportRecipe.from_mapping(recorded)
    if isinstance(recipe, Mapping):
        return ExportRecipe.from_mapping(recipe)
    from maskattn_deploy.recipes import load_recipe

    return ExportRecipe.from_mapping(load_recipe("export", recipe))
