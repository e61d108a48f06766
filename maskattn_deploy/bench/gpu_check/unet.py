"""The ``unet`` part: one CFG step of the SDXL UNet, masked against unmasked, on every path.

Each :class:`~.results.Variant` (:mod:`.variants`) is built once (compiled, or captured as a CUDA
graph), warmed up and timed; its first call is timed on its own (it includes compiling). A masked
variant on a path a deployment runs (CUDA graph, compiled) is then timed again in interleaved
pairs with its unmasked twin (A B, B A, ...), which cancels drift; the target ratio is the
median of the pairs' ratios. Reported besides: peak memory, the fraction of open gates, how far
the paths' outputs are apart, and a profile of one unmasked and one fused step.

Masked variants run the gated twin of the UNet, unmasked ones the stock UNet (same weights,
:mod:`.model`), so nothing is reinstalled between the steps of a pair. Compiled variants:
``torch.compile`` of each one's spec adapter with the variant's mode (``default`` or
``reduce-overhead``, which replays CUDA graphs of the compiled code); both stay compiled while
their pairs run; switching modes starts from a clean dynamo cache.
"""

from __future__ import annotations

import functools
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.model import (
    GATE_STAGE,
    Model,
    release_model,
    shapes,
    shared_model,
    unet_step_module,
)
from maskattn_deploy.bench.gpu_check.profile import PROFILED, profile_part
from maskattn_deploy.bench.gpu_check.results import (
    Agreement,
    PairedRatio,
    Part,
    Ratio,
    StepTiming,
    UNetData,
    Variant,
    VariantResult,
)
from maskattn_deploy.bench.gpu_check.variants import (
    AGREEMENT,
    PAIRED,
    RATIOS,
    RO,
    VARIANT_BY_NAME,
    VARIANTS,
    variant_mode,
    variant_skip,
)
from maskattn_deploy.bench.timing import measure_interleaved
from maskattn_deploy.cuda_graphs import capture

Step = Callable[[], torch.Tensor]


