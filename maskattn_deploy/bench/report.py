"""Bench results as a terminal table and as Markdown."""

from __future__ import annotations

from maskattn_deploy.bench.results import BenchResult
from maskattn_deploy.parity.report import fmt, md_table


def _unet_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    for u in result.unet:
        rows.append(
            [
                u.backend,
                u.case,
                u.masked.ms(),
                u.unmasked.ms() if u.unmasked else "-",
                fmt(u.ratio, ".3f") if u.ratio is not None else "-",
                fmt(u.cpu_ratio, ".3f") if u.cpu_ratio is not None else "-",
                str(u.masked.n),
                u.runner,
                u.note,
            ]
        )
    return rows


UNET_HEADER = [
    "backend",
    "case",
    "masked ms median (min-max)",
    "unmasked ms median (min-max)",
    "masked/unmasked",
    "same, CPU time",
    "repeats",
    "runner",
    "note",
]
PIPE_HEADER = ["backend", "case", "steps", "end to end ms median (min-max)", "images/s"]
PIPE_HEADER += ["text enc ms", "UNet step ms", "VAE ms"]


def _pipe_rows(result: BenchResult) -> list[list[str]]:
    return [
        [
            p.backend,
            p.case,
            str(p.steps),
            p.total.ms(),
            f"{p.images_per_s:.3f}",
            f"{p.text_encoders_ms:.1f}",
            f"{p.unet_step_ms:.1f}",
            f"{p.vae_ms:.1f}",
        ]
        for p in result.pipeline
    ]


def _memory_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    for name, peak in result.memory.items():
        d = peak.as_dict()
        rows.append(
            [
                name,
                f"{fmt(d['rss_peak_mib'], 'd')} ({peak.rss_scope})",
                fmt(d["cuda_allocated_peak_mib"], "d"),
                fmt(d["cuda_device_used_mib"], "d"),
            ]
        )
    return rows


def _target_rows(result: BenchResult) -> list[list[str]]:
    return [
        [t.name, f"{t.value:.3f}", f"<= {t.limit:g}", "met" if t.met else "**missed**", t.scope]
        for t in result.targets
    ]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table for the terminal."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def bench_text(result: BenchResult) -> str:
    """The terminal summary (UNet table, pipeline table, targets)."""
    parts = []
    if result.unet:
        parts.append(text_table(UNET_HEADER[:-2], [r[:-2] for r in _unet_rows(result)]))
    if result.pipeline:
        parts.append(text_table(PIPE_HEADER, _pipe_rows(result)))
    if result.targets:
        parts.append(
            text_table(["target", "value", "limit", "status", "scope"], _target_rows(result))
        )
    skipped = [
        f"SKIPPED {k}: {v[len('skipped: ') :]}"
        for k, v in result.backends.items()
        if v.startswith("skipped")
    ]
    return "\n\n".join(parts + ["\n".join(skipped)] if skipped else parts)


def bench_markdown(result: BenchResult, title: str = "Benchmark report", level: int = 1) -> str:
    """The bench report as Markdown (``level`` 2 nests it inside another report)."""
    h = "#" * level
    s = result.settings
    out = [
        f"{h} {title}",
        "",
        f"- machine: {result.machine}",
        f"- model: {s.get('model')} ({s.get('precision')}, {s.get('device')}), gates `{s.get('gates')}`",
        f"- UNet: {s.get('repeats')} timed repeats after {s.get('warmup')} warm-up, masked and "
        "unmasked interleaved (AB, BA, ...); ratio = median of per-pair ratios",
        f"- threads: torch {s.get('torch_threads')}, onnxruntime {s.get('ort_threads') or 'default'}",
        f"- wall time: {result.wall_s:.1f} s",
        "",
        f"{h}# UNet step latency",
        "",
        md_table(UNET_HEADER, _unet_rows(result)) if result.unet else "_none measured_",
        "",
        f"{h}# End-to-end pipeline (CFG, one image per two UNet rows)",
        "",
        md_table(PIPE_HEADER, _pipe_rows(result)) if result.pipeline else "_not measured_",
        "",
        f"{h}# Peak memory (MiB)",
        "",
        "Process RSS peak during each backend's block (`block`: reset before it; `process`: "
        "lifetime peak). The process also holds the other backends' weights loaded before it.",
        "",
        md_table(
            ["backend", "RSS peak", "CUDA allocated peak", "GPU used (driver)"],
            _memory_rows(result),
        )
        if result.memory
        else "_not measured_",
    ]
    if result.targets:
        out += [
            "",
            f"{h}# Targets",
            "",
            md_table(["target", "value", "limit", "status", "scope"], _target_rows(result)),
        ]
    skipped = {k: v for k, v in result.backends.items() if v.startswith("skipped")}
    if skipped:
        out += ["", f"{h}# Skipped backends", ""]
        out += [f"- {k}: {v[len('skipped: ') :]}" for k, v in skipped.items()]
    if result.notes:
        out += ["", f"{h}# Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(out) + "\n"
