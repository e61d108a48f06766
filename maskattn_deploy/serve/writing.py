"""Write what the server answered: PNGs with generate's metadata, mask grids, a JSON report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from maskattn_deploy.runtime.masks import render_mask_grid
from maskattn_deploy.runtime.outputs import save_png, save_run_pngs, write_json
from maskattn_deploy.serve.client import ServedImage


def png_settings(served: ServedImage) -> dict:
    """The settings generate writes into a PNG (the server's settings without its warnings)."""
    return {k: v for k, v in served.settings.items() if k != "warnings"}


def write_served(served: ServedImage, out: Path, json_path: Path | None = None) -> list[Path]:
    """``out/NNNNN-s<seed>-0.png`` (+ ``.masks-<stage>.png`` grids, + JSON); the paths."""
    settings = png_settings(served)
    seed = settings.get("seed", 0)
    paths = save_run_pngs(
        [served.image], Path(out), lambda run, i: f"{run:05d}-s{seed}-{i}.png", lambda i: settings
    )
    written = list(paths)
    for stage, fractions in (served.masks or {}).items():
        labels = served.tokens
        title = f"stage {stage}: where each token may be attended (bright = open)"
        grid = render_mask_grid(
            torch.from_numpy(np.array(fractions[: len(labels)])), labels, served.image, title
        )
        path = paths[0].with_name(f"{paths[0].stem}.masks-{stage}.png")
        written.append(save_png(grid, path, {"stage": stage, **settings}))
    if json_path is not None:
        write_json(
            json_path,
            {
                "settings": served.settings,
                "timings": served.timings,
                "gate_open_fraction": served.gate_open,
                "images": [str(p) for p in written],
                "latency_s": served.latency_s,
            },
        )
        written.append(Path(json_path))
    return written
