"""Writing results: PNGs that carry their settings, mask grids, and the JSON report."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from maskattn_deploy.utils import atomic_path

METADATA_KEY = "maskattn-deploy"  # PNG text chunk holding all settings as JSON
_INDEX = re.compile(r"^(\d{5})-")


def png_info(settings: Mapping[str, Any]) -> PngInfo:
    """One PNG text chunk per setting, plus all of them as JSON under :data:`METADATA_KEY`."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text(METADATA_KEY, json.dumps(dict(settings), sort_keys=True, default=str))
    return info


def save_png(
    image: Image.Image, path: str | Path, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write ``image`` atomically as PNG with ``settings`` in its text metadata."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings) if settings else None)
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The settings written by :func:`save_png` (empty when the PNG has none)."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
    raw = text.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def next_index(out_dir: Path) -> int:
    """The next free run number in ``out_dir`` (files are named ``NNNNN-...``)."""
    taken = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := _INDEX.match(p.name))]
    return max(taken, default=-1) + 1


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=str) + "\n")
    return path
