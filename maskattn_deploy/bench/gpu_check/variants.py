"""The UNet step's variants: which attention path, eager / CUDA graph / compiled, and the pairs.

Masked variants run the gated processor on one of the attention paths (:class:`Variant`'s
``impl``); ``fused`` is what a CUDA deployment runs by default (``AttentionImpl.AUTO``) and
``flex`` its library alternative, both behind ``maskattn::gated_attention``. ``op`` is the
masked-softmax path the TensorRT export's softmax-only node mirrors, ``sdpa`` the CPU default
and ``reference`` the oracle (for agreement only). Each path has its unmasked twin (diffusers'
stock SDPA processor), and a ratio is only ever taken within one path. The order below is the
run order: cheap paths first, then compiles (default mode, then ``reduce-overhead``), then the
extra compiled paths if time is left.
"""

from __future__ import annotations

import contextlib

import torch

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.results import Variant

RO = "reduce-overhead"


def _eager(impl: str) -> Variant:
    return Variant(f"eager_masked_{impl}", True, impl, False)


def _graph(impl: str) -> Variant:
    return Variant(f"graph_masked_{impl}", True, impl, False, graphed=True)


VARIANTS = (
    Variant("eager_unmasked", False, "stock", False),
    *(_eager(impl) for impl in ("reference", "sdpa", "op", "fused", "flex")),
    # CUDA graphs take Python and launch overhead out: what the GPU itself spends per step.
    Variant("graph_unmasked", False, "stock", False, graphed=True),
    *(_graph(impl) for impl in ("fused", "op", "sdpa")),
    Variant("compile_unmasked", False, "stock", True, compile_mode="default"),
    Variant("compile_masked_fused", True, "fused", True, compile_mode="default"),
    Variant("compile_ro_unmasked", False, "stock", True, compile_mode=RO),
    Variant("compile_ro_masked_fused", True, "fused", True, compile_mode=RO),
    # FlexAttention captured inside a CUDA graph is the least proven capture of the run: it
    # comes after the target pairs (its unmasked partner's graph is kept for it).
    _graph("flex"),
    Variant("compile_masked_flex", True, "flex", True, compile_mode="default"),
    Variant("compile_masked_op", True, "op", True, compile_mode="default"),
)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
# Compiled variants that only add context: they start only if the tuning part keeps its
# reserve (``estimate_s["tuning_reserve"]``: the masked-softmax sweep and resource report).
EXTRAS = ("compile_masked_flex", "compile_masked_op")


def _path(v: Variant) -> str:
    if v.compiled:
        return "compile_ro" if v.compile_mode == RO else "compile"
    return "graph" if v.graphed else "eager"


# path -> its unmasked variant; ratio name ("<path>_<impl>") -> (masked, unmasked)
UNMASKED = {_path(v): v.name for v in VARIANTS if not v.masked}
RATIOS = {f"{_path(v)}_{v.impl}": (v.name, UNMASKED[_path(v)]) for v in VARIANTS if v.masked}
# Masked variants timed in interleaved pairs with their unmasked twin: the paths a deployment
# runs (eager is CPU-bound and noisy on a lent VM). Compiled extras come after the
# reduce-overhead pair, when the default mode's compiled unmasked step is gone.
PAIRED = {
    m: u for m, u in RATIOS.values()
    if VARIANT_BY_NAME[m].graphed or m in ("compile_masked_fused", "compile_ro_masked_fused")
}  # fmt: skip
# agreement name -> (variant, variant it is compared with)
AGREEMENT = {
    "op_vs_reference": ("eager_masked_op", "eager_masked_reference"),
    "fused_vs_reference": ("eager_masked_fused", "eager_masked_reference"),
    "flex_vs_reference": ("eager_masked_flex", "eager_masked_reference"),
    "sdpa_vs_reference": ("eager_masked_sdpa", "eager_masked_reference"),
    "graph_vs_eager_fused": ("graph_masked_fused", "eager_masked_fused"),
    "compiled_vs_eager_unmasked": ("compile_unmasked", "eager_unmasked"),
    "compiled_vs_eager_fused": ("compile_masked_fused", "eager_masked_fused"),
    "compiled_ro_vs_eager_fused": ("compile_ro_masked_fused", "eager_masked_fused"),
}
# Paths judged against the UNet target, and the masked implementations that can meet it.
TARGET_PATHS = ("graph", "compile", "compile_ro")
TARGET_IMPLS = ("fused", "flex")


def variant_mode(unet: torch.nn.Module, variant: Variant) -> contextlib.AbstractContextManager:
    """The gate mode of a masked variant's step: the attention path the variant names."""
    from maskattn_deploy.gating import AttentionImpl, installed_gates

    gates = installed_gates(unet)
    if gates is None or not variant.masked:
        return contextlib.nullcontext()
    return gates.mode(attention=AttentionImpl(variant.impl))


def compile_estimate(ctx: RunContext, ahead: int = 0) -> float:
    """Seconds the compile ``ahead`` compiles after the next one is expected to take.

    The first compile of the run compiles every kernel (``compile``); later ones mostly hit
    Triton's kernel cache (``recompile``, or 1.1x the longest later compile so far).
    """
    estimate = ctx.plan.estimate_s
    if not ctx.compiles_s and ahead == 0:
        return estimate["compile"]
    return max(estimate["recompile"], 1.1 * max(ctx.compiles_s[1:], default=0.0))


def variant_skip(variant: Variant, ctx: RunContext, kernel_ok: bool | None) -> str | None:
    """Why ``variant`` does not run (plan, flags, kernel, budget), or None."""
    if variant.name in ctx.plan.left_out:
        return f"not in the {ctx.plan.name} plan"
    if variant.compiled and ctx.config.skip_compile:
        return "--skip-compile"
    if variant.impl in ("op", "fused") and kernel_ok is False:
        return ctx.kernel_path
    if not variant.compiled:
        return ctx.budget.skip_reason(variant.name, ctx.plan.estimate_s[_path(variant)])
    estimate = compile_estimate(ctx)
    if not variant.masked:  # no ratio unless its masked partner compiles after it
        estimate += compile_estimate(ctx, ahead=1)
    if variant.name in EXTRAS:
        estimate += ctx.plan.estimate_s["tuning_reserve"]
    return ctx.budget.skip_reason(variant.name, estimate)