class Bench:
    """The shared model: builds (compiles, captures) and times each variant's step."""

    def __init__(self, model: Model, ctx: RunContext) -> None:
        self.model, self.ctx = model, ctx
        self.gates = model.gates
        self.adapters = {False: unet_step_module(model.unet), True: unet_step_module(model.gated)}
        self.mode: str | None = None  # compile mode of the modules in ``compiled``
        self.compiled: dict[bool, tuple[torch.nn.Module, str]] = {}  # masked -> (module, how)
        self.partners: dict[str, Step] = {}  # unmasked steps kept for their masked partners

    def compiled_module(self, mode: str, masked: bool) -> tuple[torch.nn.Module, str]:
        """The compiled adapter of the stock or gated UNet in ``mode`` (a new mode resets dynamo)."""
        if mode != self.mode:
            import torch._dynamo as dynamo  # binds only `dynamo`, not a local `torch`

            dynamo.reset()
            self.mode, self.compiled = mode, {}
        if masked not in self.compiled:
            adapter, backend = self.adapters[masked], self.ctx.plan.compile_backend
            if backend == "inductor":
                module = torch.compile(adapter, mode=None if mode == "default" else mode)
                how = f"inductor, mode {mode}"
            else:  # modes are inductor's: other backends compile the same graph without them
                module = torch.compile(adapter, backend=backend)
                how = f"{backend} backend (mode {mode} needs inductor)"
            self.compiled[masked] = (module, how)
        return self.compiled[masked]

    def step(self, variant: Variant) -> Step:
        """One CFG step of ``variant``, built once (compiled, or captured as a CUDA graph)."""
        if variant.name in self.partners:
            return self.partners[variant.name]
        module = self.adapters[variant.masked]
        ro = variant.compiled and variant.compile_mode == RO
        if variant.compiled:
            module, _ = self.compiled_module(variant.compile_mode or "default", variant.masked)
        unet = self.model.gated if variant.masked else self.model.unet
        args = tuple(self.model.inputs.values())

        def step() -> torch.Tensor:
            if ro:  # a new iteration for CUDA-graph trees: earlier outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), variant_mode(unet, variant):
                return module(*args)

        if variant.graphed and self.ctx.device.type == "cuda":
            step = capture(step, warmup=2, device=self.ctx.device).replay
        # the dry run has no CUDA graphs: the graph variants run eagerly there
        if not variant.masked:
            self.partners[variant.name] = step
        return step

    def time(self, step: Step, variant: Variant) -> StepTiming:
        """Warm up ``step`` (compiles when compiled), then time it; peak memory on CUDA."""
        ctx = self.ctx
        cuda = ctx.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        out = step()
        ctx.timer.sync()
        first_call_s = time.perf_counter() - start
        # Copied now: later calls of a graph-replaying step overwrite its output buffers.
        ctx.outputs[variant.name] = kept = out.detach().float().cpu()
        stats = ctx.timer.measure(step, ctx.plan.unet_samples, warmup=ctx.plan.unet_warmup - 1,
                                  max_s=ctx.plan.variant_cap_s)  # fmt: skip
        graph = variant.graphed and cuda
        return StepTiming(
            median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, samples=stats.n,
            first_call_s=first_call_s,
            peak_memory_bytes=torch.cuda.max_memory_allocated(ctx.device) if cuda else None,
            output_finite=bool(torch.isfinite(kept).all()),
            method="cuda-graph" if graph else "eager" if cuda else "perf_counter",
            compiled_with=self.compiled[variant.masked][1] if variant.compiled else None,
        )  # fmt: skip

    def paired(self, masked: Variant, masked_step: Step) -> PairedRatio:
        """masked/unmasked from interleaved steps (A B, B A, ...): drift cancels pair by pair."""
        from torch._dynamo.utils import counters

        unmasked = VARIANT_BY_NAME[PAIRED[masked.name]]
        timer, graphs = self.ctx.timer, counters["stats"]["unique_graphs"]
        pairs = measure_interleaved(
            self.partners[unmasked.name], masked_step, self.ctx.plan.paired_samples, warmup=0,
            sync=timer.sync, clock=timer.clock,
        )  # fmt: skip
        ratios = [m / u for m, u in zip(pairs.b.samples, pairs.a.samples, strict=True)]
        recompiles = counters["stats"]["unique_graphs"] - graphs if masked.compiled else None
        return PairedRatio(len(ratios), statistics.median(ratios), min(ratios), max(ratios),
                           recompiles)  # fmt: skip

    def open_fraction(self, step: Step) -> dict[str, float]:
        """Fraction of open gate entries per stage in one observed (untimed) step."""
        with self.gates.mode(observing=True):
            step()
        return self.gates.open_fractions()


def register_kernel_path(ctx: RunContext) -> tuple[bool, str]:
    """Route ``maskattn::masked_softmax`` to the Triton kernel; ``(ok, how or why not)``.

    On CUDA this is :func:`maskattn_deploy.plugins.torch_kernel.register`. In the dry run's
    child process (interpreter) the same kernel function is registered for CPU tensors.
    """
    if ctx.kernel is None:
        return False, f"kernel unavailable: {ctx.kernel_missing}"
    from maskattn_deploy.plugins import torch_kernel

    if ctx.device.type == "cuda":
        ok = torch_kernel.register()
        return ok, "triton (CUDA)" if ok else "torch_kernel.register() returned False"
    from maskattn_deploy.ops.torch_op import masked_softmax

    masked_softmax.register_kernel("cpu")(torch_kernel.cuda_masked_softmax)
    return True, "triton interpreter (CPU, dry run)"


# --------------------------------------------------------------------------- the part


