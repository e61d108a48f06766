"""The masked-softmax oracle against an explicit per-row computation (docs/design.md section 3.3 cases)."""

from __future__ import annotations

import math

import pytest
import torch

from maskattn_deploy.ops.reference import check_shapes, masked_softmax_reference, open_mask
from maskattn_deploy.ops.torch_op import masked_softmax_op


def explicit(logits: torch.Tensor, gates: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Row by row in Python floats: open set, argmax fallback (first max), softmax over it."""
    b, h, n, t = logits.shape
    out = torch.zeros(b, h, n, t, dtype=torch.float64)
    for bi in range(b):
        for ni in range(n):
            g = [float(x) for x in gates[bi, 0, ni]]
            opened = [j for j in range(t) if g[j] > threshold]
            if not opened:
                best = max(g)
                opened = [g.index(best)]
            for hi in range(h):
                s = [float(logits[bi, hi, ni, j]) for j in opened]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for j, ej in zip(opened, e, strict=True):
                    out[bi, hi, ni, j] = ej / z
    return out


def rand(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)  # never exact zeros


@pytest.mark.parametrize("t", [1, 2, 77, 154, 231])
def test_random_matches_explicit(t: int) -> None:
    s, g = rand(2, 3, 5, t), rand(2, 1, 5, t, seed=1)
    p = masked_softmax_reference(s, g)
    assert torch.allclose(p.double(), explicit(s, g), atol=1e-6)  # fp32 softmax rounding


def test_all_open_is_plain_softmax() -> None:
    s, g = rand(1, 2, 4, 77), rand(1, 1, 4, 77).abs() + 0.1
    assert torch.allclose(masked_softmax_reference(s, g), torch.softmax(s, -1), atol=1e-7)


def test_all_closed_rows_open_argmax_with_lowest_index_tie() -> None:
    s = rand(1, 2, 3, 10)
    g = -rand(1, 1, 3, 10).abs() - 1.0
    g[0, 0, 1, 3] = -0.01
    g[0, 0, 1, 7] = -0.01  # tie with index 3: index 3 wins
    p = masked_softmax_reference(s, g)
    assert torch.equal(p[0, :, 1, 3], torch.ones(2))
    assert int((p[0, 0] > 0).sum()) == 3  # exactly one token per row
    assert torch.allclose(p.double(), explicit(s, g), atol=1e-7)


def test_ties_in_open_rows_and_exact_zeros() -> None:
    s = rand(2, 2, 6, 9)
    g = torch.full((2, 1, 6, 9), -1.0)
    g[..., ::3] = 2.0  # ties among open tokens do not matter; closed tokens must be exactly 0
    p = masked_softmax_reference(s, g)
    assert torch.all(p[..., 1::3] == 0) and torch.all(p[..., 2::3] == 0)
    assert torch.allclose(p.sum(-1), torch.ones(2, 2, 6), atol=1e-6)


def test_one_open_token_gets_probability_one() -> None:
    s, g = rand(1, 4, 3, 77), torch.full((1, 1, 3, 77), -5.0)
    g[..., 42] = 0.5
    p = masked_softmax_reference(s, g)
    assert torch.equal(p[..., 42], torch.ones(1, 4, 3)) and float(p.sum()) == 12.0


def test_threshold_attribute() -> None:
    s, g = rand(1, 1, 8, 20), rand(1, 1, 8, 20, seed=3)
    p = masked_softmax_reference(s, g, threshold=1.0)
    assert torch.allclose(p.double(), explicit(s, g, threshold=1.0), atol=1e-7)


def test_fp16_logits_near_range_stay_finite() -> None:
    s = (rand(2, 2, 4, 77) * 2e4).clamp(-6.5e4, 6.5e4).half()
    g = rand(2, 1, 4, 77, seed=5)
    p = masked_softmax_reference(s, g)
    assert p.dtype == torch.float16 and torch.isfinite(p).all()
    # fp16 output: half-precision rounding of probabilities in [0, 1] (2^-11 relative)
    assert torch.allclose(p.double(), explicit(s.float(), g), atol=1e-3)


def test_nonfinite_logits_stay_in_their_row() -> None:
    s, g = rand(1, 1, 3, 8), rand(1, 1, 3, 8).abs() + 0.1
    s[0, 0, 1, 2] = float("nan")
    s[0, 0, 2, 5] = float("inf")
    p = masked_softmax_reference(s, g)
    assert torch.allclose(p[0, 0, 0], torch.softmax(s[0, 0, 0], -1), atol=1e-7)
    assert torch.isnan(p[0, 0, 1]).any()  # the poisoned row itself is not promised anything


def test_gate_dtype_same_as_logits_and_head_broadcast() -> None:
    s, g = rand(2, 3, 4, 5).half(), rand(2, 1, 4, 5, seed=7).half()
    assert torch.equal(masked_softmax_reference(s, g), masked_softmax_reference(s, g.float()))
    gh = g.expand(2, 3, 4, 5).contiguous()
    assert torch.equal(masked_softmax_reference(s, gh), masked_softmax_reference(s, g))


def test_open_mask_never_empty() -> None:
    g = -rand(3, 1, 50, 7).abs()
    assert open_mask(g).sum(-1).eq(1).all()


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\[b,h,n,t\]"):
        check_shapes(torch.zeros(2, 3, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="do not match"):
        check_shapes(torch.zeros(2, 3, 4, 5), torch.zeros(2, 1, 4, 6))


def test_custom_op_matches_reference_and_is_one_op() -> None:
    s, g = rand(2, 2, 3, 77), rand(2, 1, 3, 77, seed=9)
    assert torch.equal(masked_softmax_op(s, g), masked_softmax_reference(s, g))
    assert torch.ops.maskattn.masked_softmax.default is not None
