"""One prepared GPU validation run: kernels, fused attention, gate head, full-size SDXL UNet.

A GPU is lent only now and then, for minutes, so everything worth measuring happens in one
invocation that fits a time budget (``budget_s``) and writes what it has after every step
(``results.json`` + ``results.md``, atomically), so a run cut short still leaves data. Parts,
in order (benchmarks/README.md describes what each measures and the targets):

1. ``environment``: card, driver, CUDA, torch/triton/diffusers versions, SMs, memory.
2. ``kernel`` (:mod:`.kernel`): the Triton masked softmax on every case of docs/design.md
   section 3.3, and its speed next to a copy of the same bytes.
3. ``attention`` (:mod:`.attention`): ``maskattn::gated_attention`` (Triton, FlexAttention)
   against the float64 reference, timed against SDPA on the same unmasked shapes.
4. ``gate_head`` (:mod:`.gate_head`): gate flips of the activation-dtype latent MLP.
5. ``unet`` (:mod:`.unet`, :mod:`.variants`, :mod:`.profile`): one CFG step of the SDXL UNet,
   masked against unmasked, eager, as a CUDA graph and compiled (default, reduce-overhead),
   with interleaved pairs and a profile.
6. ``tuning`` (:mod:`.tuning`): both kernels' tiling sweeps and compiler resource report.

Modules besides: :mod:`.plan` (plans, config, budget), :mod:`.results` (typed results and their
JSON form), :mod:`.timing` (CUDA-event and CUDA-graph timing on
:mod:`maskattn_deploy.bench.timing`), :mod:`.context` (the recorder that saves after every
step), :mod:`.model` (the shared UNet), :mod:`.verdict`, :mod:`.report` (Markdown, summary) and
:mod:`.run` (the run itself and the dry run's child process).

``dry_run`` runs the same code on the CPU at tiny sizes (the built-in tiny UNet instead of
SDXL, ``time.perf_counter`` instead of CUDA events, the kernels under Triton's interpreter).
"""

from maskattn_deploy.bench.gpu_check.plan import (
    DRY_PLAN,
    GPU_PLAN,
    PARTS,
    SCHEMA,
    Budget,
    CheckConfig,
    Plan,
)
from maskattn_deploy.bench.gpu_check.results import CheckOutcome, CheckResults
from maskattn_deploy.bench.gpu_check.run import run_check

__all__ = [
    "DRY_PLAN",
    "GPU_PLAN",
    "PARTS",
    "SCHEMA",
    "Budget",
    "CheckConfig",
    "CheckOutcome",
    "CheckResults",
    "Plan",
    "run_check",
]