def unet_part(part: Part[UNetData], ctx: RunContext) -> None:
    from maskattn_deploy.bench.sdxl_config import count_parameters

    model = shared_model(ctx)
    data = part.data = UNetData(
        model=ctx.plan.model, dtype=ctx.plan.unet_dtype, build_s=model.build_s,
        parameters=count_parameters(model.unet), gate_parameters=model.gates.num_parameters(),
        gated_layers=len(model.gates.layers), gate_stage=GATE_STAGE,
        compile_backend=ctx.plan.compile_backend, inputs=shapes(model.inputs),
    )  # fmt: skip
    ctx.save()
    bench = Bench(model, ctx)
    kernel_ok, ctx.kernel_path = register_kernel_path(ctx)
    data.kernel_path = ctx.kernel_path
    try:
        for variant in VARIANTS:
            if variant.compiled and data.profile is None:  # before compiles eat the budget
                steps = {n: functools.partial(bench.step, VARIANT_BY_NAME[n]) for n in PROFILED}
                data.profile = profile_part(ctx, steps, kernel_ok)
            run_variant(bench, variant, data, kernel_ok)
        data.agreement = output_agreement(ctx.outputs)
    finally:
        del bench
        release_model(ctx)


def run_variant(bench: Bench, variant: Variant, data: UNetData, kernel_ok: bool | None) -> None:
    """Time one variant (skipped or failed ones are recorded, not raised) and save."""
    ctx = bench.ctx
    reason = variant_skip(variant, ctx, kernel_ok)
    if reason is not None:
        data.variants[variant.name] = VariantResult("skipped", reason=reason)
        ctx.echo(f"  {variant.name}: skipped ({reason})")
        ctx.save()
        return
    try:
        step = bench.step(variant)  # built (compiled, captured) once
        row = VariantResult("ok", variant=variant, timing=bench.time(step, variant))
        if variant.compiled:
            ctx.compiles_s.append(row.timing.first_call_s)
        if variant.name == "eager_masked_reference":
            row.open_fraction = bench.open_fraction(step)
        partner = PAIRED.get(variant.name)
        if partner and _ok(data, partner) and partner in bench.partners:
            row.paired = bench.paired(variant, step)
    except Exception as exc:  # e.g. a compile failure: record it, keep the other variants
        row = VariantResult("failed", error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc()[-3000:])  # fmt: skip
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    data.variants[variant.name] = row
    data.ratios = unet_ratios(data.variants)
    ctx.echo(variant_line(variant.name, row))
    ctx.save()


def _ok(data: UNetData, variant_name: str) -> bool:
    row = data.variants.get(variant_name)
    return row is not None and row.status == "ok"


def unet_ratios(variants: dict[str, VariantResult]) -> dict[str, Ratio]:
    """masked / unmasked step time for each path whose two variants ran."""
    ratios = {}
    for name, (masked, unmasked) in RATIOS.items():
        a, b = variants.get(masked), variants.get(unmasked)
        if a and b and a.timing and b.timing and a.status == b.status == "ok":
            paired = a.paired.ratio_median if a.paired else None
            ratios[name] = Ratio(masked, unmasked, a.timing.median_ms / b.timing.median_ms,
                                 a.timing.min_ms / b.timing.min_ms, paired)  # fmt: skip
    return ratios


def output_agreement(outputs: dict[str, torch.Tensor]) -> dict[str, Agreement]:
    """Same-gate paths against each other, compiled vs eager: relative L2 and max abs diff."""
    found = {}
    for name, (a, b) in AGREEMENT.items():
        if a in outputs and b in outputs:
            diff = outputs[a] - outputs[b]
            found[name] = Agreement(
                max_abs_diff=float(diff.abs().max()),
                rel_l2=float(diff.norm() / outputs[b].norm().clamp_min(1e-30)),
            )
    return found


def variant_line(name: str, row: VariantResult) -> str:
    if row.status != "ok" or row.timing is None:
        return f"  {name}: {row.status} ({row.error})"
    t = row.timing
    mem = t.peak_memory_bytes
    mem_text = f", peak {mem / 2**30:.2f} GiB" if mem is not None else ""
    paired = f", interleaved {row.paired.ratio_median:.3f}" if row.paired else ""
    if row.paired and row.paired.recompiles:
        paired += f" ({row.paired.recompiles} recompiles during the pairs)"
    return (
        f"  {name}: median {t.median_ms:.2f} ms, min {t.min_ms:.2f} ms over "
        f"{t.samples} (first call {t.first_call_s:.1f} s){mem_text}{paired}"
    )
