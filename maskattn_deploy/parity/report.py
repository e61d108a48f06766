"""Markdown reports: the parity verdict table (and the helpers the bench report shares).

The report is meant to be attached to a release: what was compared with what, on which
machine, every output's numbers next to its tolerance, gate agreement per layer, the first
layer that left tolerance, and the images' PSNR. Skipped backends are listed with the reason.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from typing import Any

from maskattn_deploy.parity.results import ParityResult
from maskattn_deploy.parity.tolerances import table_rows

VERDICT_HEADING = "Parity verdicts"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells are str()-ed; pipes escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def machine_line() -> str:
    """One line naming the machine (CPU, cores, OS, Python, torch, ONNX Runtime)."""
    import os

    import torch

    parts = [
        _cpu_name(),
        f"{os.cpu_count()} CPU cores",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _status(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def parity_markdown(result: ParityResult, title: str = "Parity report") -> str:
    """The whole parity report as Markdown."""
    out = [f"# {title}", ""]
    out += [
        f"**Result: {'PASS' if result.passed else 'FAIL'}** - {result.summary()}",
        "",
        f"- export: `{result.export_dir}` ({result.precision})",
        f"- reference: {result.reference}",
        f"- shape cases (batch x height x width): {', '.join(result.cases)}",
        f"- machine: {machine_line()}",
        f"- wall time: {result.wall_s:.1f} s",
        "",
        "## Backends",
        "",
        md_table(
            ["backend", "status", "details"],
            [
                [
                    b.name,
                    b.status.upper(),
                    b.reason or ", ".join(f"{k}: {v}" for k, v in b.detail.items()),
                ]
                for b in result.backends
            ],
        ),
        "",
        f"## {VERDICT_HEADING}",
        "",
    ]
    out.append(_outputs_table(result) if result.outputs else "_no output was compared_")
    out += ["", "## Gate agreement", ""]
    out.append(_gates_section(result))
    out += ["", "## Localisation (first layer beyond tolerance)", ""]
    out.append(_localisation_section(result))
    out += ["", "## End-to-end images", ""]
    out.append(_images_section(result))
    if result.errors:
        out += ["", "## Errors", ""] + [f"- {e}" for e in result.errors]
    out += ["", "## Tolerances", "", _tolerance_table(), ""]
    return "\n".join(out)


def _outputs_table(result: ParityResult) -> str:
    rows = [
        [
            v.name,
            v.backend,
            v.label,
            _status(v.passed),
            fmt(v.max_abs),
            fmt(v.mean_abs),
            fmt(v.rel_l2),
            fmt(v.cosine, ".6f"),
            v.tolerance.describe(),
            "; ".join(v.failures),
        ]
        for v in result.outputs
    ]
    header = ["output", "backend", "case", "verdict", "max abs", "mean abs", "rel L2", "cosine"]
    return md_table(header + ["tolerance", "why"], rows)


def _gates_section(result: ParityResult) -> str:
    if not result.gates:
        return f"_{result.gates_note or 'not checked'}_"
    rows = [
        [
            g.layer,
            g.backend,
            _status(g.passed),
            f"{g.flips}/{g.entries}",
            f"{g.flip_fraction:.3%}",
            g.tolerated,
            g.bad,
            f"{g.open_fraction:.1%}",
            "; ".join(str(f) for f in g.where[:2]),
        ]
        for g in result.gates
    ]
    margin = result.gates[0].margin
    note = (
        f"A flip is tolerated only where the reference gate logit is within {margin:g} of the "
        "threshold (or ties for the argmax fallback of an all-closed row)."
    )
    header = ["layer", "backend", "verdict", "flips", "fraction", "tolerated", "intolerable"]
    return note + "\n\n" + md_table(header + ["reference open", "where (first)"], rows)


def _localisation_section(result: ParityResult) -> str:
    lines = []
    for loc in result.localisation:
        if loc.note:
            lines.append(f"- {loc.backend}: _{loc.note}_")
            continue
        first = loc.first_bad_layer
        lines.append(
            f"- {loc.backend} ({loc.label}): "
            + (
                f"first layer beyond tolerance: **`{first}`**"
                if first
                else "every gated layer within tolerance"
            )
        )
        if first:
            rows = [
                [v.output, _status(v.passed), fmt(v.max_abs), fmt(v.rel_l2), fmt(v.cosine, ".6f")]
                for v in loc.layers
            ]
            lines += [
                "",
                md_table(
                    ["layer (execution order)", "verdict", "max abs", "rel L2", "cosine"], rows
                ),
                "",
            ]
    return "\n".join(lines) or "_not checked_"


def _images_section(result: ParityResult) -> str:
    if not result.images:
        return f"_{result.images_note or 'no end-to-end run'}_"
    rows = [
        [
            v.backend,
            _status(v.passed),
            "inf" if math.isinf(v.psnr_db) else f"{v.psnr_db:.1f}",
            v.max_pixel_diff,
            fmt(v.mean_pixel_diff),
            v.tolerance.describe(),
        ]
        for v in result.images
    ]
    settings = result.settings
    head = (
        f"Prompt `{settings.get('prompt')}`, seed {settings.get('seed')}, "
        f"{settings.get('steps')} steps, same on every backend."
    )
    return (
        head
        + "\n\n"
        + md_table(
            ["backend", "verdict", "PSNR dB", "max pixel diff", "mean pixel diff", "tolerance"],
            rows,
        )
    )


def _tolerance_table() -> str:
    rows = []
    for row in table_rows():
        if row["component"] == "gates":
            bounds = f"margin {row['margin']:g}"
        elif row["component"] == "image":
            pixel = row.get("max_pixel_diff")
            bounds = f"PSNR>={row['min_psnr_db']:g} dB" + (
                f", max diff<={pixel}" if pixel is not None else ""
            )
        else:
            bounds = (
                f"atol {row['atol']:g}, rtol {row['rtol']:g}, rel L2<={row['max_rel_l2']:g}, "
                f"cos>={row['min_cosine']:g}"
            )
        rows.append([row["component"], row["precision"], bounds, row["reason"]])
    return md_table(["component", "precision", "bounds", "reason"], rows)
