"""Per-output comparison against the reference: metrics and a verdict object.

The element-wise statistics and check come from Polygraphy's comparator
(``SimpleCompareFunc`` with the ``elemwise`` error statistic, and
``CosineSimilarityCompareFunc``), so a number here means what it means in
``polygraphy run --check-error-stat elemwise``. Polygraphy has no *relative* L2 error (its
``L2CompareFunc`` is the absolute norm of the difference), so that one metric is computed here.

A :class:`OutputVerdict` is truthy when the output passed; ``str()`` gives the one line the
CLI prints, in the spirit of Polygraphy's ``PASSED | Output: ...`` lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskattn_deploy._lazy import require
from maskattn_deploy.parity.tolerances import ImageTolerance, Tolerance

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIPPED"


def to_numpy(value: Any) -> np.ndarray:
    """A host numpy array of a tensor / array (bf16 is widened to fp32, numpy has no bf16)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


@dataclass
class OutputVerdict:
    """The comparison of one output of one component on one backend against the reference."""

    component: str
    output: str
    backend: str
    shape: tuple[int, ...]
    tolerance: Tolerance
    max_abs: float = math.nan
    mean_abs: float = math.nan
    max_rel: float = math.nan
    rel_l2: float = math.nan
    cosine: float = math.nan
    failures: list[str] = field(default_factory=list)
    reference: str = "torch"
    label: str = ""  # e.g. the shape case "2x256x256"

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    @property
    def name(self) -> str:
        return f"{self.component}/{self.output}"

    def __str__(self) -> str:
        status = PASS if self.passed else FAIL
        case = f" {self.label}" if self.label else ""
        why = f"  <- {'; '.join(self.failures)}" if self.failures else ""
        return (
            f"{status:<7} {self.name} [{self.backend} vs {self.reference}{case}] "
            f"max_abs={self.max_abs:.3g} mean_abs={self.mean_abs:.3g} "
            f"rel_l2={self.rel_l2:.3g} cos={self.cosine:.6f}{why}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "output": self.output,
            "backend": self.backend,
            "reference": self.reference,
            "case": self.label,
            "shape": list(self.shape),
            "passed": self.passed,
            "max_abs": _json_float(self.max_abs),
            "mean_abs": _json_float(self.mean_abs),
            "max_rel": _json_float(self.max_rel),
            "rel_l2": _json_float(self.rel_l2),
            "cosine": _json_float(self.cosine),
            "failures": list(self.failures),
            "tolerance": self.tolerance.as_dict(),
        }


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _polygraphy_stats(
    name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance
) -> tuple[Any, float]:
    """Polygraphy's elemwise result object and cosine similarity for one pair of arrays."""
    require("polygraphy", "parity comparisons")
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    ours = IterationResult({name: actual}, runner_name="backend")
    ref = IterationResult({name: expected}, runner_name="reference")
    with G_LOGGER.verbosity():  # our own one-line verdicts replace Polygraphy's log
        simple = SimpleCompareFunc(check_error_stat="elemwise", atol=tol.atol, rtol=tol.rtol)
        result = simple(ours, ref)[name]
        cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=tol.min_cosine)(ours, ref)[
            name
        ].cosine_similarity
    return result, float(cosine)


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are zero)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    den = float(np.linalg.norm(e))
    num = float(np.linalg.norm(a - e))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def compare_output(
    component: str,
    output: str,
    backend: str,
    actual: Any,
    expected: Any,
    tolerance: Tolerance,
    label: str = "",
    reference: str = "torch",
) -> OutputVerdict:
    """Compare one backend output with the reference output under ``tolerance``."""
    a, e = to_numpy(actual), to_numpy(expected)
    verdict = OutputVerdict(
        component, output, backend, tuple(e.shape), tolerance, reference=reference, label=label
    )
    if a.shape != e.shape:
        verdict.failures.append(f"shape {tuple(a.shape)} != reference {tuple(e.shape)}")
        return verdict
    a32 = a.astype(np.float32) if a.dtype != np.float32 else a
    e32 = e.astype(np.float32) if e.dtype != np.float32 else e
    bad = ~np.isfinite(a32) & np.isfinite(e32)
    if bad.any():
        verdict.failures.append(f"{int(bad.sum())} non-finite values where the reference is finite")
    if not np.isfinite(e32).all():
        verdict.failures.append("the reference itself has non-finite values")
    result, verdict.cosine = _polygraphy_stats(output, a32, e32, tolerance)
    verdict.max_abs, verdict.mean_abs = result.max_absdiff, result.mean_absdiff
    verdict.max_rel = result.max_reldiff
    verdict.rel_l2 = relative_l2(a32, e32)
    _judge(verdict, bool(result), tolerance)
    return verdict


