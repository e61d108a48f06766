"""Gate masks a person can look at: per gated stage, one panel per prompt token.

During a run the backend records every gated layer's open mask ``[rows, n, t]`` (bool) per UNet
evaluation (the torch backend through its GateSet, ONNX Runtime from the gate logits entering
each masked-softmax node). :class:`MaskAccumulator` folds them, step by step, into the fraction
of evaluations and layers of each stage in which latent cell (y, x) may attend to token t,
upsampled (nearest) to the latent grid: ``[images, t, h, w]`` in [0, 1], and into each layer's
overall open fraction per image. Only the conditional rows of classifier-free guidance count
(the unconditional half sees the negative prompt).

:func:`render_mask_grid` draws one grid per (image, stage): the generated image first, then one
panel per token from the start token to the end token inclusive (padding after the end token
is skipped), each labelled with the token text and its mean open fraction. Bright = open
(the token may be attended there), dark = masked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PANEL = 128  # panel side in pixels
LABEL_H = 14  # label strip under each panel
HEADER_H = 18  # title strip on top of the grid
COLUMNS = 8
START_LABEL, END_LABEL = "<start>", "<end>"


def layer_grid(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``n`` tokens: the latent grid halved k times (ceil, like conv)."""
    h, w = latent_hw
    for _ in range(12):
        if h * w == n:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"{n} latent tokens do not match a downsampled {latent_hw} grid")


class MaskAccumulator:
    """Running sums of open masks over the conditional rows: per stage on the latent grid
    (``spatial``) and per layer as one open fraction per row."""

    def __init__(
        self,
        stage_of: Callable[[str], str],
        latent_hw: tuple[int, int],
        num_images: int,
        spatial: bool = True,
    ) -> None:
        self.stage_of = stage_of
        self.latent_hw = latent_hw
        self.num_images = num_images  # conditional rows: the last rows of every mask
        self.spatial = spatial
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.layer_sums: dict[str, torch.Tensor] = {}
        self.layer_counts: dict[str, int] = defaultdict(int)

    def drain(self, records: dict[str, list[torch.Tensor]]) -> None:
        """Fold and clear the masks recorded since the last call (keeps memory flat)."""
        for layer, masks in records.items():
            for mask in masks:  # [rows, n, t] bool; CFG rows are [uncond..., cond...]
                cond = mask[-self.num_images :].float()  # [N, n, t]
                per_row = cond.mean(dim=(1, 2))
                self.layer_sums[layer] = self.layer_sums.get(layer, 0) + per_row
                self.layer_counts[layer] += 1
                if self.spatial:
                    self._add_spatial(self.stage_of(layer), cond)
            masks.clear()

    def _add_spatial(self, stage: str, cond: torch.Tensor) -> None:
        h, w = layer_grid(cond.shape[1], self.latent_hw)
        grid = cond.reshape(cond.shape[0], h, w, -1).permute(0, 3, 1, 2)  # [N, t, h, w]
        grid = F.interpolate(grid, size=self.latent_hw, mode="nearest")
        self.sums[stage] = self.sums[stage] + grid if stage in self.sums else grid
        self.counts[stage] += 1

    def fractions(self) -> dict[str, torch.Tensor]:
        """stage -> open fraction ``[N, t, h, w]`` averaged over evaluations and layers."""
        return {stage: total / self.counts[stage] for stage, total in sorted(self.sums.items())}

    def layer_fractions(self) -> dict[str, torch.Tensor]:
        """layer -> ``[N]`` fraction of open (cell, token) entries, averaged over evaluations."""
        return {layer: total / self.layer_counts[layer] for layer, total in self.layer_sums.items()}


def token_labels(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Labels for positions 0..end token inclusive (padding after the end token is dropped)."""
    ids = [int(i) for i in input_ids]
    end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids) - 1
    labels = []
    for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids[: end + 1])):
        if position == 0 and ids[0] == tokenizer.bos_token_id:
            labels.append(START_LABEL)
        elif position == end and ids[end] == tokenizer.eos_token_id:
            labels.append(END_LABEL)
        else:
            text = tokenizer.convert_tokens_to_string([token]).replace("</w>", " ").strip()
            labels.append(text or token)
    return labels


def _heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 on a dark-blue -> orange -> yellow ramp."""
    anchors = np.array([[10, 10, 40], [90, 30, 120], [230, 90, 40], [255, 230, 90]], np.float32)
    pos = np.clip(values, 0.0, 1.0) * (len(anchors) - 1)
    low = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).round().astype(np.uint8)


def _panel(fraction: torch.Tensor, backdrop: np.ndarray) -> Image.Image:
    heat = F.interpolate(fraction[None, None].float(), size=(PANEL, PANEL), mode="nearest")[0, 0]
    colour = _heat(heat.numpy()).astype(np.float32)
    mixed = 0.7 * colour + 0.3 * backdrop[..., None]
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def panel_box(index: int, columns: int = COLUMNS) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of panel ``index`` (0 = the image, 1.. = tokens)."""
    row, col = divmod(index, columns)
    top = HEADER_H + row * (PANEL + LABEL_H)
    return col * PANEL, top, (col + 1) * PANEL, top + PANEL


def render_mask_grid(
    fractions: torch.Tensor,
    labels: Sequence[str],
    image: Image.Image,
    title: str,
    columns: int = COLUMNS,
) -> Image.Image:
    """Grid for one image and stage: fractions ``[t, h, w]``, one panel per label (token)."""
    count = 1 + len(labels)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * PANEL, HEADER_H + rows * (PANEL + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((4, 3), title, fill="black", font=font)
    thumb = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    backdrop = np.asarray(thumb.convert("L"), dtype=np.float32)
    grid.paste(thumb, panel_box(0, columns)[:2])
    draw.text((panel_box(0, columns)[0] + 3, panel_box(0, columns)[3] + 1), "image", fill="black")
    for position, label in enumerate(labels):
        box = panel_box(position + 1, columns)
        grid.paste(_panel(fractions[position], backdrop), box[:2])
        text = f"{label[:12]} {float(fractions[position].mean()):.2f}"
        draw.text((box[0] + 3, box[3] + 1), text, fill="black", font=font)
    return grid
