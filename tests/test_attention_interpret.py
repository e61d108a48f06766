"""The fused gated-attention Triton kernel on the CPU (TRITON_INTERPRET=1) against the reference.

As in test_kernel_interpret.py, the kernel runs in ONE child process with TRITON_INTERPRET=1
(``triton.jit`` picks the interpreter at import time and the AOT tests need the compiled form):
the child only executes the kernel on inputs saved here (through the launcher with poisoned
output buffers, the ``maskattn::gated_attention`` op with ``impl="triton"`` and every candidate
tiling) and saves the outputs; every comparison happens in this process.

Cases: every case of the masked-softmax contract (docs/design.md) in attention form, head dims
16 (the tiny model), 64, 80, 128, t = 1, 2, 77, 154, 231, fp32/fp16/bf16, rows that are not a
multiple of the block, partial head groups, strided and contiguous inputs.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from _interpret import run_interpreted

from maskattn_deploy.ops.reference import gated_attention_reference, open_mask

CHILD = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter
    warnings.filterwarnings("ignore")  # numpy warns on 0/0 and -inf - -inf in masked-off lanes

    # Triton 3.9's interpreter stores bf16 as uint16 and multiplies those bit patterns in
    # tl.dot; widen bf16 operands to fp32 (exact) first. Only the test harness is patched.
    _dot = interpreter.InterpreterBuilder.create_dot

    def _widen(x):
        if x.dtype == tl.bfloat16:
            bits = x.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, *args):
        return _dot(self, _widen(a), _widen(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot

    from maskattn_deploy.plugins.gated_attention_triton import (
        TUNING_CANDIDATES, gated_attention_triton,
    )
    from maskattn_deploy.ops.torch_op import gated_attention_op

    cases = torch.load(sys.argv[1])
    tiling_cases = sys.argv[3].split(",")
    results = {}
    for name, c in cases.items():
        args = (c["q"], c["k"], c["v"], c["g"], c["threshold"], c["scale"])
        out = c["out"].clone()
        launched = gated_attention_triton(*args, out=out)
        results[name] = {
            "launcher": launched,
            "out_is_result": launched is out,
            "op": gated_attention_op(*args, impl="triton"),
        }
        if name in tiling_cases:
            results[name]["tilings"] = {
                tiling: gated_attention_triton(*args, out=c["out"].clone(), tiling=tiling)
                for tiling in TUNING_CANDIDATES
            }
    torch.save(results, sys.argv[2])
    """
)

POISON = 123.0  # never a value of o for these inputs (|o| <= max |v| < 10)


def _views(b: int, h: int, tokens: int, d: int, dtype: torch.dtype, gen, scale=1.0):
    """``[b, h, tokens, d]`` views of ``[b, tokens, h, d]`` memory, like the projections'."""
    x = torch.randn(b, tokens, h, d, generator=gen) * scale
    return x.to(dtype).transpose(1, 2)


