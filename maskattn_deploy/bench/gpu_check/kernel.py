"""The ``kernel`` part: the Triton masked softmax against the oracle, and its speed.

The kernel (default tiling) against the reference oracle on every case of docs/design.md
section 3.3 (exact zero pattern, max abs diff within fp32 1e-6 / fp16 2e-3, poisoned output
buffers), then its time at the SDXL shapes next to a device-to-device copy of the same bytes and
the torch reference, and what bounds it (:class:`Boundness`). Its tiling sweep and compiler
resource report come last in the run, in the ``tuning`` part (:mod:`.tuning`).

Bytes, defined once for the kernel and its copy baseline: ``B = bytes(S) + bytes(G) +
bytes(P)``, the least traffic of one masked softmax (each input read once, the output written
once). The baseline copies a ``B/2``-byte buffer (reads ``B/2``, writes ``B/2``), so both move
``B`` bytes; GB/s is ``B / median time`` for both and the fraction of copy bandwidth is
``t_copy / t_kernel``. Input sets rotate so that the data of one timing exceeds the L2 cache.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.plan import TARGET_COPY_FRACTION, Plan
from maskattn_deploy.bench.gpu_check.results import (
    Boundness,
    CallTiming,
    CaseResult,
    CopyCeiling,
    Correctness,
    KernelData,
    KernelTiming,
    Part,
)
from maskattn_deploy.bench.gpu_check.timing import Timer

# Max abs error vs the reference: fp32 only summation order differs; fp16: rounding of P.
ATOL = {"float32": 1e-6, "float16": 2e-3}
POISON = 123.0  # never a probability: any survivor in P is an unwritten element
KERNEL_MODULE = "maskattn_deploy.plugins.masked_softmax_triton"
Shape = tuple[int, int, int, int]
Tiling = tuple[int, int, int]  # (ROWS, num_warps, HEADS)
BLOCK_T_77 = 128  # t = 77 padded: the block every timing shape and the sweep use


def load_kernel(device: torch.device, module_name: str = KERNEL_MODULE) -> tuple[Any, str | None]:
    """``(kernel module, None)`` or ``(None, why it cannot run here)``; imports lazily."""
    from maskattn_deploy._lazy import available, install_hint

    if not available("triton"):
        return None, f"triton is not installed: {install_hint('triton')}"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, (
            "the kernel runs on the CPU only under TRITON_INTERPRET=1 set before triton is "
            "imported (the dry run starts a child process with it)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        return None, f"{module_name} is not importable ({type(exc).__name__}: {exc})"
    if not callable(getattr(module, "masked_softmax_triton", None)):
        return None, f"{module_name} has no masked_softmax_triton(S, G, threshold, out)"
    return module, None


# --------------------------------------------------------------------------- correctness


@dataclass
class KernelCase:
    """One correctness case: fp32 base logits, gate logits, threshold and the poison value."""

    name: str
    S: torch.Tensor  # [b, h, n, t] fp32 (cast per dtype)
    G: torch.Tensor  # [b, 1, n, t] fp32
    threshold: float = 0.0
    poison: float = float("nan")
    gate_like_logits: bool = False  # G in the dtype of S instead of fp32


def kernel_cases(n: int, seed: int) -> list[KernelCase]:
    """Every case of docs/design.md section 3.3. Both plans' ``n`` (333, 5) are odd, so no case's
    token rows per (batch, head) slice are a multiple of the kernel's rows per program (2 to 256)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def gate(b: int, rows: int, t: int) -> torch.Tensor:
        return randn(b, 1, rows, t) * 2.0 - 0.5  # ~40% open, never all zero

    cases = [
        KernelCase(f"random-t{t}", randn(2, 3, n, t) * 3, gate(2, n, t))
        for t in (1, 2, 77, 154, 231)
    ]
    S = randn(2, 3, n, 77) * 4
    one = torch.full((2, 1, n, 77), -3.0)
    one[..., 40] = 2.0
    ties = torch.full((2, 1, n, 77), -2.0)
    ties[..., 9] = ties[..., 30] = -0.5  # equal maxima, all closed: index 9 opens
    ties[:, :, 1] = -1.0  # a row of equal gates: index 0 opens
    near = (torch.rand(2, 3, n, 77, generator=gen) * 2 - 1) * 6.0e4  # fp16 max is 65504
    bad = randn(1, 2, 4, 77)
    bad[0, 0, 1, 5], bad[0, 1, 2, 6] = float("inf"), float("nan")
    bad_gate = torch.full((1, 1, 4, 77), 1.0)
    bad_gate[..., 50:] = -1.0
    cases += [
        KernelCase("all-open", S, torch.rand(2, 1, n, 77, generator=gen) + 0.5),
        KernelCase("all-closed-fallback", S, -torch.rand(2, 1, n, 77, generator=gen) - 0.1),
        KernelCase("one-open-token", S, one),
        KernelCase("ties-in-gate", S, ties),
        KernelCase("threshold-0.3", S, gate(2, n, 77), threshold=0.3),
        KernelCase("near-fp16-range", near, gate(2, n, 77)),
        KernelCase("gate-dtype-of-logits", S, gate(2, n, 77), gate_like_logits=True),
        KernelCase("rows-7", randn(1, 1, 7, 77), gate(1, 7, 77)),
        KernelCase("rows-odd-t154", randn(3, 2, n + 2, 154), gate(3, n + 2, 154)),
        KernelCase("non-finite-logits", bad, bad_gate),
    ]
    return [replace(c, poison=POISON if i % 2 else float("nan")) for i, c in enumerate(cases)]


