"""Triton masked-softmax numerics on the CPU (TRITON_INTERPRET=1) against the reference.

``triton.jit`` decides between compiling and interpreting when the kernel module is imported,
and the AOT tests need the compiled form, so the kernel runs in ONE child process with
TRITON_INTERPRET=1: it only executes the kernel (three entry points) on inputs saved here and
saves the outputs. Every comparison with the reference happens in this process.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _interpret import run_interpreted

from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys, warnings
    import torch
    warnings.filterwarnings("ignore")  # numpy warns on -inf - -inf in masked-off lanes
    from maskattn_deploy.plugins.masked_softmax_triton import (
        TUNING_CANDIDATES, masked_softmax_triton,
    )
    from maskattn_deploy.plugins.torch_kernel import cuda_masked_softmax
    from maskattn_deploy.ops.torch_op import masked_softmax, masked_softmax_op

    cases = torch.load(sys.argv[1])
    TILING_CASES = sys.argv[3].split(",")
    results = {}
    for name, c in cases.items():
        out = c["out"].clone()
        launched = masked_softmax_triton(c["S"], c["G"], c["threshold"], out=out)
        results[name] = {
            "launcher": launched,
            "out_is_result": launched is out,
            "torch_kernel": cuda_masked_softmax(c["S"], c["G"], c["threshold"]),
        }
        if name in TILING_CASES:  # every tiling the GPU check may pick
            results[name]["tilings"] = {
                tiling: masked_softmax_triton(
                    c["S"], c["G"], c["threshold"], out=c["out"].clone(), tiling=tiling
                )
                for tiling in TUNING_CANDIDATES
            }
    # The same function torch_kernel.register() installs for CUDA, installed here for CPU
    # (in this throwaway process) so the custom op dispatches to the interpreted kernel.
    masked_softmax.register_kernel("cpu")(cuda_masked_softmax)
    for name, c in cases.items():
        results[name]["op"] = masked_softmax_op(c["S"], c["G"], c["threshold"])
    torch.save(results, sys.argv[2])
    """
)


