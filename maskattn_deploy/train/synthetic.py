"""The built-in synthetic multi-object set: coloured shapes with captions that state relations.

Each item is drawn procedurally from ``(seed, index)`` alone, so the set needs no network and no
disk, any item can be produced in any order, and two machines produce the same pixels. Items hold
2 or 3 shapes (square, circle, triangle) of distinct colours in a row or a column, e.g.

    "a red square to the left of a blue circle"
    "a yellow triangle above a green square"
    "a purple circle, a red triangle and a blue square from left to right"

which is the kind of multi-object, attribute-binding prompt MaskAttn gates are trained for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}


@dataclass(frozen=True)
class Shape:
    """One drawn object: kind, colour name, centre and half-size in pixels."""

    kind: str
    colour: str
    cx: float
    cy: float
    half: float


@dataclass(frozen=True)
class Scene:
    """Background colour, shapes in reading order (left to right or top to bottom), caption."""

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    caption: str


def _phrase(shape: Shape) -> str:
    return f"a {shape.colour} {shape.kind}"


def _caption(shapes: tuple[Shape, ...], horizontal: bool, reverse: bool) -> str:
    """Caption stating the colours and the spatial order of ``shapes`` (given in reading order)."""
    if len(shapes) == 2:
        first, second = shapes
        if horizontal:
            if reverse:
                return f"{_phrase(second)} to the right of {_phrase(first)}"
            return f"{_phrase(first)} to the left of {_phrase(second)}"
        if reverse:
            return f"{_phrase(second)} below {_phrase(first)}"
        return f"{_phrase(first)} above {_phrase(second)}"
    names = [_phrase(s) for s in shapes]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    return f"{listed} from {'left to right' if horizontal else 'top to bottom'}"


def make_scene(index: int, seed: int = 0, size: int = 256) -> Scene:
    """The layout and caption of item ``index`` (no pixels), a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(2, 4))
    horizontal = bool(rng.integers(0, 2))
    reverse = bool(rng.integers(0, 2))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    kinds = rng.choice(SHAPES, size=count, replace=True)
    slot = size / count  # each shape gets its own slot along the main axis
    half_max = min(0.38 * slot, 0.22 * size)
    shapes = []
    for k in range(count):
        half = float(rng.uniform(0.7, 1.0) * half_max)
        along = (k + 0.5) * slot + float(rng.uniform(-0.08, 0.08)) * slot
        across = size / 2 + float(rng.uniform(-0.15, 0.15)) * size
        cx, cy = (along, across) if horizontal else (across, along)
        shapes.append(Shape(str(kinds[k]), str(colours[k]), cx, cy, half))
    grey = int(rng.integers(200, 246))
    background = (grey, grey, min(255, grey + int(rng.integers(0, 10))))
    shapes_t = tuple(shapes)
    return Scene(background, shapes_t, _caption(shapes_t, horizontal, reverse))


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` x ``size`` pixels."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0 = shape.cx - shape.half, shape.cy - shape.half
        x1, y1 = shape.cx + shape.half, shape.cy + shape.half
        fill = COLOURS[shape.colour]
        if shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((shape.cx, y0), (x1, y1), (x0, y1)), fill=fill)
    return image


class SyntheticSource:
    """``n`` synthetic items from ``seed``, drawn at ``size`` px when asked (a data source)."""

    def __init__(self, n: int, seed: int = 0, size: int = 256) -> None:
        if n <= 0:
            raise ValueError("the synthetic set needs at least one item")
        self.n, self.seed, self.size = n, seed, size
        self.description = f"synthetic:{n}:{seed} ({size} px shapes)"

    def __len__(self) -> int:
        return self.n

    def key(self, index: int) -> str:
        return f"synthetic/{self.seed}/{index}"

    def image_id(self, index: int) -> str:
        return self.key(index)

    def caption(self, index: int) -> str:
        return make_scene(index, self.seed, self.size).caption

    def image(self, index: int) -> Image.Image:
        return draw_scene(make_scene(index, self.seed, self.size), self.size)

    def heldout(self, n: int) -> SyntheticSource:
        """A disjoint set of ``n`` items (another seed) for held-out evaluation."""
        return SyntheticSource(n, seed=self.seed + 7919, size=self.size)
