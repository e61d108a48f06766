"""The ``unet`` part: one CFG step of the SDXL UNet, masked against unmasked, on every path.

The SDXL UNet (random fp16 weights, built on the GPU from
:mod:`maskattn_deploy.bench.sdxl_config`) gets gates on the default ``mid`` stage; one CFG step
(batch 2, 128x128 latent, 77 tokens) is timed per :class:`Variant`. Unmasked is diffusers'
stock SDPA processor; masked runs the gated processor three ways: the open set as a -inf bias
to SDPA, the ``maskattn::masked_softmax`` op with its reference implementation (kernel held
back) and the op on the Triton kernel. The same step is also captured as a CUDA graph
(unmasked, kernel, SDPA bias: Python and launch overhead out, what the GPU itself spends);
then, budget allowing, ``torch.compile`` of the unmasked, kernel and SDPA-bias paths.
Reported: median/min ms, masked/unmasked ratios (for eager and graph paths also from
interleaved step pairs, which cancel drift), peak memory, and how far the masked paths'
outputs differ from each other.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.plan import CFG_BATCH, Plan
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
from maskattn_deploy.bench.timing import measure_interleaved
from maskattn_deploy.cuda_graphs import capture

Step = Callable[[], torch.Tensor]

VARIANTS = (
    Variant("eager_unmasked", False, "stock", False),
    Variant("eager_masked_sdpa", True, "sdpa", False),
    Variant("eager_masked_reference", True, "reference", False),
    Variant("eager_masked_kernel", True, "kernel", False),
    # CUDA graphs take Python and launch overhead out: what the GPU itself spends per step.
    Variant("graph_unmasked", False, "stock", False, graphed=True),
    Variant("graph_masked_kernel", True, "kernel", False, graphed=True),
    Variant("graph_masked_sdpa", True, "sdpa", False, graphed=True),
    Variant("compile_unmasked", False, "stock", True),
    Variant("compile_masked_kernel", True, "kernel", True),
    Variant("compile_masked_sdpa", True, "sdpa", True),
)
# ratio name -> (masked variant, unmasked variant)
RATIOS = {
    "eager_sdpa": ("eager_masked_sdpa", "eager_unmasked"),
    "eager_reference": ("eager_masked_reference", "eager_unmasked"),
    "eager_kernel": ("eager_masked_kernel", "eager_unmasked"),
    "graph_kernel": ("graph_masked_kernel", "graph_unmasked"),
    "graph_sdpa": ("graph_masked_sdpa", "graph_unmasked"),
    "compile_kernel": ("compile_masked_kernel", "compile_unmasked"),
    "compile_sdpa": ("compile_masked_sdpa", "compile_unmasked"),
}
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
# masked variant -> the unmasked variant its interleaved pairs run against (not compiled)
PARTNER = {m: u for m, u in RATIOS.values() if not VARIANT_BY_NAME[m].compiled}
# agreement name -> (variant, variant it is compared with)
AGREEMENT = {
    "kernel_vs_reference": ("eager_masked_kernel", "eager_masked_reference"),
    "graph_vs_eager_kernel": ("graph_masked_kernel", "eager_masked_kernel"),
    "sdpa_vs_reference": ("eager_masked_sdpa", "eager_masked_reference"),
    "compiled_vs_eager_unmasked": ("compile_unmasked", "eager_unmasked"),
    "compiled_vs_eager_kernel": ("compile_masked_kernel", "eager_masked_kernel"),
}


# --------------------------------------------------------------------------- model and inputs


def build_unet(plan: Plan, device: torch.device, seed: int) -> torch.nn.Module:
    """SDXL (random weights, built on the device) or the built-in tiny UNet."""
    dtype = getattr(torch, plan.unet_dtype)
    if plan.model == "sdxl":
        from maskattn_deploy.bench.sdxl_config import build_sdxl_unet

        return build_sdxl_unet(device, dtype, seed)
    from maskattn_deploy.models.tiny import build_tiny_unet

    unet = build_tiny_unet(seed)
    if dtype != torch.float32 or device.type != "cpu":
        unet = unet.to(device=device, dtype=dtype)
    return unet


def unet_inputs(
    unet: torch.nn.Module, latent: int, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, Any]:
    """One CFG step's inputs: the UNet spec's dummy inputs at batch 2 and ``latent``x``latent``
    latents (77 text tokens), in the graph dtypes of ``dtype`` (timestep and time_ids fp32)."""
    from maskattn_deploy.export.component_spec import (
        FLOAT,
        ModelDims,
        ShapePoint,
        component_spec,
    )
    from maskattn_deploy.export.spec import LATENT_FACTOR

    spec = component_spec("unet", ModelDims.from_unet_config(unet.config))
    size = latent * LATENT_FACTOR
    feed = spec.dummy_inputs(ShapePoint(CFG_BATCH, size, size), seed)
    return {
        t.name: feed[t.name].to(device=device, dtype=dtype if t.dtype == FLOAT else None)
        for t in spec.inputs
    }


def unet_step_module(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet's spec adapter: takes :func:`unet_inputs` positionally, as the export does."""
    from maskattn_deploy.export.component_spec import spec_template

    return spec_template("unet").adapter(unet)


def shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    """Input name -> shape (nested dicts stay nested)."""
    return {k: shapes(v) if isinstance(v, dict) else list(v.shape) for k, v in inputs.items()}


# --------------------------------------------------------------------------- one variant's step


class Bench:
    """The UNet, its inputs and gates: builds, configures and times each variant's step."""

    def __init__(self, unet: torch.nn.Module, inputs: dict[str, Any], gates: Any, ctx: RunContext):
        self.unet, self.inputs, self.gates, self.ctx = unet, inputs, gates, ctx

    def configure(self, variant: Variant) -> None:
        """Stock processors, or gates (their mode is set per step: :func:`variant_mode`)."""
        from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

        remove_gates(self.unet)
        self.unet.requires_grad_(False)  # frozen in every variant, as installing gates leaves it
        if variant.masked:
            install_gates(self.unet, GateConfig(stage="mid"), gates=self.gates)

    def step(self, variant: Variant) -> Step:
        """One CFG step of ``variant`` (call after :meth:`configure`; graphs capture it here)."""
        module = unet_step_module(self.unet)
        if variant.compiled:
            import torch._dynamo as dynamo  # binds only `dynamo`, not a local `torch`

            dynamo.reset()
            module = torch.compile(module, backend=self.ctx.plan.compile_backend)
        unet, args = self.unet, tuple(self.inputs.values())

        def step() -> torch.Tensor:
            with torch.no_grad(), variant_mode(unet, variant):
                return module(*args)

        if variant.graphed and self.ctx.device.type == "cuda":
            return capture(step, warmup=2, device=self.ctx.device).replay
        return step  # the dry run has no CUDA graphs: the graph variants run eagerly there

    def configured_step(self, variant: Variant) -> Step:
        """:meth:`configure` for ``variant``, then its :meth:`step`."""
        self.configure(variant)
        return self.step(variant)

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
        stats = ctx.timer.measure(step, ctx.plan.unet_samples, warmup=ctx.plan.unet_warmup - 1,
                                  max_s=ctx.plan.variant_cap_s)  # fmt: skip
        ctx.outputs[variant.name] = out.detach().float().cpu()
        if variant.compiled:
            import torch._dynamo as dynamo

            dynamo.reset()
        return StepTiming(
            median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, samples=stats.n,
            first_call_s=first_call_s,
            peak_memory_bytes=torch.cuda.max_memory_allocated(ctx.device) if cuda else None,
            output_finite=bool(torch.isfinite(out).all()),
            method="cuda-graph" if variant.graphed and cuda else "eager" if cuda else "perf_counter",
        )  # fmt: skip

    def paired(self, masked: Variant, masked_step: Step) -> PairedRatio:
        """masked/unmasked from interleaved steps (A B, B A, ...): drift cancels pair by pair."""
        unmasked = VARIANT_BY_NAME[PARTNER[masked.name]]
        self.configure(unmasked)  # a graph captures the processors installed now
        timer = self.ctx.timer
        pairs = measure_interleaved(
            self.step(unmasked), masked_step, self.ctx.plan.paired_samples, warmup=0,
            sync=timer.sync, clock=timer.clock,
            before_a=lambda: self.configure(unmasked), before_b=lambda: self.configure(masked),
        )  # fmt: skip
        self.configure(masked)
        ratios = [m / u for m, u in zip(pairs.b.samples, pairs.a.samples, strict=True)]
        return PairedRatio(len(ratios), statistics.median(ratios), min(ratios), max(ratios))

    def open_fraction(self, step: Step) -> dict[str, float]:
        """Fraction of open gate entries per stage in one observed (untimed) step."""
        with self.gates.mode(observing=True):
            step()
        return self.gates.open_fractions()


