"""The ``attention`` part: ``maskattn::gated_attention`` against PyTorch's SDPA, same shapes.

At each of the plan's shapes (SDXL's gated cross-attention: q ``[b, h, n, d]`` in the
``[b, n, h, d]`` layout the projections produce, k/v ``[b, h, 77, d]``, fp32 gate logits
``[b, n, t]``) the op's two fast implementations, the fused Triton kernel (``triton``) and
FlexAttention (``flex``), are checked against the reference computed in float64 and timed next
to SDPA on the same q/k/v without a mask (what an ungated layer runs). The target is a time
within 1.15x of SDPA's. The first call of each is timed on its own: it includes Triton's JIT
or FlexAttention's ``torch.compile``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.results import AttentionData, AttentionShape, ImplResult, Part

IMPLS = ("triton", "flex")  # implementations of maskattn::gated_attention timed against SDPA
# Max abs error of o vs the float64 reference: fp32 summation order; fp16/bf16 rounding of
# the probabilities and of o (the op tests' tolerances).
ATOL = {"float32": 2e-6, "float16": 3e-3, "bfloat16": 3e-2}
TRITON_MODULE = "maskattn_deploy.plugins.gated_attention_triton"
OPEN_FRACTION = 0.3  # of the random gate logits (the kernels compute every entry either way)


def attention_part(part: Part[AttentionData], ctx: RunContext) -> None:
    from maskattn_deploy.ops import attention as ops

    data = part.data = AttentionData(module=TRITON_MODULE if ctx.kernel is not None else None)
    dtype = getattr(torch, ctx.plan.attention_dtype)
    for i, (b, h, n, t, d) in enumerate(ctx.plan.attention_shapes):
        inputs = ops.random_inputs((b, h, n, t, d), dtype=dtype, device=ctx.device,
                                   open_fraction=OPEN_FRACTION, seed=ctx.config.seed + i)  # fmt: skip
        row = AttentionShape([b, h, n, t, d], ctx.plan.attention_dtype, _open(inputs))
        data.shapes.append(row)
        sdpa = row.impls["sdpa"] = _timed_impl(lambda i=inputs: ops.run_sdpa(i), ctx)
        want = _reference(inputs)
        for impl in IMPLS:
            row.impls[impl] = result = _checked_impl(impl, inputs, want, ctx)
            if result.timing and sdpa.timing:
                result.ratio_vs_sdpa = result.timing.median_us / sdpa.timing.median_us
            ctx.echo(attention_line(row, impl))
            ctx.save()
    if not all_correct(data):
        part.status, part.error = "failed", "gated attention differs from the reference"


def all_correct(data: AttentionData | None) -> bool | None:
    """True when every implementation that ran matched the reference (None: none ran)."""
    if data is None:
        return None
    seen = [r.correct for s in data.shapes for k, r in s.impls.items() if k != "sdpa"]
    seen = [c for c in seen if c is not None]
    return all(seen) if seen else None


def _open(inputs: Any) -> float:
    from maskattn_deploy.ops.reference import open_mask

    return float(open_mask(inputs.gate_logits, inputs.threshold).float().mean())


def _reference(inputs: Any) -> torch.Tensor:
    from maskattn_deploy.ops.reference import gated_attention_reference

    i = inputs
    q, k, v = (x.double() for x in (i.q, i.k, i.v))
    return gated_attention_reference(q, k, v, i.gate_logits.double(), i.threshold, i.scale)


def _runnable(impl: str, inputs: Any, ctx: RunContext) -> str | None:
    """Why ``impl`` would not run the implementation it names here (the op falls back to the
    reference silently), or None."""
    from maskattn_deploy.ops import attention as ops

    if impl == "triton" and not (ctx.kernel is not None and ops.triton_runs_here(inputs.q)):
        return f"the Triton kernel cannot run here: {ctx.kernel_missing or 'no triton'}"
    return None


def _checked_impl(impl: str, inputs: Any, want: torch.Tensor, ctx: RunContext) -> ImplResult:
    from maskattn_deploy.ops import attention as ops

    reason = _runnable(impl, inputs, ctx)
    if reason is not None:
        return ImplResult("skipped", error=reason)
    try:
        start = time.perf_counter()
        got = ops.run(inputs, impl)
        ctx.timer.sync()
        first_call_s = time.perf_counter() - start
        diff = float((got.double() - want).abs().max())
        atol = ATOL[ctx.plan.attention_dtype]
        result = _timed_impl(lambda: ops.run(inputs, impl), ctx)
        result.first_call_s, result.max_abs_diff, result.atol = first_call_s, diff, atol
        result.correct = diff <= atol
    except Exception as exc:  # a compile or launch failure: record it, keep the others
        return ImplResult("failed", error=f"{type(exc).__name__}: {exc}"
                          f"\n{traceback.format_exc()[-1500:]}")  # fmt: skip
    return result


def _timed_impl(call: Callable[[], Any], ctx: RunContext) -> ImplResult:
    plan = ctx.plan
    timing = ctx.timer.per_call_us([call], plan.attention_inner, plan.attention_samples)
    return ImplResult("ok", timing=timing)


def attention_line(row: AttentionShape, impl: str) -> str:
    r, sdpa = row.impls[impl], row.impls["sdpa"]
    if r.timing is None or sdpa.timing is None or r.ratio_vs_sdpa is None:
        return f"  attention {row.shape} {impl}: {r.status} ({(r.error or '').splitlines()[0]})"
    return (
        f"  attention {row.shape} {row.dtype} {impl}: {r.timing.median_us:.2f} us vs SDPA "
        f"{sdpa.timing.median_us:.2f} us ({r.ratio_vs_sdpa:.2f}x), max abs diff "
        f"{r.max_abs_diff:.1e} (atol {r.atol:.0e}), first call {r.first_call_s:.1f} s"
    )
