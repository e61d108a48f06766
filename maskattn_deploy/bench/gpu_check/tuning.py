"""The ``tuning`` part: both kernels' tiling sweeps and their compiler resource report.

It runs last because it can stop anywhere: each candidate is started only while the budget has
room for it, and a sweep cut short says so (``status: partial``) and keeps what it measured.

- Masked softmax: each ``(ROWS, num_warps, HEADS)`` of the kernel's ``TUNING_CANDIDATES``,
  checked on every t = 77 contract case and timed at the kernel part's shapes with the same
  rotating input sets; the fastest correct one is reported with its fraction of copy bandwidth
  (the copy times of the kernel part). Nothing is applied globally: each launch gets its tiling.
- Fused gated attention: each ``(BLOCK_N, num_warps, HEADS)`` of its ``TUNING_CANDIDATES``
  (``HEADS = 0``: all heads), checked against the float64 reference and timed at the attention
  part's shapes.
- Compiler resource report (:mod:`maskattn_deploy.plugins.kernel_resources`): registers,
  spills, shared memory and resident programs per SM of each swept tiling on this card's
  architecture (no GPU needed; under the dry run's interpreter it runs in a child process, as
  ahead-of-time compilation needs the real ``triton.jit`` functions).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import traceback
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.attention import ATOL as ATTENTION_ATOL
from maskattn_deploy.bench.gpu_check.attention import OPEN_FRACTION
from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.kernel import (
    BLOCK_T_77,
    kernel_calls,
    kernel_correctness,
    rotated_inputs,
)
from maskattn_deploy.bench.gpu_check.results import (
    AttentionTilingCandidate,
    KernelResources,
    Part,
    Sweep,
    TilingCandidate,
    TuningData,
)

CRITERION = "geometric mean of median us over the timing shapes (and dtypes)"


def tuning_part(part: Part[TuningData], ctx: RunContext) -> None:
    if ctx.kernel is None:
        part.status, part.reason = "skipped", ctx.kernel_missing
        return
    data = part.data = TuningData()
    data.masked_softmax = sweep_masked_softmax(ctx)
    ctx.save()
    try:
        data.resources = compiler_resources(ctx)
    except Exception as exc:  # the report explains timings; without it they still stand
        data.resources_error = f"{type(exc).__name__}: {exc}"
    ctx.save()
    data.gated_attention = sweep_gated_attention(ctx)


def _fits(ctx: RunContext, what: str) -> str | None:
    return ctx.budget.skip_reason(what, ctx.plan.estimate_s["tuning"])


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


# --------------------------------------------------------------------------- masked softmax


def sweep_masked_softmax(ctx: RunContext) -> Sweep:
    """Every candidate tiling at t = 77 that the budget allows; the fastest correct one."""
    kernel, plan = ctx.kernel, ctx.plan
    candidates = tuple(getattr(kernel, "TUNING_CANDIDATES", ()))[: plan.tuning_candidates]
    if not candidates:
        return Sweep("skipped", reason="the kernel module has no tuning candidates")
    sweep = Sweep("ok", default=list(kernel.launch_config(BLOCK_T_77)), candidates=[],
                  criterion=CRITERION)  # fmt: skip
    assert sweep.candidates is not None
    for tiling in candidates:
        reason = _fits(ctx, f"masked-softmax tiling {tiling}")
        if reason is not None:
            sweep.status, sweep.reason = "partial", reason
            break
        sweep.candidates.append(_masked_softmax_candidate(ctx, tuple(tiling)))
        ctx.save()
    good = [c for c in sweep.candidates if c.correct]
    if good:
        best = min(good, key=lambda c: c.geomean_us)
        sweep.chosen = [best.rows, best.num_warps, best.heads]
        sweep.chosen_fraction_of_copy = _fractions_of_copy(ctx, best.median_us)
        ctx.echo(f"  masked-softmax tiling chosen: rows={best.rows} warps={best.num_warps} "
                 f"heads={best.heads}, fraction of copy {sweep.chosen_fraction_of_copy}")  # fmt: skip
    return sweep


def _masked_softmax_candidate(ctx: RunContext, tiling: tuple[int, int, int]) -> TilingCandidate:
    """One tiling: correct on the t = 77 cases? Median us at each timing shape and dtype."""
    kernel, plan = ctx.kernel, ctx.plan
    correct = kernel_correctness(kernel, ctx.device, plan, ctx.config.seed, 77, tiling)
    times = {}
    for shape in plan.timing_shapes:
        for dtype in plan.timing_dtypes:
            data = rotated_inputs(shape, getattr(torch, dtype), ctx.device, plan, ctx.l2_bytes())
            calls = kernel_calls(kernel, data, tiling)
            stats = ctx.timer.per_call_us(calls, plan.kernel_inner, plan.tuning_samples)
            times[f"{list(shape)} {dtype}"] = stats.median_us
    row = TilingCandidate(
        *tiling, correct.all_pass, correct.failed, times, _geomean(list(times.values()))
    )
    outcome = "ok" if row.correct else "WRONG: " + ", ".join(row.failed)
    ctx.echo(f"  tiling rows={tiling[0]:<3} warps={tiling[1]} heads={tiling[2]:<2}: "
             f"geomean {row.geomean_us:.2f} us ({outcome})")  # fmt: skip
    return row


def _fractions_of_copy(ctx: RunContext, median_us: dict[str, float]) -> dict[str, float]:
    """copy time / kernel time per timing row, with the kernel part's copy timings."""
    kernel = ctx.recorder.results.parts.kernel
    rows = kernel.data.timing if kernel and kernel.data and kernel.data.timing else []
    found = {}
    for row in rows:
        key = f"{row.shape} {row.dtype}"
        if key in median_us:
            found[key] = row.copy.median_us / median_us[key]
    return found


