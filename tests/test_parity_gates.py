"""Gate agreement: which flips are tolerated (near threshold, fallback ties) and which fail."""

from __future__ import annotations

import pytest
import torch

from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask
from maskattn_deploy.parity.gates import gate_agreement, mask_from_probs, tolerated_flips

MARGIN = 1e-3


@pytest.fixture
def logits() -> torch.Tensor:
    """[b=2, n=6, t=5] gate logits far from 0 (|g| >= 0.5), never zeros."""
    g = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    return torch.where(g >= 0, g + 0.5, g - 0.5)


def test_identical_masks_pass(logits: torch.Tensor) -> None:
    result = gate_agreement("layer.a", "onnxruntime", logits, open_mask(logits), 0.0, MARGIN)
    assert result and result.flips == 0 and result.bad == 0
    assert result.open_fraction == pytest.approx(float(open_mask(logits).float().mean()))
    assert str(result).startswith("PASS") and "layer.a" in str(result)


def test_flip_near_threshold_is_tolerated(logits: torch.Tensor) -> None:
    g = logits.clone()
    g[0, 1, 2] = 4e-4  # open in the reference, within the margin of the threshold
    backend = open_mask(g)
    backend[0, 1, 2] = False  # the backend saw -1e-4: a rounding flip
    result = gate_agreement("layer.a", "onnxruntime", g, backend, 0.0, MARGIN)
    assert result.flips == 1 and result.tolerated == 1 and result.bad == 0 and result
    assert result.near_threshold == 1
    assert result.max_flip_distance == pytest.approx(4e-4)
    # The row with the tolerated flip is marked so localisation can leave it out.
    assert result.flipped_rows is not None and result.flipped_rows[0, 1]
    assert int(result.flipped_rows.sum()) == 1


def test_flip_far_from_threshold_fails_and_says_where(logits: torch.Tensor) -> None:
    backend = open_mask(logits)
    b, n, t = 1, 4, 3
    backend[b, n, t] = ~backend[b, n, t]
    result = gate_agreement(
        "up_blocks.0.attn2", "onnxruntime", logits, backend, 0.0, MARGIN, grid=(2, 3)
    )
    assert not result and result.bad == 1 and result.tolerated == 0
    flip = result.where[0]
    assert (flip.batch, flip.token, flip.text_token) == (b, n, t)
    assert flip.yx == divmod(n, 3)
    assert flip.logit == pytest.approx(float(logits[b, n, t]))
    assert flip.reference_open == bool(open_mask(logits)[b, n, t])
    assert result.tokens == {t: 1}
    line = str(result)
    assert line.startswith("FAIL") and "up_blocks.0.attn2" in line and "t=3" in line


def test_fallback_near_tie_is_tolerated_but_not_a_far_token() -> None:
    # An all-closed row: the reference opens the argmax (token 1); a backend whose logits differ
    # in the last bits may pick token 3, which ties within the margin. Token 0 is far below.
    g = torch.tensor([[[-5.0, -2.0, -9.0, -2.0 - 5e-4, -7.0]]])
    reference = open_mask(g)
    assert reference[0, 0].tolist() == [False, True, False, False, False]
    tie = torch.tensor([[[False, False, False, True, False]]])
    result = gate_agreement("l", "tensorrt", g, tie, 0.0, MARGIN)
    assert result and result.flips == 2 and result.tolerated == 2
    far = torch.tensor([[[True, False, False, False, False]]])
    result = gate_agreement("l", "tensorrt", g, far, 0.0, MARGIN)
    assert not result and result.bad == 1 and result.where[0].text_token == 0


def test_tolerated_rule_against_explicit_definition(logits: torch.Tensor) -> None:
    g = logits.clone()
    g[1, 0] = torch.tensor([-3.0, -1.0, -1.0002, -4.0, -2.5])  # an all-closed row with a tie
    allowed = tolerated_flips(g, 0.0, MARGIN)
    for b, n, t in torch.cartesian_prod(torch.arange(2), torch.arange(6), torch.arange(5)):
        value, row = float(g[b, n, t]), g[b, n]
        near = abs(value) <= MARGIN
        fallback = float(row.max()) <= MARGIN and value >= float(row.max()) - MARGIN
        assert bool(allowed[b, n, t]) == (near or fallback)
    assert allowed[1, 0, 1] and allowed[1, 0, 2] and not allowed[1, 0, 0]


def test_mask_from_probs_recovers_the_open_set(logits: torch.Tensor) -> None:
    scores = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)) * 4
    probs = masked_softmax_reference(scores, logits[:, None])
    assert torch.equal(mask_from_probs(probs), open_mask(logits))
    assert torch.equal(mask_from_probs(probs.half()), open_mask(logits))


def test_shape_mismatch_is_an_error(logits: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="does not match"):
        gate_agreement("l", "onnxruntime", logits, open_mask(logits)[:1], 0.0, MARGIN)