def _gate(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * 2.0 - 0.5


def build_cases() -> dict[str, dict]:
    """Tiny shapes (the interpreter is slow); each case names what it covers."""
    gen = torch.Generator().manual_seed(4321)
    cases: dict[str, dict] = {}

    def add(name, q, k, v, g, threshold=0.0, fill=float("nan"), scale=None, vs_explicit=True):
        b, h, n, d = q.shape
        out = torch.full((b, h, n, d), fill, dtype=q.dtype)
        scale = d**-0.5 if scale is None else scale
        cases[name] = {"q": q, "k": k, "v": v, "g": g, "threshold": threshold, "scale": scale,
                       "out": out, "vs_explicit": vs_explicit}  # fmt: skip

    for t in (1, 2, 77, 154, 231):
        for dtype in (torch.float32, torch.float16):
            b, h, n, d = 2, 3, 5, 16
            add(f"t{t}-{str(dtype)[6:]}", _views(b, h, n, d, dtype, gen),
                _views(b, h, t, d, dtype, gen), _views(b, h, t, d, dtype, gen),
                _gate((b, n, t), gen))  # fmt: skip
    for d in (64, 80, 128):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            b, h, n, t = 1, 2, 9, 77
            add(f"d{d}-{str(dtype)[6:]}", _views(b, h, n, d, dtype, gen),
                _views(b, h, t, d, dtype, gen), _views(b, h, t, d, dtype, gen),
                _gate((b, n, t), gen), fill=POISON)  # fmt: skip
    b, h, n, t, d = 2, 2, 6, 77, 16
    q, k, v = (_views(b, h, m, d, torch.float32, gen) for m in (n, t, t))
    add("all-open", q, k, v, torch.rand(b, n, t, generator=gen) + 0.5)
    add("all-closed-fallback", q, k, v, -torch.rand(b, n, t, generator=gen) - 0.1, fill=POISON)
    one = torch.full((b, n, t), -3.0)
    one[..., 40] = 2.0
    add("one-open-token", q, k, v, one)
    ties = torch.full((b, n, t), -2.0)
    ties[..., 9] = ties[..., 30] = -0.5  # equal maxima, nothing open: index 9 must open
    ties[:, 1] = -1.0  # a row of all-equal gates: index 0 opens
    add("ties-in-gate", q, k, v, ties)
    add("threshold-0.3", q, k, v, _gate((b, n, t), gen), threshold=0.3, fill=POISON)
    add("forced-open-threshold-minus-inf", q, k, v, _gate((b, n, t), gen), threshold=float("-inf"))
    huge_v = v.clone()
    closed_cols = torch.arange(t) % 3 != 0
    huge_v[:, :, closed_cols] = 5.0e3  # closed tokens must weigh exactly 0
    g_cols = torch.where(closed_cols, -1.0, 1.0).expand(b, n, t).contiguous()
    add("closed-values-ignored", q, k, huge_v, g_cols)
    # Logits near the fp16 range (|scale * q.k| up to ~3e4): the explicit path rounds them to
    # fp16 (steps of 16 there), so it is compared with the fp64 computation only.
    big = _views(b, h, n, d, torch.float32, gen, scale=40.0)
    add("fp16-near-range", big.half(), (k * 40.0).half(), v.half(), _gate((b, n, t), gen),
        scale=1.0, vs_explicit=False)  # fmt: skip
    add("fp16-gate-fp16", q.half(), k.half(), v.half(), _gate((b, n, t), gen).half())
    # 7 and 37 query rows: not multiples of BLOCK_N (16..64); 3 heads: partial head groups.
    add("rows-not-multiple-7", *(_views(1, 3, m, 16, torch.float32, gen) for m in (7, 77, 77)),
        _gate((1, 7, 77), gen), fill=POISON)  # fmt: skip
    add("rows-not-multiple-37", *(_views(2, 3, m, 16, torch.float16, gen) for m in (37, 154, 154)),
        _gate((2, 37, 154), gen), fill=POISON)  # fmt: skip
    contiguous = [x.contiguous() for x in _views_list(2, 2, 11, 77, 64, gen)]
    add("contiguous-inputs", *contiguous, _gate((2, 11, 77), gen), fill=POISON)
    bad_q = q.clone()
    bad_q[0, 0, 1, 3] = float("inf")
    bad_q[0, 1, 2, 4] = float("nan")
    add("non-finite-query", bad_q, k, v, _gate((b, n, t), gen), fill=POISON)
    return cases


def _views_list(b, h, n, t, d, gen):
    return [_views(b, h, m, d, torch.float32, gen) for m in (n, t, t)]


# Cases that also run under every candidate tiling: partial row blocks and head groups, the
# fallback and ties, a large head dim, fp16 with fp16 gates, bf16, non-finite rows, t = 231.
TILING_CASES = (
    "rows-not-multiple-7", "rows-not-multiple-37", "ties-in-gate", "all-closed-fallback",
    "d80-bfloat16", "fp16-gate-fp16", "non-finite-query", "t231-float32",
)  # fmt: skip
CASE_NAMES = list(build_cases())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("attn-interp")
    cases = build_cases()
    return cases, run_interpreted(CHILD, cases, TILING_CASES, tmp, timeout=600)


def _reference(c: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    args = [c["q"], c["k"], c["v"]]
    if dtype is not None:
        args = [x.to(dtype) for x in args]
    return gated_attention_reference(*args, c["g"], c["threshold"], c["scale"])


# Largest |kernel - reference| per dtype. The kernel keeps the logits in fp32 where the
# explicit path rounds them to the input dtype (relative 2^-11 fp16, 2^-8 bf16, on logits of
# magnitude ~5), then both round p and o; measured at most 1.5e-3 (fp16) and 1.2e-2 (bf16).
# fp32 differs only by summation order (measured 5e-7).
ATOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _finite_rows(c: dict) -> torch.Tensor:
    """[b, h, n, 1] rows whose query is finite (a non-finite query spoils only its own row)."""
    return torch.isfinite(c["q"].float()).all(dim=-1, keepdim=True)


def _assert_matches_reference(c: dict, got: torch.Tensor) -> None:
    want = _reference(c)
    assert got.dtype == want.dtype and got.shape == want.shape
    rows = _finite_rows(c).expand_as(want)
    assert torch.isfinite(got[rows]).all()
    exact = _reference(c, torch.float64)[rows]
    torch.testing.assert_close(got[rows].double(), exact, atol=ATOL[want.dtype], rtol=0)
    if c["vs_explicit"]:
        torch.testing.assert_close(
            got[rows].float(), want[rows].float(), atol=ATOL[want.dtype], rtol=0
        )
    # Not worse than the explicit path itself against the fp64 computation (plus an output ulp).
    ulp = torch.finfo(want.dtype).eps * exact.abs().max().clamp(min=1.0)
    kernel_err = (got[rows].double() - exact).abs().max()
    explicit_err = (want[rows].double() - exact).abs().max()
    assert kernel_err <= explicit_err + ulp, (float(kernel_err), float(explicit_err))


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("path", ["launcher", "op"])
def test_matches_reference(runs, name: str, path: str) -> None:
    cases, results = runs
    _assert_matches_reference(cases[name], results[name][path])


@pytest.mark.parametrize("name", TILING_CASES)
def test_every_candidate_tiling_matches_reference(runs, name: str) -> None:
    from maskattn_deploy.plugins.gated_attention_triton import TUNING_CANDIDATES

    cases, results = runs
    tilings = results[name]["tilings"]
    assert set(tilings) == set(TUNING_CANDIDATES)
    for tiling, got in tilings.items():
        _assert_matches_reference(cases[name], got)
        assert not torch.any(got == POISON), tiling


def test_poisoned_buffers_are_fully_overwritten(runs) -> None:
    cases, results = runs
    for name, r in results.items():
        got, want = r["launcher"], _reference(cases[name])
        assert r["out_is_result"], name  # written into the given NaN / 123.0 buffer
        assert not torch.any(got == POISON), name
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name


def test_op_output_has_the_projection_layout(runs) -> None:
    _, results = runs
    o = results["d64-float16"]["op"]
    assert o.transpose(1, 2).is_contiguous()  # [b, n, h, d] memory: reshape to [b, n, h*d] is free


def test_single_open_token_copies_its_value_row_exactly(runs) -> None:
    cases, results = runs
    # Fallback rows and one-open-token rows have p = 1 exactly: o is that token's v row.
    c, got = cases["one-open-token"], results["one-open-token"]["launcher"]
    assert torch.equal(got, c["v"][:, :, 40:41].expand_as(got))
    c, got = cases["all-closed-fallback"], results["all-closed-fallback"]["launcher"]
    best = c["g"].argmax(-1)  # [b, n]: the lowest index among equal maxima
    want = torch.stack([c["v"][bi][:, best[bi]] for bi in range(best.shape[0])])
    assert torch.equal(got, want)
    c, got = cases["ties-in-gate"], results["ties-in-gate"]["launcher"]
    assert torch.equal(got[:, :, 0], c["v"][:, :, 9]) and torch.equal(got[:, :, 1], c["v"][:, :, 0])


def test_forced_open_equals_plain_attention(runs) -> None:
    cases, results = runs
    c = cases["forced-open-threshold-minus-inf"]
    want = torch.nn.functional.scaled_dot_product_attention(
        c["q"], c["k"], c["v"], scale=c["scale"]
    )
    got = results["forced-open-threshold-minus-inf"]["launcher"]
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)  # fp32 summation order only


def test_non_finite_query_stays_in_its_row(runs) -> None:
    cases, results = runs
    c, got = cases["non-finite-query"], results["non-finite-query"]["launcher"]
    bad = ~_finite_rows(c).squeeze(-1)  # [b, h, n]
    assert int(bad.sum()) == 2 and torch.isnan(got[bad]).all()
    assert torch.isfinite(got[~bad]).all()


def test_closed_tokens_weigh_exactly_zero(runs) -> None:
    cases, results = runs
    c, got = cases["closed-values-ignored"], results["closed-values-ignored"]["launcher"]
    assert open_mask(c["g"]).float().mean() < 0.4  # most tokens closed, their v rows 5000
    assert got.abs().max() < 10  # any weight on a closed token would show as >> 10
