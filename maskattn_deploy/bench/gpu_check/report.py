"""The verdict on the targets, ``results.md`` (the human-readable twin of results.json) and the
short summary printed last (a lent machine's reply carries only the tail of the output)."""

from __future__ import annotations

import json
from typing import Any

from maskattn_deploy.bench.gpu_check.kernel import ATOL, kernel_line
from maskattn_deploy.bench.gpu_check.plan import PARTS, TARGET_COPY_FRACTION, TARGET_UNET_RATIO
from maskattn_deploy.bench.gpu_check.results import (
    CheckResults,
    Environment,
    KernelData,
    Profile,
    UNetData,
    Verdict,
    to_json,
)

# --------------------------------------------------------------------------- verdict


def verdict(results: CheckResults) -> Verdict:
    """Targets met or missed (None where not measured or on the dry run) and failed parts."""
    parts = results.parts
    kernel = parts.kernel.data if parts.kernel else None
    unet = parts.unet.data if parts.unet else None
    correctness = kernel.correctness.all_pass if kernel and kernel.correctness else None
    fractions = [row.fraction_of_copy for row in (kernel.timing or [])] if kernel else []
    ratios = {path: _kernel_ratio(unet, path) for path in ("eager", "graph", "compile")}
    # Judged on the path a deployment runs: compiled, else CUDA graph, else eager.
    target_path = next((p for p in ("compile", "graph", "eager") if ratios[p]), None)
    ratio = ratios[target_path] if target_path else None
    real = not results.dry_run
    failed = [name for name, p in parts.items() if p.status == "failed"]
    if unet:
        failed += [f"unet.{n}" for n, v in unet.variants.items() if v.status == "failed"]
    return Verdict(
        kernel_correct=correctness,
        kernel_min_copy_fraction=min(fractions) if fractions else None,
        kernel_meets_target=(min(fractions) >= TARGET_COPY_FRACTION) if real and fractions else None,
        unet_ratio_eager_kernel=ratios["eager"],
        unet_ratio_graph_kernel=ratios["graph"],
        unet_ratio_compile_kernel=ratios["compile"],
        unet_target_path=target_path,
        unet_meets_target=(ratio <= TARGET_UNET_RATIO) if real and ratio else None,
        failed=failed,
        ok=not failed and correctness is not False,
        note="dry run: CPU timings say nothing about a GPU; targets are judged on a GPU only"
        if not real else "",
    )  # fmt: skip


def _kernel_ratio(unet: UNetData | None, path: str) -> float | None:
    """masked/unmasked of the kernel path: from interleaved pairs where they ran."""
    r = unet.ratios.get(f"{path}_kernel") if unet else None
    return (r.ratio_paired or r.ratio_median) if r else None


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _env_md(env: Environment | None) -> list[str]:
    if env is None:
        return ["- device: unknown (the environment part did not finish)"]
    v = env.versions
    versions = (
        f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, diffusers "
        f"{v.get('diffusers')}, python {env.python}, maskattn-deploy {v.get('maskattn_deploy')}"
    )
    if env.cuda is None:
        return [f"- device: CPU ({env.cpu_count} cores, {env.platform})", versions]
    c = env.cuda
    return [
        f"- card: {c.gpu}, compute capability {c.compute_capability}, {c.sm_count} SMs, "
        f"{_fmt(c.memory_bytes / 2**30 if c.memory_bytes else None, '.1f')} GiB, driver "
        f"{c.driver}, CUDA {env.torch_cuda_build}",
        versions,
    ]


