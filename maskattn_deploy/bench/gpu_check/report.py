"""``results.md`` (the human-readable twin of results.json) and the short summary printed last
(a lent machine's reply carries only the tail of the output)."""

from __future__ import annotations

from typing import Any

from maskattn_deploy.bench.gpu_check.kernel import ATOL, kernel_line
from maskattn_deploy.bench.gpu_check.plan import PARTS
from maskattn_deploy.bench.gpu_check.results import (
    AttentionData,
    CheckResults,
    Environment,
    GateHeadData,
    KernelData,
    Profile,
    Sweep,
    TuningData,
    UNetData,
    Verdict,
)

# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
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
    lines += ["", f"Tiling {kernel.tiling} (the kernel's default; the sweep is in Tuning)"]
    if kernel.copy_ceiling:
        ceiling = kernel.copy_ceiling
        lines.append("")
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
    for b in kernel.boundness or []:
        lines.append(f"\n{b.shape}: fp32 takes {b.dtype_time_ratio:.2f}x the fp16 time for "
                     f"{b.bytes_ratio:.2f}x the bytes: {b.bound}-bound")  # fmt: skip
    return lines


def _sweep_md(title: str, sweep: Sweep | None, keys_of: str) -> list[str]:
    if not sweep:
        return []
    head = f"{title}: {sweep.status}" + (f" ({sweep.reason})" if sweep.reason else "")
    if not sweep.candidates:
        return ["", head]
    keys = list(sweep.candidates[0].median_us) or ["-"]
    lines = ["", f"{head}; default {_fmt(sweep.default)}, chosen {_fmt(sweep.chosen)} "
             f"({sweep.criterion}); median us per call:", "",
             f"| {keys_of} | warps | heads | correct | " + " | ".join(keys) + " | geomean |",
             "| ---: | ---: | ---: | --- |" + " ---: |" * (len(keys) + 1)]  # fmt: skip
    for c in sweep.candidates:
        first = getattr(c, "rows", getattr(c, "block_n", None))
        cells = " | ".join(_fmt(c.median_us.get(k)) for k in keys)
        lines.append(f"| {first} | {c.num_warps} | {c.heads} | {c.correct} | {cells} | "
                     f"{_fmt(c.geomean_us)} |")  # fmt: skip
    if sweep.chosen_fraction_of_copy:
        fractions = ", ".join(
            f"{k}: {100 * v:.0f} %" for k, v in sweep.chosen_fraction_of_copy.items()
        )
        lines += ["", f"Chosen tiling's fraction of copy bandwidth: {fractions}"]
    return lines


