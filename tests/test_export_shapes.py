"""Export recipes: shape ranges are validated once, with errors that name the fix."""

from __future__ import annotations

import copy

import pytest

from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.export.component_spec import ShapePoint
from maskattn_deploy.export.graph import check_gate_coverage
from maskattn_deploy.export.recipe import ExportRecipe
from maskattn_deploy.export.shapes import ShapeRanges
from maskattn_deploy.recipes import load_recipe


def test_shipped_recipes_parse() -> None:
    tiny = ShapeRanges.from_recipe(load_recipe("export", "tiny"))
    sdxl = ShapeRanges.from_recipe(load_recipe("export", "sdxl-1024"))
    assert (tiny.height, tiny.width, tiny.batch) == ((128, 256, 384), (128, 256, 384), (1, 2, 4))
    assert (sdxl.height[0], sdxl.height[2], sdxl.text_tokens) == (512, 1536, 77)


def test_validation_points_differ_in_every_axis_and_stay_in_range() -> None:
    ranges = ShapeRanges.from_recipe(load_recipe("export", "tiny"))
    first, second = ranges.validation_points()
    assert first == ShapePoint(1, 128, 128) and second == ShapePoint(2, 192, 128)
    values = second.symbols()
    assert (values["h"], values["w"], values["H"]) == (24, 16, 192)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["shapes"].update(height=[128, 100, 384]), "min <= opt <= max"),
        (lambda r: r["shapes"].update(width=[128, 256, 392]), "multiples of 64"),
        (lambda r: r["shapes"].update(batch=[0, 1, 2]), "0 < min"),
        (lambda r: r["shapes"].update(text_tokens=154), "text_tokens must be 77"),
        (lambda r: r["profiles"][0].update(height=[512, 512, 512]), "outside the exported range"),
        (lambda r: r.pop("shapes"), "no [shapes]"),
    ],
)
def test_bad_ranges_are_refused(edit, message: str) -> None:
    recipe = copy.deepcopy(load_recipe("export", "tiny"))
    edit(recipe)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ExportRecipe.from_mapping(recipe)


def test_gate_coverage_check_names_each_problem() -> None:
    gated = ["a.attn2", "b.attn2"]
    check_gate_coverage(gated, gated, ["a.attn1", "b.attn1", "c.attn2"])  # fine
    with pytest.raises(ExportError, match="exported without their gate: b.attn2"):
        check_gate_coverage(["a.attn2"], gated, ["b.attn2"])
    with pytest.raises(ExportError, match="still use a standard softmax: a.attn2"):
        check_gate_coverage(gated, gated, ["a.attn2"])
    with pytest.raises(ExportError, match="have no gate: c.attn2"):
        check_gate_coverage([*gated, "c.attn2"], gated, [])
    with pytest.raises(ExportError, match="more than one custom node: a.attn2"):
        check_gate_coverage([*gated, "a.attn2"], gated, [])