def _kernel_md(kernel: KernelData) -> list[str]:
    corr = kernel.correctness
    lines = []
    if corr:
        worst = corr.worst_max_abs_diff
        lines.append(
            f"Correctness: {corr.n_cases - len(corr.failed)}/{corr.n_cases} cases pass "
            f"(worst max abs diff fp32 {worst['float32']:.2e} <= {ATOL['float32']:.0e}, "
            f"fp16 {worst['float16']:.2e} <= {ATOL['float16']:.0e})"
            + (f"; failed: {', '.join(corr.failed)}" if corr.failed else "")
        )
    lines += _tuning_md(kernel)
    if kernel.copy_ceiling:
        ceiling = kernel.copy_ceiling
        lines.append(f"Copy ceiling: {ceiling.timing.gbps:.0f} GB/s "
                     f"({ceiling.bytes / 1e6:.0f} MB, read + write)")  # fmt: skip
    if kernel.timing:
        lines += ["", "| shape | dtype | MB moved | kernel us (median/min) | kernel GB/s | copy us | "
                  "copy GB/s | % of copy | reference us | vs reference | floor us |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in kernel.timing:
            lines.append(
                f"| {r.shape} | {r.dtype} | {r.bytes / 1e6:.2f} | "
                f"{r.kernel.median_us:.2f} / {r.kernel.min_us:.2f} | "
                f"{r.kernel.gbps:.0f} | {r.copy.median_us:.2f} | {r.copy.gbps:.0f} | "
                f"{100 * r.fraction_of_copy:.0f}% | {r.reference.median_us:.2f} | "
                f"{r.speedup_vs_reference:.1f}x | {_fmt(r.floor_us)} |"
            )
    return lines


def _tuning_md(kernel: KernelData) -> list[str]:
    tuning = kernel.tuning
    if not tuning or not tuning.candidates:
        return []
    keys = list(tuning.candidates[0].median_us)
    lines = ["", f"Tiling (ROWS, num_warps, HEADS) at t = 77, median us per call; default "
             f"{tuning.default}, chosen {tuning.chosen} ({tuning.criterion}):",
             "", "| rows | warps | heads | correct | " + " | ".join(keys) + " | geomean |",
             "| ---: | ---: | ---: | --- |" + " ---: |" * (len(keys) + 1)]  # fmt: skip
    for c in tuning.candidates:
        cells = " | ".join(f"{c.median_us[k]:.2f}" for k in keys)
        lines.append(f"| {c.rows} | {c.num_warps} | {c.heads} | {c.correct} | {cells} | "
                     f"{c.geomean_us:.2f} |")  # fmt: skip
    return [*lines, ""]


def _unet_md(unet: UNetData) -> list[str]:
    inputs = unet.inputs
    lines = [
        f"Model {unet.model} ({_fmt(unet.parameters / 1e9, '.3f')} B parameters, "
        f"{unet.dtype}), {unet.gated_layers} gated layers (stage mid), inputs "
        f"{inputs}, built in {_fmt(unet.build_s, '.1f')} s; kernel path: "
        f"{_fmt(unet.kernel_path)}; compile backend {unet.compile_backend}",
        "",
        "| variant | status | median ms | min ms | samples | first call s | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in unet.variants.items():
        t = v.timing
        mem = t.peak_memory_bytes if t else None
        lines.append(
            f"| {name} | {v.status}{': ' + v.reason if v.reason else ''} | "
            f"{_fmt(t and t.median_ms)} | {_fmt(t and t.min_ms)} | {_fmt(t and t.samples, 'd')} | "
            f"{_fmt(t and t.first_call_s, '.1f')} | {_fmt(mem / 2**30 if mem else None)} |"
        )
    if unet.ratios:
        lines += ["", "| path | masked / unmasked (median) | (min) | (interleaved pairs) |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for name, r in unet.ratios.items():
            paired = _fmt(r.ratio_paired, ".3f")
            lines.append(f"| {name} | {r.ratio_median:.3f} | {r.ratio_min:.3f} | {paired} |")
    lines += _profile_md(unet.profile)
    if unet.agreement:
        lines.append("")
    for name, a in (unet.agreement or {}).items():
        lines.append(f"- {name}: rel L2 {a.rel_l2:.2e}, max abs {a.max_abs_diff:.2e}")
    return lines


def _profile_md(profile: Profile | None) -> list[str]:
    if not profile:
        return []
    if profile.status != "ok":
        return ["", f"Profile: {profile.status} ({profile.reason or profile.error})"]
    lines = []
    for name, p in (profile.variants or {}).items():
        lines += ["", f"Profile of one `{name}` step: {p.total_ms:.2f} ms of {p.clock} time "
                  f"in {p.calls} calls; top {len(p.kernels)} by self time:", "",
                  "| kernel / op | calls | self ms |", "| --- | ---: | ---: |"]  # fmt: skip
        for r in p.kernels:
            name_cell = r.name.replace("|", "\\|")
            lines.append(f"| `{name_cell}` | {r.calls} | {r.self_us / 1e3:.3f} |")
    return lines


def render_markdown(results: CheckResults) -> str:
    """The human-readable twin of results.json."""
    parts = results.parts
    title = "dry run (CPU)" if results.dry_run else "GPU run"
    lines = [f"# MaskAttn GPU check: {title}, {results.created_utc}", ""]
    lines += _env_md(parts.environment.data if parts.environment else None)
    lines += ["", "| part | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name in PARTS:
        p = getattr(parts, name)
        if p is None:
            lines.append(f"| {name} | not reached | - |  |")
            continue
        lines.append(f"| {name} | {p.status} | {_fmt(p.elapsed_s, '.1f')} | {p.note} |")
    if parts.kernel and parts.kernel.data and parts.kernel.status in ("ok", "failed"):
        lines += ["", "## Kernel", ""] + _kernel_md(parts.kernel.data)
    if parts.unet and parts.unet.data and parts.unet.data.variants:
        lines += ["", "## UNet step (CFG batch 2)", ""] + _unet_md(parts.unet.data)
    if results.verdict is not None:
        lines += ["", "## Verdict", "", "```", json.dumps(to_json(results.verdict), indent=2),
                  "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_text(results: CheckResults) -> str:
    """A short table printed last (a lent machine's reply carries only the tail)."""
    lines = ["", "== summary =="]
    for name in PARTS:
        p = getattr(results.parts, name)
        status = p.status if p else "-"
        lines.append(f"{name:<12} {status:<8} {_fmt(p.elapsed_s if p else None, '.1f'):>7} s")
    kernel = results.parts.kernel.data if results.parts.kernel else None
    for row in (kernel.timing or []) if kernel else []:
        lines.append(kernel_line(row).strip())
    unet = results.parts.unet.data if results.parts.unet else None
    for name, r in (unet.ratios if unet else {}).items():
        lines.append(
            f"unet ratio {name}: {r.ratio_median:.3f} (min {r.ratio_min:.3f}, "
            f"interleaved {_fmt(r.ratio_paired, '.3f')})"
        )
    verdict_json = to_json(results.verdict) if results.verdict is not None else {}
    lines.append("verdict: " + json.dumps(verdict_json, sort_keys=True))
    return "\n".join(lines)