def _tuning_md(tuning: TuningData) -> list[str]:
    lines = _sweep_md("Masked softmax, (ROWS, num_warps, HEADS) at t = 77", tuning.masked_softmax,
                      "rows")  # fmt: skip
    lines += _sweep_md("Fused gated attention, (BLOCK_N, num_warps, HEADS; 0 = all)",
                       tuning.gated_attention, "block_n")  # fmt: skip
    if tuning.resources_error:
        lines += ["", f"Compiler resource report failed: {tuning.resources_error}"]
    if tuning.resources:
        lines += ["", "Compiler resource report (fp16, t = 77, d = 64):", "",
                  "| kernel | tiling | sm | registers | spills st/ld B | shared B | programs/SM |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in tuning.resources:
            lines.append(f"| {r.kernel} | {r.tiling} | {r.arch} | {r.registers} | "
                         f"{r.spill_stores}/{r.spill_loads} | {r.shared_mem} | "
                         f"{r.programs_per_sm} |")  # fmt: skip
    return lines


def _attention_md(data: AttentionData) -> list[str]:
    lines = ["| shape [b, h, n, t, d] | dtype | open | impl | status | median us | vs SDPA | "
             "max abs diff | first call s |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for s in data.shapes:
        for impl, r in s.impls.items():
            status = r.status + (f": {r.error.splitlines()[0]}" if r.error else "")
            median = r.timing.median_us if r.timing else None
            lines.append(f"| {s.shape} | {s.dtype} | {s.open_fraction:.2f} | {impl} | {status} | "
                         f"{_fmt(median)} | {_fmt(r.ratio_vs_sdpa)} | {_fmt(r.max_abs_diff, '.1e')} | "
                         f"{_fmt(r.first_call_s, '.1f')} |")  # fmt: skip
    return lines


def _gate_head_md(data: GateHeadData) -> list[str]:
    f = data.flips
    head = f"Model {data.model}, {data.layers} gated layers, {data.heads} gate head(s)"
    if f is None:
        return [head]
    return [head, "", f"Activation-dtype latent MLP vs the fp32 head on a {f.dtype} UNet: "
            f"{f.flips} of {f.entries} gate entries flipped, {f.tolerated} within parity's "
            f"margin {f.margin:g}; {f.near_threshold} reference gates that near the threshold; "
            f"largest flipped |g - threshold| {f.max_flip_distance:.3g}"]  # fmt: skip


def _verdict_md(v: Verdict) -> list[str]:
    lines = ["| target | limit | measured | met | detail |", "| --- | ---: | ---: | --- | --- |"]
    for name, t in v.targets.items():
        lines.append(f"| {name} | {t.limit:g} | {_fmt(t.measured, '.3f')} | {_fmt(t.met)} | "
                     f"{t.detail.replace('|', '/')} |")  # fmt: skip
    lines += ["", f"kernel correct: {_fmt(v.kernel_correct)}; attention correct: "
              f"{_fmt(v.attention_correct)}; failed: {', '.join(v.failed) or 'none'}; "
              f"ok: {v.ok}" + (f"; {v.note}" if v.note else "")]  # fmt: skip
    return lines


def _unet_md(unet: UNetData) -> list[str]:
    inputs = unet.inputs
    lines = [
        f"Model {unet.model} ({_fmt(unet.parameters / 1e9, '.3f')} B parameters, "
        f"{unet.dtype}), {unet.gated_layers} gated layers (stage mid), inputs "
        f"{inputs}, built in {_fmt(unet.build_s, '.1f')} s; kernel path: "
        f"{_fmt(unet.kernel_path)}; compile backend {unet.compile_backend}",
        "",
        "| variant | status | median ms | min ms | samples | first call s | peak GiB | compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, v in unet.variants.items():
        t = v.timing
        mem = t.peak_memory_bytes if t else None
        lines.append(
            f"| {name} | {v.status}{': ' + v.reason if v.reason else ''} | "
            f"{_fmt(t and t.median_ms)} | {_fmt(t and t.min_ms)} | {_fmt(t and t.samples, 'd')} | "
            f"{_fmt(t and t.first_call_s, '.1f')} | {_fmt(mem / 2**30 if mem else None)} | "
            f"{_fmt(t and t.compiled_with)} |"
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
    if results.verdict is not None:
        lines += ["", "## Verdict", ""] + _verdict_md(results.verdict)
    sections = (
        ("kernel", "Masked-softmax kernel", _kernel_md),
        ("attention", "Fused gated attention vs SDPA", _attention_md),
        ("gate_head", "Gate head precision", _gate_head_md),
        ("unet", "UNet step (CFG batch 2)", _unet_md),
        ("tuning", "Tuning", _tuning_md),
    )
    for name, title, render in sections:
        part = getattr(parts, name)
        if part is not None and part.data is not None:
            body = render(part.data)
            while body and body[0] == "":
                body = body[1:]
            lines += ["", f"## {title}", "", *body]
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
    attention = results.parts.attention.data if results.parts.attention else None
    for s in attention.shapes if attention else []:
        for impl, r in s.impls.items():
            if impl != "sdpa":
                lines.append(f"attention {s.shape} {impl}: {r.status}, "
                             f"{_fmt(r.ratio_vs_sdpa)}x SDPA")  # fmt: skip
    unet = results.parts.unet.data if results.parts.unet else None
    for name, r in (unet.ratios if unet else {}).items():
        lines.append(
            f"unet ratio {name}: {r.ratio_median:.3f} (min {r.ratio_min:.3f}, "
            f"interleaved {_fmt(r.ratio_paired, '.3f')})"
        )
    v = results.verdict
    for name, t in (v.targets if v else {}).items():
        lines.append(f"target {name}: {_fmt(t.measured, '.3f')} vs {t.limit:g}, met {_fmt(t.met)}")
    if v:
        lines.append(f"ok {v.ok}; failed: {', '.join(v.failed) or 'none'}")
    return "\n".join(lines)