def check_output(
    got: torch.Tensor, S: torch.Tensor, G: torch.Tensor, threshold: float, wrote_into_out: bool
) -> tuple[dict[str, bool], float]:
    """Compare a kernel output (CPU) with the reference: ``(checks, max abs diff)``."""
    from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask

    want = masked_softmax_reference(S, G, threshold)
    dtype = str(S.dtype).removeprefix("torch.")
    finite_rows = torch.isfinite(S.float()).all(dim=-1, keepdim=True).expand_as(want)
    diff = (got.float() - want.float())[finite_rows].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    closed = ~open_mask(G, threshold).expand_as(want)
    checks = {
        "dtype_shape": got.dtype == S.dtype and got.shape == S.shape,
        "wrote_into_out": wrote_into_out,
        "within_tolerance": max_abs <= ATOL[dtype],
        "zero_pattern": bool(torch.equal(got[finite_rows] == 0, want[finite_rows] == 0)),
        "closed_exactly_zero": bool(torch.all(got[closed] == 0)),
        "nan_pattern": bool(torch.equal(torch.isnan(got), torch.isnan(want))),
        "no_poison_left": not bool(torch.any(got == POISON)),
    }
    return checks, max_abs


def kernel_correctness(
    kernel: Any, device: torch.device, plan: Plan, seed: int, only_t: int | None = None,
    tiling: Tiling | None = None,
) -> Correctness:  # fmt: skip
    """Every case (or those with ``t == only_t``) in fp32 and fp16 against the reference.

    ``tiling`` (ROWS, num_warps, HEADS) is passed to every launch (default: the kernel's own).
    """
    results = []
    for case in kernel_cases(plan.case_tokens, seed):
        if only_t is not None and case.S.shape[-1] != only_t:
            continue
        for dtype in (torch.float32, torch.float16):
            S = case.S.to(dtype)
            G = case.G.to(dtype) if case.gate_like_logits else case.G
            out = torch.full(S.shape, case.poison, dtype=dtype, device=device)
            got = kernel.masked_softmax_triton(
                S.to(device), G.to(device), case.threshold, out=out, tiling=tiling
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wrote = got.data_ptr() == out.data_ptr()
            checks, max_abs = check_output(got.cpu(), S, G, case.threshold, wrote)
            name = str(dtype).removeprefix("torch.")
            results.append(CaseResult(case.name, case.threshold, name, list(S.shape), max_abs,
                                      ATOL[name], checks, all(checks.values())))  # fmt: skip
    failed = [f"{r.case}/{r.dtype}" for r in results if not r.passed]
    worst = {
        d: max((r.max_abs_diff for r in results if r.dtype == d), default=0.0)
        for d in ("float32", "float16")
    }
    return Correctness(not failed, len(results), failed, worst, results)


# --------------------------------------------------------------------------- timing


def _sets_for(set_bytes: int, l2_bytes: int, factor: float) -> int:
    """Input sets to rotate so one timing's data is ``factor`` times the L2 (1..32)."""
    if factor <= 0 or l2_bytes <= 0:
        return 1
    return max(1, min(32, math.ceil(factor * l2_bytes / set_bytes)))


def _rate(stats: CallTiming, nbytes: int) -> CallTiming:
    return replace(stats, gbps=nbytes / (stats.median_us * 1e-6) / 1e9)


def shape_bytes(shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """``(bytes of S, bytes of G)`` for logits of ``shape`` in ``dtype`` and fp32 gates."""
    b, h, n, t = shape
    return b * h * n * t * torch.empty((), dtype=dtype).element_size(), b * n * t * 4


def rotated_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, plan: Plan, l2_bytes: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The input sets a timing at ``shape`` rotates through (enough to exceed the L2)."""
    s_bytes, g_bytes = shape_bytes(shape, dtype)
    sets = _sets_for(2 * s_bytes + g_bytes, l2_bytes, plan.rotate_l2_factor)
    return kernel_inputs(shape, dtype, device, sets)


def kernel_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, sets: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``sets`` independent (S, G, poisoned P) triples: rotating them defeats the L2."""
    b, h, n, t = shape
    data = []
    for _ in range(sets):
        S = (torch.randn(shape, device=device) * 3).to(dtype)
        G = torch.randn((b, 1, n, t), device=device) * 2 - 0.5
        data.append((S, G, torch.full_like(S, POISON)))
    return data


def kernel_calls(kernel: Any, data: list, tiling: Tiling | None = None) -> list:
    """One launch per input set (S, G, P), writing into P; ``tiling`` passed explicitly."""
    return [lambda d=d: kernel.masked_softmax_triton(d[0], d[1], 0.0, out=d[2], tiling=tiling)
            for d in data]  # fmt: skip


def time_kernel_shape(
    kernel: Any, shape: Shape, dtype: str, device: torch.device, plan: Plan, timer: Timer,
    l2_bytes: int,
) -> KernelTiming:  # fmt: skip
    """Kernel vs a copy of the same bytes vs the torch reference at one shape and dtype."""
    from maskattn_deploy.ops.reference import masked_softmax_reference

    torch_dtype = getattr(torch, dtype)
    s_bytes, g_bytes = shape_bytes(shape, torch_dtype)
    nbytes = 2 * s_bytes + g_bytes  # S read + G read + P write
    sets = _sets_for(nbytes, l2_bytes, plan.rotate_l2_factor)
    data = kernel_inputs(shape, torch_dtype, device, sets)
    copies = [
        (torch.randint(1, 255, (nbytes // 2,), dtype=torch.uint8, device=device),
         torch.empty(nbytes // 2, dtype=torch.uint8, device=device))
        for _ in range(sets)
    ]  # fmt: skip
    inner, samples = plan.kernel_inner, plan.kernel_samples
    k = timer.per_call_us(kernel_calls(kernel, data), inner, samples)
    c = timer.per_call_us([lambda p=p: p[1].copy_(p[0]) for p in copies], inner, samples)
    r = timer.per_call_us(
        [lambda d=d: masked_softmax_reference(d[0], d[1], 0.0) for d in data], inner, samples
    )
    return KernelTiming(
        shape=list(shape), dtype=dtype, gate_dtype="float32", bytes=nbytes,
        bytes_detail={"S": s_bytes, "G": g_bytes, "P": s_bytes}, input_sets=sets,
        kernel=_rate(k, nbytes), copy=_rate(c, nbytes), reference=_rate(r, nbytes),
        fraction_of_copy=c.median_us / k.median_us,
        fraction_of_copy_best=c.min_us / k.min_us,
        speedup_vs_reference=r.median_us / k.median_us,
        meets_target=c.median_us / k.median_us >= TARGET_COPY_FRACTION,
    )  # fmt: skip


def copy_ceiling(device: torch.device, plan: Plan, timer: Timer) -> CopyCeiling:
    """The card's device-to-device copy rate on a large buffer (read + write bytes)."""
    half = plan.peak_copy_bytes // 2
    src = torch.randint(1, 255, (half,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stats = timer.per_call_us([lambda: dst.copy_(src)], 3, max(3, plan.kernel_samples // 5))
    return CopyCeiling(2 * half, _rate(stats, 2 * half))


# --------------------------------------------------------------------------- the part


def kernel_part(part: Part[KernelData], ctx: RunContext) -> None:
    if ctx.kernel is None:
        part.status, part.reason = "skipped", ctx.kernel_missing
        return
    default = getattr(ctx.kernel, "launch_config", None)
    data = part.data = KernelData(
        ctx.kernel.__name__, list(default(BLOCK_T_77)) if default else None
    )
    data.correctness = kernel_correctness(ctx.kernel, ctx.device, ctx.plan, ctx.config.seed)
    ctx.save()
    l2 = ctx.l2_bytes()
    data.copy_ceiling = copy_ceiling(ctx.device, ctx.plan, ctx.timer)
    ceiling_gbps = data.copy_ceiling.timing.gbps or 0.0
    data.timing = []
    for shape in ctx.plan.timing_shapes:
        for dtype in ctx.plan.timing_dtypes:
            row = time_kernel_shape(ctx.kernel, shape, dtype, ctx.device, ctx.plan, ctx.timer, l2)
            row.floor_us = row.bytes / (ceiling_gbps * 1e9) * 1e6
            data.timing.append(row)
            ctx.echo(kernel_line(row))
            ctx.save()
    data.boundness = boundness(data.timing)
    if not data.correctness.all_pass:
        part.status, part.error = "failed", f"kernel mismatches: {data.correctness.failed}"


def kernel_line(row: KernelTiming) -> str:
    return (
        f"  kernel {row.shape} {row.dtype}: {row.kernel.median_us:.2f} us "
        f"({row.kernel.gbps:.0f} GB/s), copy {row.copy.median_us:.2f} us "
        f"({row.copy.gbps:.0f} GB/s), reference {row.reference.median_us:.2f} us; "
        f"{100 * row.fraction_of_copy:.0f}% of copy"
    )


def boundness(rows: list[KernelTiming]) -> list[Boundness]:
    """Per shape timed in both fp16 and fp32: bytes-bound or rows/latency-bound.

    fp32 moves ``bytes_ratio`` (about 1.9) times the bytes of fp16; a kernel bound by bytes
    takes about that much longer, one bound by per-row work or latency about as long. The
    verdict uses the midpoint between 1 and ``bytes_ratio``.
    """
    by_shape: dict[str, dict[str, KernelTiming]] = {}
    for row in rows:
        by_shape.setdefault(str(row.shape), {})[row.dtype] = row
    found = []
    for pair in by_shape.values():
        if "float16" in pair and "float32" in pair:
            half, full = pair["float16"], pair["float32"]
            time_ratio = full.kernel.median_us / half.kernel.median_us
            bytes_ratio = full.bytes / half.bytes
            bound = "bytes" if time_ratio >= (1 + bytes_ratio) / 2 else "rows/latency"
            found.append(Boundness(half.shape, time_ratio, bytes_ratio, bound))
    return found