# --------------------------------------------------------------------------- gated attention


def sweep_gated_attention(ctx: RunContext) -> Sweep:
    """Every candidate tiling of the fused kernel at the attention shapes the budget allows."""
    from maskattn_deploy.ops import attention as ops

    try:
        from maskattn_deploy.plugins import gated_attention_triton as gat
    except Exception as exc:
        return Sweep("skipped", reason=f"the fused kernel is not importable: {exc}")
    dtype = getattr(torch, ctx.plan.attention_dtype)
    cases = []
    for i, (b, h, n, t, d) in enumerate(ctx.plan.attention_shapes):
        inputs = ops.random_inputs((b, h, n, t, d), dtype=dtype, device=ctx.device,
                                   open_fraction=OPEN_FRACTION, seed=ctx.config.seed + i)  # fmt: skip
        cases.append((f"{[b, h, n, t, d]}", inputs, _reference(inputs)))
    sweep = Sweep("ok", candidates=[], criterion=CRITERION + "; default: per shape, "
                  "gated_attention_triton.resolve_tiling")  # fmt: skip
    assert sweep.candidates is not None
    for tiling in gat.TUNING_CANDIDATES[: ctx.plan.tuning_candidates]:
        reason = _fits(ctx, f"gated-attention tiling {tiling}")
        if reason is not None:
            sweep.status, sweep.reason = "partial", reason
            break
        sweep.candidates.append(_attention_candidate(ctx, gat, tuple(tiling), cases))
        ctx.save()
    good = [c for c in sweep.candidates if c.correct]
    if good:
        best = min(good, key=lambda c: c.geomean_us)
        sweep.chosen = [best.block_n, best.num_warps, best.heads]
    return sweep


def _reference(inputs: Any) -> torch.Tensor:
    from maskattn_deploy.ops.reference import gated_attention_reference

    i = inputs
    q, k, v = (x.double() for x in (i.q, i.k, i.v))
    return gated_attention_reference(q, k, v, i.gate_logits.double(), i.threshold, i.scale)


def _attention_candidate(
    ctx: RunContext, gat: Any, tiling: tuple[int, int, int], cases: list
) -> AttentionTilingCandidate:
    atol = ATTENTION_ATOL[ctx.plan.attention_dtype]
    times, correct = {}, True
    try:
        for key, i, want in cases:

            def call(i: Any = i) -> Any:
                return gat.gated_attention_triton(i.q, i.k, i.v, i.gate_logits, i.threshold,
                                                  i.scale, tiling=tiling)  # fmt: skip

            correct &= float((call().double() - want).abs().max()) <= atol
            stats = ctx.timer.per_call_us([call], ctx.plan.attention_inner, ctx.plan.tuning_samples)
            times[key] = stats.median_us
    except Exception as exc:  # a tiling this Triton cannot compile: record it, go on
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1000:]}"
        return AttentionTilingCandidate(*tiling, False, times, math.inf, error=error)
    row = AttentionTilingCandidate(*tiling, correct, times, _geomean(list(times.values())))
    ctx.echo(f"  attention tiling block_n={tiling[0]:<3} warps={tiling[1]} heads={tiling[2]:<2}: "
             f"geomean {row.geomean_us:.2f} us ({'ok' if correct else 'WRONG'})")  # fmt: skip
    return row


# --------------------------------------------------------------------------- resource report


def _arch(ctx: RunContext) -> int:
    if ctx.plan.resource_arch is not None:
        return ctx.plan.resource_arch
    major, minor = torch.cuda.get_device_capability(ctx.device)
    return 10 * major + minor


def compiler_resources(ctx: RunContext) -> list[KernelResources]:
    """Registers, spills, shared memory of each swept tiling of both kernels (fp16, t = 77,
    d = 64) on this card's architecture."""
    plan = ctx.plan
    args = [str(_arch(ctx)), str(plan.tuning_candidates)]
    if os.environ.get("TRITON_INTERPRET") != "1":
        rows = resource_rows(*args)
    else:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = "import json,sys;from maskattn_deploy.bench.gpu_check.tuning import resource_rows;"
        code += "print(json.dumps(resource_rows(*sys.argv[1:])))"
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-1000:])
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    found = [KernelResources(**row) for row in rows]
    for r in found:
        ctx.echo(f"  resources {r.kernel} {r.tiling} sm_{r.arch}: {r.registers} registers, "
                 f"spills {r.spill_stores}/{r.spill_loads} B, {r.shared_mem} B shared, "
                 f"{r.programs_per_sm} programs/SM")  # fmt: skip
    return found


def resource_rows(arch: str, candidates: str) -> list[dict[str, Any]]:
    """The report as plain rows (also what the child process prints as JSON)."""
    from maskattn_deploy.plugins import gated_attention_triton as gat
    from maskattn_deploy.plugins import kernel_resources as kr
    from maskattn_deploy.plugins import masked_softmax_triton as mst

    n = int(candidates)
    rows = kr.masked_softmax_resources(int(arch), tilings=mst.TUNING_CANDIDATES[:n])
    rows += kr.gated_attention_resources(int(arch), tilings=gat.TUNING_CANDIDATES[:n])
    return [r.as_dict() for r in rows]
