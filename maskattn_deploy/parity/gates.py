"""Gate agreement: does a backend open the same gates as the reference, layer by layer?

The hard mask is a threshold on the gate logit, so a backend whose hidden states differ in the
last bits (fp16 above all) may flip a gate whose logit sits right at the threshold. Such flips
are tolerated; any other flip is a defect (a wrong weight, a broken decomposition, a wrong
threshold attribute) and fails parity.

A flip at gate (b, n, t) is tolerated when either

1. the reference logit is near the threshold: ``|g_ref - threshold| <= margin``, or
2. the row (b, n) is at or near the argmax fallback (its largest logit is at most
   ``threshold + margin``, so the row may be empty on one side) and ``g_ref`` is within
   ``margin`` of that largest logit (a near tie for the fallback token).

The margin comes from :data:`maskattn_deploy.parity.tolerances.GATE_MARGINS`. Masks are
``[b, n, t]`` booleans; logits are the reference's fp32 gate logits ``[b, n, t]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from maskattn_deploy.ops.reference import open_mask
from maskattn_deploy.parity.compare import FAIL, PASS

MAX_WHERE = 5  # flips listed per layer in reports


def mask_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Open set ``[b, n, t]`` from attention probabilities ``[b, h, n, t]``.

    A closed token has probability exactly 0 in every implementation; an open one is positive
    in at least one head (``any`` guards against fp16 underflow in a single head).
    """
    return (probs.float() > 0).any(dim=1)


@dataclass
class GateFlip:
    """One flipped gate: where, which way, and the reference logit there."""

    batch: int
    token: int  # latent token index n in the layer's grid
    text_token: int  # text position t
    reference_open: bool
    logit: float
    yx: tuple[int, int] | None = None

    def __str__(self) -> str:
        where = f"(y={self.yx[0]}, x={self.yx[1]})" if self.yx else f"n={self.token}"
        state = "open->closed" if self.reference_open else "closed->open"
        return f"b={self.batch} {where} t={self.text_token} {state} g_ref={self.logit:+.4g}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "token": self.token,
            "text_token": self.text_token,
            "yx": list(self.yx) if self.yx else None,
            "reference_open": self.reference_open,
            "reference_logit": self.logit,
        }


@dataclass
class LayerGateAgreement:
    """Flip counts of one gated layer on one backend (truthy when no intolerable flip)."""

    layer: str
    backend: str
    entries: int
    flips: int
    tolerated: int
    margin: float
    near_threshold: int  # reference entries within the margin (where flips may happen)
    open_fraction: float  # reference
    max_flip_distance: float = 0.0  # largest |g_ref - threshold| among all flips
    where: list[GateFlip] = field(default_factory=list)  # first intolerable flips
    tokens: dict[int, int] = field(default_factory=dict)  # text position -> intolerable flips
    label: str = ""
    flipped_rows: torch.Tensor | None = field(default=None, repr=False)  # [b, n] tolerated rows

    @property
    def bad(self) -> int:
        return self.flips - self.tolerated

    @property
    def passed(self) -> bool:
        return self.bad == 0

    def __bool__(self) -> bool:
        return self.passed

    @property
    def flip_fraction(self) -> float:
        return self.flips / max(self.entries, 1)

    def __str__(self) -> str:
        status = PASS if self.passed else FAIL
        case = f" {self.label}" if self.label else ""
        line = (
            f"{status:<7} gates {self.layer} [{self.backend}{case}] flips={self.flips}/"
            f"{self.entries} ({self.flip_fraction:.2%}) tolerated={self.tolerated} "
            f"(|g|<= {self.margin:g}) open={self.open_fraction:.1%}"
        )
        if self.flips:
            line += f" max|g-thr| flipped={self.max_flip_distance:.3g}"
        if self.where:
            line += f"  <- {self.bad} flips far from threshold, e.g. {self.where[0]}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "backend": self.backend,
            "case": self.label,
            "passed": self.passed,
            "entries": self.entries,
            "flips": self.flips,
            "flip_fraction": self.flip_fraction,
            "tolerated": self.tolerated,
            "intolerable": self.bad,
            "margin": self.margin,
            "near_threshold": self.near_threshold,
            "reference_open_fraction": self.open_fraction,
            "max_flip_distance": self.max_flip_distance,
            "where": [flip.as_dict() for flip in self.where],
            "intolerable_by_text_token": {str(k): v for k, v in self.tokens.items()},
        }


def tolerated_flips(ref_logits: torch.Tensor, threshold: float, margin: float) -> torch.Tensor:
    """Boolean ``[b, n, t]``: where a flip is explainable by rounding (module docstring rules)."""
    g = ref_logits.float()
    near = (g - threshold).abs() <= margin
    row_max = g.amax(dim=-1, keepdim=True)
    near_fallback = (row_max <= threshold + margin) & (g >= row_max - margin)
    return near | near_fallback


def gate_agreement(
    layer: str,
    backend: str,
    ref_logits: torch.Tensor,
    backend_mask: torch.Tensor,
    threshold: float,
    margin: float,
    grid: tuple[int, int] | None = None,
    label: str = "",
) -> LayerGateAgreement:
    """Compare ``backend_mask`` with the reference open set of ``ref_logits`` (both ``[b,n,t]``).

    ``grid`` is the layer's (h, w) latent grid, used to report flips as (y, x) positions.
    """
    g = ref_logits.detach().float().cpu()
    ref_mask = open_mask(g, threshold)
    got = backend_mask.detach().cpu().bool()
    if got.shape != ref_mask.shape:
        raise ValueError(
            f"{layer}: backend mask {tuple(got.shape)} does not match reference "
            f"{tuple(ref_mask.shape)}"
        )
    flipped = got != ref_mask
    allowed = tolerated_flips(g, threshold, margin)
    bad = flipped & ~allowed
    result = LayerGateAgreement(
        layer=layer,
        backend=backend,
        entries=flipped.numel(),
        flips=int(flipped.sum()),
        tolerated=int((flipped & allowed).sum()),
        margin=margin,
        near_threshold=int(((g - threshold).abs() <= margin).sum()),
        open_fraction=float(ref_mask.float().mean()),
        label=label,
        flipped_rows=(flipped & allowed).any(dim=-1),
    )
    if flipped.any():
        result.max_flip_distance = float((g - threshold).abs()[flipped].max())
    if bad.any():
        result.where = _first_flips(bad, ref_mask, g, grid)
        counts = bad.sum(dim=(0, 1))
        result.tokens = {int(t): int(counts[t]) for t in torch.nonzero(counts).flatten()}
    return result


def _first_flips(
    bad: torch.Tensor, ref_mask: torch.Tensor, g: torch.Tensor, grid: tuple[int, int] | None
) -> list[GateFlip]:
    flips = []
    for b, n, t in torch.nonzero(bad)[:MAX_WHERE].tolist():
        yx = divmod(n, grid[1]) if grid else None
        flips.append(GateFlip(b, n, t, bool(ref_mask[b, n, t]), float(g[b, n, t]), yx))
    return flips
