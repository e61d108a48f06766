"""The verdict: each target met or missed, from what the parts measured.

A target's ``met`` is None on the dry run (CPU timings say nothing about a GPU) and where it
was not measured; ``detail`` says what was compared, so a missed target reads on its own.
"""

from __future__ import annotations

from maskattn_deploy.bench.gpu_check.attention import IMPLS, all_correct
from maskattn_deploy.bench.gpu_check.plan import (
    TARGET_ATTENTION_RATIO,
    TARGET_COPY_FRACTION,
    TARGET_GATE_FLIPS,
    TARGET_UNET_RATIO,
)
from maskattn_deploy.bench.gpu_check.results import (
    AttentionData,
    CheckResults,
    GateHeadData,
    KernelData,
    TargetResult,
    TuningData,
    UNetData,
    Verdict,
)
from maskattn_deploy.bench.gpu_check.variants import TARGET_IMPLS, TARGET_PATHS

DRY_RUN_NOTE = "dry run: CPU timings say nothing about a GPU; targets are judged on a GPU only"
PATH_NAMES = {"graph": "CUDA graph", "compile": "torch.compile (default)",
              "compile_ro": "torch.compile (reduce-overhead)"}  # fmt: skip


def verdict(results: CheckResults) -> Verdict:
    """Targets met or missed, kernels correct, failed parts and variants, overall ok."""
    p = results.parts
    kernel = p.kernel.data if p.kernel else None
    attention = p.attention.data if p.attention else None
    unet = p.unet.data if p.unet else None
    real = not results.dry_run

    def judged(limit: float, measured: float | None, detail: str, at_most: bool) -> TargetResult:
        met = None
        if real and measured is not None:
            met = measured <= limit if at_most else measured >= limit
        return TargetResult(limit, measured, met, detail)

    targets = {"kernel_copy_fraction": judged(TARGET_COPY_FRACTION, *_kernel(
        kernel, p.tuning.data if p.tuning else None), at_most=False)}  # fmt: skip
    for path in TARGET_PATHS:
        targets[f"unet_{path}"] = judged(TARGET_UNET_RATIO, *_unet(unet, path), at_most=True)
    for impl in IMPLS:
        targets[f"attention_{impl}"] = judged(
            TARGET_ATTENTION_RATIO, *_attention(attention, impl), at_most=True
        )
    flips = _flips(p.gate_head.data if p.gate_head else None)
    targets["gate_head_flips"] = judged(TARGET_GATE_FLIPS, *flips, at_most=True)
    correct = kernel.correctness.all_pass if kernel and kernel.correctness else None
    attention_ok = all_correct(attention)
    failed = _failed(results)
    return Verdict(
        targets=targets, kernel_correct=correct, attention_correct=attention_ok, failed=failed,
        ok=not failed and correct is not False and attention_ok is not False,
        note="" if real else DRY_RUN_NOTE,
    )  # fmt: skip


def _failed(results: CheckResults) -> list[str]:
    p = results.parts
    failed = [name for name, part in p.items() if part.status == "failed"]
    if p.unet and p.unet.data:
        failed += [f"unet.{n}" for n, v in p.unet.data.variants.items() if v.status == "failed"]
    if p.attention and p.attention.data:
        failed += [f"attention.{s.shape}.{impl}" for s in p.attention.data.shapes
                   for impl, r in s.impls.items() if r.status == "failed"]  # fmt: skip
    return failed


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _kernel(kernel: KernelData | None, tuning: TuningData | None) -> tuple[float | None, str]:
    """The best of the default tiling and the sweep's winner, with what bounds the kernel."""
    if kernel is None or not kernel.timing:
        return None, "not measured"
    default = min(r.fraction_of_copy for r in kernel.timing)
    parts = [f"default tiling {kernel.tiling}: {_pct(default)} of copy (slowest shape)"]
    best = default
    sweep = tuning.masked_softmax if tuning else None
    if sweep and sweep.chosen and sweep.chosen_fraction_of_copy:
        swept = min(sweep.chosen_fraction_of_copy.values())
        best = max(best, swept)
        parts.append(f"fastest swept tiling {sweep.chosen}: {_pct(swept)}")
        label = "rows={} warps={} heads={}".format(*sweep.chosen)
        for r in (tuning.resources or []) if tuning else []:
            if r.kernel == "masked_softmax" and r.tiling == label:
                parts.append(f"its sm_{r.arch} resources: {r.registers} registers, spills "
                             f"{r.spill_stores}/{r.spill_loads} B, {r.programs_per_sm} "
                             "programs/SM")  # fmt: skip
    for b in kernel.boundness or []:
        parts.append(f"{b.bound}-bound at {b.shape} (fp32 takes {b.dtype_time_ratio:.2f}x the "
                     f"fp16 time for {b.bytes_ratio:.2f}x the bytes)")  # fmt: skip
    return best, "; ".join(parts)


def _ratio_of(unet: UNetData, name: str) -> tuple[float, str] | None:
    r = unet.ratios.get(name)
    if r is None:
        return None
    if r.ratio_paired is not None:
        return r.ratio_paired, "interleaved"
    return r.ratio_median, "medians"


def _unet(unet: UNetData | None, path: str) -> tuple[float | None, str]:
    """The best of the fused-op implementations on ``path``; every masked path for context."""
    if unet is None:
        return None, "not measured"
    found = {impl: _ratio_of(unet, f"{path}_{impl}") for impl in TARGET_IMPLS}
    measured = [(v[0], impl) for impl, v in found.items() if v]
    others = [(n.removeprefix(f"{path}_"), _ratio_of(unet, n)) for n in unet.ratios
              if n.startswith(f"{path}_") and n.removeprefix(f"{path}_") not in TARGET_IMPLS
              and not (path == "compile" and n.startswith("compile_ro_"))]  # fmt: skip
    text = ", ".join(f"{impl} {v[0]:.3f} ({v[1]})" for impl, v in [*found.items(), *others] if v)
    if not measured:
        return None, f"{PATH_NAMES[path]}: not measured" + (f" ({text})" if text else "")
    best, impl = min(measured)
    return best, f"{PATH_NAMES[path]}, best {impl}: {text}"


def _attention(data: AttentionData | None, impl: str) -> tuple[float | None, str]:
    """The slowest shape's time relative to SDPA (every shape must be within the limit)."""
    rows = [(s.shape, s.impls.get(impl)) for s in (data.shapes if data else [])]
    ratios = [(r.ratio_vs_sdpa, shape) for shape, r in rows if r and r.ratio_vs_sdpa is not None]
    if not ratios:
        return None, "not measured"
    text = ", ".join(f"{shape}: {ratio:.2f}x" for ratio, shape in ratios)
    return max(ratios)[0], f"{impl} / SDPA per shape [b, h, n, t, d]: {text}"


def _flips(data: GateHeadData | None) -> tuple[float | None, str]:
    if data is None or data.flips is None:
        return None, "not measured"
    f = data.flips
    return f.flips, (
        f"{f.dtype} UNet, activation-dtype latent MLP vs the fp32 head: {f.flips} of "
        f"{f.entries} gate entries flipped ({f.tolerated} of them within parity's margin "
        f"|g - threshold| <= {f.margin:g}); the fp32 head stays the default unless this is 0"
    )