def _judge(verdict: OutputVerdict, elemwise_ok: bool, tol: Tolerance) -> None:
    if not elemwise_ok:
        verdict.failures.append(
            f"element-wise error exceeds atol={tol.atol:g}/rtol={tol.rtol:g} "
            f"(max_abs {verdict.max_abs:.3g})"
        )
    if not verdict.rel_l2 <= tol.max_rel_l2:
        verdict.failures.append(f"rel_l2 {verdict.rel_l2:.3g} > {tol.max_rel_l2:g}")
    if not verdict.cosine >= tol.min_cosine:
        verdict.failures.append(f"cosine {verdict.cosine:.6f} < {tol.min_cosine:g}")


def compare_outputs(
    component: str,
    backend: str,
    actual: dict[str, Any],
    expected: dict[str, Any],
    tolerance: Tolerance,
    label: str = "",
) -> list[OutputVerdict]:
    """Compare every reference output of one component; a missing output is a failure."""
    verdicts = []
    for name, ref in expected.items():
        if name not in actual:
            verdict = OutputVerdict(
                component, name, backend, tuple(ref.shape), tolerance, label=label
            )
            verdict.failures.append(f"the {backend} backend returned no output {name!r}")
            verdicts.append(verdict)
            continue
        verdicts.append(
            compare_output(component, name, backend, actual[name], ref, tolerance, label)
        )
    return verdicts


# --------------------------------------------------------------------------- images


@dataclass
class ImageVerdict:
    """Final images of an end-to-end run on one backend vs the torch run with the same seed."""

    backend: str
    tolerance: ImageTolerance
    psnr_db: float
    max_pixel_diff: int
    mean_pixel_diff: float
    images: int
    reference: str = "torch"
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        status = PASS if self.passed else FAIL
        why = f"  <- {'; '.join(self.failures)}" if self.failures else ""
        psnr = "inf" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f}"
        return (
            f"{status:<7} image [{self.backend} vs {self.reference}] PSNR={psnr} dB "
            f"max_pixel_diff={self.max_pixel_diff} mean_pixel_diff={self.mean_pixel_diff:.3g}{why}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "reference": self.reference,
            "passed": self.passed,
            "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,
            "max_pixel_diff": self.max_pixel_diff,
            "mean_pixel_diff": self.mean_pixel_diff,
            "images": self.images,
            "failures": list(self.failures),
            "tolerance": self.tolerance.as_dict(),
        }


def image_arrays(images: list[Any]) -> np.ndarray:
    """PIL images -> uint8 array ``[N, H, W, C]``."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])


def psnr(actual: np.ndarray, expected: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def compare_images(
    backend: str, actual: list[Any], expected: list[Any], tolerance: ImageTolerance
) -> ImageVerdict:
    """PSNR and max pixel difference of two lists of PIL images (same seed, same prompt)."""
    a, e = image_arrays(actual), image_arrays(expected)
    if a.shape != e.shape:
        verdict = ImageVerdict(backend, tolerance, -math.inf, 255, 255.0, len(expected))
        verdict.failures.append(f"image shape {a.shape} != reference {e.shape}")
        return verdict
    diff = np.abs(a.astype(np.int16) - e.astype(np.int16))
    verdict = ImageVerdict(
        backend, tolerance, psnr(a, e), int(diff.max()), float(diff.mean()), len(expected)
    )
    if verdict.psnr_db < tolerance.min_psnr_db:
        verdict.failures.append(f"PSNR {verdict.psnr_db:.1f} dB < {tolerance.min_psnr_db:g}")
    limit = tolerance.max_pixel_diff
    if limit is not None and verdict.max_pixel_diff > limit:
        verdict.failures.append(f"max pixel diff {verdict.max_pixel_diff} > {limit}")
    return verdict