def variant_mode(unet: torch.nn.Module, variant: Variant) -> contextlib.AbstractContextManager:
    """The gate mode of a masked variant's step: the masked-softmax path the variant names.

    sdpa: the open set as a -inf bias to fused attention; kernel: maskattn::masked_softmax
    (Triton on CUDA); reference: the oracle, never the kernel.
    """
    from maskattn_deploy.gating import AttentionImpl, installed_gates

    gates = installed_gates(unet)
    if gates is None or not variant.masked:
        return contextlib.nullcontext()
    impl = {"sdpa": AttentionImpl.SDPA, "reference": AttentionImpl.REFERENCE}
    return gates.mode(attention=impl.get(variant.impl, AttentionImpl.OP))


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


def variant_skip(variant: Variant, ctx: RunContext, kernel_ok: bool | None) -> str | None:
    """Why ``variant`` does not run (plan, flags, kernel, budget), or None."""
    if variant.name in ctx.plan.left_out:
        return f"not in the {ctx.plan.name} plan"
    if variant.compiled and ctx.config.skip_compile:
        return "--skip-compile"
    if variant.impl == "kernel" and kernel_ok is False:
        return ctx.kernel_path
    estimate = ctx.plan.estimate_s["compile" if variant.compiled else "eager"]
    if variant.compiled:
        estimate = max(estimate, 1.1 * ctx.compile_s)
        if not variant.masked:  # no ratio unless a masked partner compiles after it
            estimate *= 2
    return ctx.budget.skip_reason(variant.name, estimate)


def unet_part(part: Part[UNetData], ctx: RunContext) -> None:
    from maskattn_deploy.bench.sdxl_config import count_parameters
    from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

    start = time.perf_counter()
    unet = build_unet(ctx.plan, ctx.device, ctx.config.seed)
    ctx.timer.sync()
    dtype = getattr(torch, ctx.plan.unet_dtype)
    inputs = unet_inputs(unet, ctx.plan.latent, dtype, ctx.device, ctx.config.seed)
    gates = install_gates(unet, GateConfig(stage="mid"))
    remove_gates(unet)
    data = part.data = UNetData(
        model=ctx.plan.model, dtype=ctx.plan.unet_dtype, build_s=time.perf_counter() - start,
        parameters=count_parameters(unet), gate_parameters=gates.num_parameters(),
        gated_layers=len(gates.layers), gate_stage="mid", compile_backend=ctx.plan.compile_backend,
        inputs=shapes(inputs),
    )  # fmt: skip
    ctx.echo(f"  {ctx.plan.model} UNet built in {data.build_s:.1f} s "
             f"({data.parameters / 1e9:.3f} B parameters, {len(gates.layers)} gated layers)")  # fmt: skip
    ctx.save()
    bench = Bench(unet, inputs, gates, ctx)
    kernel_ok: bool | None = None
    for variant in VARIANTS:
        if variant.compiled and data.profile is None:  # before compiles eat the budget
            steps = {
                n: functools.partial(bench.configured_step, VARIANT_BY_NAME[n]) for n in PROFILED
            }
            data.profile = profile_part(ctx, steps, kernel_ok)
        if variant.impl == "kernel" and kernel_ok is None:
            kernel_ok, ctx.kernel_path = register_kernel_path(ctx)
            data.kernel_path = ctx.kernel_path
        run_variant(bench, variant, data, kernel_ok)
    data.agreement = output_agreement(ctx.outputs)
    ctx.outputs.clear()
    del unet, gates, inputs, bench
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(bench: Bench, variant: Variant, data: UNetData, kernel_ok: bool | None) -> None:
    """Time one variant (skipped or failed ones are recorded, not raised) and save."""
    ctx = bench.ctx
    reason = variant_skip(variant, ctx, kernel_ok)
    if reason is not None:
        data.variants[variant.name] = VariantResult("skipped", reason=reason)
        ctx.echo(f"  {variant.name}: skipped ({reason})")
        ctx.save()
        return
    bench.configure(variant)
    try:
        step = bench.step(variant)  # built (compiled, captured) once
        row = VariantResult("ok", variant=variant, timing=bench.time(step, variant))
        if variant.compiled:
            ctx.compile_s = max(ctx.compile_s, row.timing.first_call_s)
        if variant.name == "eager_masked_reference":
            row.open_fraction = bench.open_fraction(step)
        partner = PARTNER.get(variant.name)
        if not variant.compiled and partner and _ok(data, partner):
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
    return (
        f"  {name}: median {t.median_ms:.2f} ms, min {t.min_ms:.2f} ms over "
        f"{t.samples} (first call {t.first_call_s:.1f} s){mem_text}"
    )
