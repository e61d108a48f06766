"""Per-output verdicts: metrics against numpy, the four pass criteria, images, tolerance table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from maskattn_deploy.errors import UserError
from maskattn_deploy.parity.compare import compare_images, compare_output, psnr, relative_l2
from maskattn_deploy.parity.tolerances import (
    GATE_MARGINS,
    IMAGE_TOLERANCES,
    TOLERANCES,
    Tolerance,
    tolerance_for,
)

TOL = Tolerance(atol=1e-4, rtol=1e-3, max_rel_l2=1e-4, min_cosine=0.99999, reason="test")


@pytest.fixture
def ref() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32) + 0.5


def test_metrics_match_numpy(ref: np.ndarray) -> None:
    noise = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32) * 1e-6
    actual = ref + noise
    verdict = compare_output("unet", "out_sample", "onnxruntime", actual, ref, TOL)
    diff = np.abs(actual.astype(np.float64) - ref)
    # Polygraphy computes in fp32: agreement to fp32 rounding of the difference itself.
    assert verdict.max_abs == pytest.approx(diff.max(), rel=1e-3)
    assert verdict.mean_abs == pytest.approx(diff.mean(), rel=1e-3)
    expected_l2 = np.linalg.norm(actual.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert verdict.rel_l2 == pytest.approx(expected_l2, rel=1e-6)
    a, e = actual.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    cosine = a @ e / (np.linalg.norm(a) * np.linalg.norm(e))
    assert verdict.cosine == pytest.approx(cosine, abs=1e-7)
    assert verdict and verdict.passed and not verdict.failures
    assert str(verdict).startswith("PASS") and "unet/out_sample" in str(verdict)


def test_one_bad_element_fails_elementwise_only(ref: np.ndarray) -> None:
    # A single element off by 0.05 barely moves L2/cosine over 512 elements: the element-wise
    # bound is what catches a local defect.
    actual = ref.copy()
    actual[1, 2, 3, 4] += 0.05
    verdict = compare_output("unet", "out_sample", "onnxruntime", actual, ref, TOL)
    assert not verdict
    assert verdict.max_abs == pytest.approx(0.05, rel=1e-3)
    assert any("element-wise" in f for f in verdict.failures)
    assert str(verdict).startswith("FAIL") and "onnxruntime" in str(verdict)


def test_spread_error_fails_l2_and_cosine(ref: np.ndarray) -> None:
    # Every element off by a tiny relative amount: within atol/rtol element-wise, but the
    # relative L2 bound (1e-4) is exceeded by the 5e-4 relative scale error.
    tol = Tolerance(atol=1.0, rtol=1.0, max_rel_l2=1e-4, min_cosine=0.999999, reason="test")
    actual = ref * np.float32(1.0005) + np.float32(1e-3) * np.sign(ref)
    verdict = compare_output("unet", "out_sample", "onnxruntime", actual, ref, tol)
    assert not verdict
    assert any(f.startswith("rel_l2") for f in verdict.failures)
    assert not any("element-wise" in f for f in verdict.failures)


def test_non_finite_and_shape_mismatch_fail(ref: np.ndarray) -> None:
    actual = ref.copy()
    actual[0, 0, 0, 0] = np.nan
    verdict = compare_output("vae_decoder", "sample", "tensorrt", actual, ref, TOL)
    assert not verdict and any("non-finite" in f for f in verdict.failures)
    wrong = compare_output("vae_decoder", "sample", "tensorrt", ref[:1], ref, TOL)
    assert not wrong and "shape" in wrong.failures[0]


def test_fp16_output_is_compared_in_fp32(ref: np.ndarray) -> None:
    actual = ref.astype(np.float16)
    verdict = compare_output("unet", "out_sample", "onnxruntime", actual, ref, TOL)
    # fp16 rounding of values ~1 is up to 2^-11 ~ 4.9e-4 relative: beyond the fp32 table row.
    assert not verdict
    assert 1e-4 < verdict.max_abs < 4e-3
    assert compare_output(
        "unet", "out_sample", "onnxruntime", actual, ref, tolerance_for("unet", "fp16")
    )


def test_relative_l2_edge_cases() -> None:
    zeros = np.zeros(4, np.float32)
    assert relative_l2(zeros, zeros) == 0.0
    assert math.isinf(relative_l2(np.ones(4, np.float32), zeros))


def test_images_psnr_and_pixel_diff() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(20, 236, (32, 32, 3), dtype=np.uint8)
    other = base.copy()
    other[0, 0, 0] += 6
    verdict = compare_images(
        "onnxruntime", [Image.fromarray(other)], [Image.fromarray(base)], IMAGE_TOLERANCES["fp32"]
    )
    mse = 6**2 / base.size
    assert verdict.max_pixel_diff == 6
    assert verdict.psnr_db == pytest.approx(10 * math.log10(255**2 / mse))
    assert verdict  # 6 levels on one value: within the fp32 row (max 8, PSNR >= 40 dB)
    other[0, 0, 0] += 4  # 10 levels: the PSNR is still ~56 dB, the max pixel bound fails
    verdict = compare_images(
        "onnxruntime", [Image.fromarray(other)], [Image.fromarray(base)], IMAGE_TOLERANCES["fp32"]
    )
    assert not verdict and verdict.failures == ["max pixel diff 10 > 8"]
    assert psnr(base, base) == math.inf


def test_images_fail_on_large_difference() -> None:
    base = np.full((16, 16, 3), 100, np.uint8)
    verdict = compare_images(
        "onnxruntime",
        [Image.fromarray(base + 40)],
        [Image.fromarray(base)],
        IMAGE_TOLERANCES["fp32"],
    )
    assert not verdict
    assert verdict.psnr_db == pytest.approx(10 * math.log10(255**2 / 1600))
    assert "PSNR" in str(verdict) and "FAIL" in str(verdict)


def test_tolerance_table_is_complete_and_reasoned() -> None:
    components = {"unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder"}
    for precision in ("fp32", "fp16"):
        for component in components | {"attention_probs"}:
            row = tolerance_for(component, precision)
            assert row.reason and row.atol > 0 and 0 < row.min_cosine < 1
        assert IMAGE_TOLERANCES[precision].reason and GATE_MARGINS[precision].reason
    # fp16 rows are never tighter than fp32 rows.
    for (component, precision), row in TOLERANCES.items():
        if precision == "fp16":
            strict = TOLERANCES[(component, "fp32")]
            assert row.atol >= strict.atol and row.max_rel_l2 >= strict.max_rel_l2
    with pytest.raises(UserError, match="int8"):
        tolerance_for("unet", "int8")
    with pytest.raises(UserError, match="known"):
        tolerance_for("controlnet", "fp32")


def test_missing_output_is_a_named_failure(ref: np.ndarray) -> None:
    from maskattn_deploy.parity.compare import compare_outputs

    expected = {"hidden_states": ref, "text_embeds": ref[:, 0]}
    verdicts = compare_outputs("text_encoder_2", "tensorrt", {"hidden_states": ref}, expected, TOL)
    assert [bool(v) for v in verdicts] == [True, False]
    assert "returned no output 'text_embeds'" in verdicts[1].failures[0]
    assert "text_encoder_2/text_embeds" in str(verdicts[1])