def _rand_gate(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * 2.0 - 0.5


def build_cases() -> dict[str, dict]:
    """Every case of docs/design.md section 3.3; shapes tiny (the interpreter is slow)."""
    gen = torch.Generator().manual_seed(1234)
    cases: dict[str, dict] = {}

    def add(name, S, G, threshold=0.0, fill=float("nan")):
        cases[name] = {"S": S, "G": G, "threshold": threshold, "out": torch.full_like(S, fill)}

    for t in (1, 2, 77, 154, 231):
        for dtype in (torch.float32, torch.float16):
            S = torch.randn(2, 3, 5, t, generator=gen).to(dtype) * 3
            add(f"random-t{t}-{str(dtype)[6:]}", S, _rand_gate((2, 1, 5, t), gen))
    shape = (2, 2, 3, 77)
    S = torch.randn(shape, generator=gen) * 4
    add("all-open", S, torch.rand(2, 1, 3, 77, generator=gen) + 0.5)
    add("all-closed-fallback", S, -torch.rand(2, 1, 3, 77, generator=gen) - 0.1, fill=123.0)
    one = torch.full((2, 1, 3, 77), -3.0)
    one[..., 40] = 2.0
    add("one-open-token", S, one)
    ties = torch.full((2, 1, 3, 77), -2.0)
    ties[..., 9] = -0.5
    ties[..., 30] = -0.5  # equal maxima: the lowest index (9) must open
    ties[:, :, 1] = -1.0  # a row of all-equal gates: index 0 opens
    add("ties-in-gate", S, ties)
    add("threshold-0.3", S, _rand_gate((2, 1, 3, 77), gen), threshold=0.3, fill=123.0)
    big = (torch.rand(2, 2, 3, 77, generator=gen) * 2 - 1) * 6.0e4
    add("fp16-near-range", big.half(), _rand_gate((2, 1, 3, 77), gen))
    add("fp16-gate-fp16", S.half(), _rand_gate((2, 1, 3, 77), gen).half())
    # 7 token rows, and 5 per (batch, head) slice: not multiples of the rows per program (4 at
    # t=77, 2 at t=154 by default; TILING_CASES also run every tiling in TUNING_CANDIDATES).
    add(
        "rows-not-multiple-7",
        torch.randn(1, 1, 7, 77, generator=gen),
        _rand_gate((1, 1, 7, 77), gen),
    )
    add(
        "rows-not-multiple-30",
        torch.randn(3, 2, 5, 154, generator=gen),
        _rand_gate((3, 1, 5, 154), gen),
    )
    bad = torch.randn(1, 2, 4, 77, generator=gen)
    gate = torch.full((1, 1, 4, 77), 1.0)
    gate[..., 50:] = -1.0  # closed tokens must stay exactly 0 even in a NaN row
    bad[0, 0, 1, 5] = float("inf")
    bad[0, 1, 2, 6] = float("nan")
    add("non-finite-logits", bad, gate, fill=123.0)
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("interp")
    cases = build_cases()
    return cases, run_interpreted(CHILD, cases, TILING_CASES, tmp, timeout=300)


def _atol(dtype: torch.dtype) -> float:
    # fp32: only summation order differs from torch.softmax; fp16: rounding of P to fp16.
    return 1e-6 if dtype == torch.float32 else 2e-3


CASE_NAMES = list(build_cases())
# Cases that also run under every candidate tiling: partial blocks, several heads and batches,
# ties and the fallback, non-finite logits, fp16 logits with fp16 gates.
TILING_CASES = (
    "rows-not-multiple-7", "rows-not-multiple-30", "ties-in-gate", "all-closed-fallback",
    "non-finite-logits", "fp16-gate-fp16", "random-t231-float32",
)  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("path", ["launcher", "torch_kernel", "op"])
def test_matches_reference(runs, name: str, path: str) -> None:
    cases, results = runs
    _assert_matches_reference(cases[name], results[name][path])


def _assert_matches_reference(c: dict, got: torch.Tensor) -> None:
    want = masked_softmax_reference(c["S"], c["G"], c["threshold"])
    assert got.dtype == c["S"].dtype and got.shape == c["S"].shape
    finite_rows = torch.isfinite(c["S"].float()).all(dim=-1, keepdim=True).expand_as(want)
    torch.testing.assert_close(
        got[finite_rows].float(), want[finite_rows].float(), atol=_atol(c["S"].dtype), rtol=0
    )
    # Exact zero pattern: closed tokens are exactly 0 and no open probability differs in zeroness.
    assert torch.equal(got[finite_rows] == 0, want[finite_rows] == 0)
    closed = ~open_mask(c["G"], c["threshold"]).expand_as(want)
    assert torch.all(got[closed] == 0)
    assert torch.isfinite(got[finite_rows]).all()


@pytest.mark.parametrize("name", TILING_CASES)
def test_every_candidate_tiling_matches_reference(runs, name: str) -> None:
    mst = pytest.importorskip("maskattn_deploy.plugins.masked_softmax_triton")
    cases, results = runs
    tilings = results[name]["tilings"]
    assert set(tilings) == set(mst.TUNING_CANDIDATES)
    for got in tilings.values():
        _assert_matches_reference(cases[name], got)
        assert not torch.any(got == 123.0)  # poisoned buffers were fully overwritten


def test_poisoned_buffer_is_fully_overwritten(runs) -> None:
    cases, results = runs
    for name, r in results.items():
        c = cases[name]
        got = r["launcher"]
        want = masked_softmax_reference(c["S"], c["G"], c["threshold"])
        assert r["out_is_result"], name  # the kernel wrote into the given (NaN / 123.0) buffer
        assert not torch.any(got == 123.0), name  # 123 is never a probability
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name


def test_non_finite_logits_stay_in_their_row(runs) -> None:
    cases, results = runs
    got = results["non-finite-logits"]["launcher"]
    want = masked_softmax_reference(
        cases["non-finite-logits"]["S"], cases["non-finite-logits"]["G"]
    )
    # Rows (0,0,1) and (0,1,2) hold inf/NaN: NaN there like the reference; every other row exact.
    assert torch.isnan(got[0, 0, 1]).any() and torch.isnan(got[0, 1, 2]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    clean = torch.ones(got.shape[:-1], dtype=torch.bool)
    clean[0, 0, 1] = clean[0, 1, 2] = False
    torch.testing.assert_close(got[clean], want[clean], atol=1e-6, rtol=0)


def test_fallback_and_ties_open_the_lowest_argmax(runs) -> None:
    cases, results = runs
    got = results["ties-in-gate"]["launcher"]
    assert torch.all(got[:, :, 0, 9] > 0) and torch.all(got[:, :, 0, 30] == 0)
    assert torch.all(got[:, :, 1, 0] == 1.0)  # all-equal gates: token 0 alone, probability 1
    closed = results["all-closed-fallback"]["launcher"]
    assert torch.equal((closed > 0).sum(-1), torch.ones(closed.shape[:-1], dtype=torch.long))


def test_register_is_a_noop_without_cuda() -> None:
    from maskattn_deploy.plugins.torch_kernel import register

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-op path is for CPU-only machines")
    assert register() is False
    assert register() is False
