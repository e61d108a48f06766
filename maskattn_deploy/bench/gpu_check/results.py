"""Typed results of a GPU-check run and their JSON form (``results.json``).

Every part fills dataclasses; :func:`to_json` turns them into the JSON schema
(:data:`~maskattn_deploy.bench.gpu_check.plan.SCHEMA`) that ``results.json`` has always had, with
three field options kept in ``dataclasses.field`` metadata:

- a field that is ``None`` is left out (a value not measured yet, a variant that was skipped),
  unless the field (:func:`nullable`) or its class (``KEEP_NONE = True``) keeps it as ``null``;
- :data:`FLATTEN` merges a nested dataclass's keys into its parent (a part's status envelope and
  its data; a variant's settings and its timings);
- ``{"key": name}`` renames the JSON key (``pass``, a Python keyword).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Generic, TypeVar

from maskattn_deploy.bench.gpu_check.plan import CheckConfig

T = TypeVar("T")
FLATTEN = {"flatten": True}


def nullable(default: Any = None) -> Any:
    """A field written as ``null`` when it is None (instead of being left out)."""
    return field(default=default, metadata={"keep_none": True})


def flattened() -> Any:
    """A nested dataclass field whose keys are merged into the parent's JSON object."""
    return field(default=None, metadata=FLATTEN)


def to_json(value: Any) -> Any:
    """``value`` (dataclasses, dicts, lists, enums, scalars) as plain JSON data."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        keep_all = getattr(type(value), "KEEP_NONE", False)
        for f in fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("flatten"):
                if item is not None:
                    out.update(to_json(item))
            elif item is not None or keep_all or f.metadata.get("keep_none"):
                out[f.metadata.get("key", f.name)] = to_json(item)
        return out
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- envelope


@dataclass
class Part(Generic[T]):
    """One part of the run: how it went, and its data (``None`` until it starts producing)."""

    status: str = "running"  # running | ok | skipped | failed | interrupted
    reason: str | None = None  # why it was skipped
    error: str | None = None
    traceback: str | None = None
    elapsed_s: float | None = None
    data: T | None = flattened()

    @property
    def note(self) -> str:
        return self.reason or self.error or ""


# --------------------------------------------------------------------------- environment


@dataclass
class CudaInfo:
    KEEP_NONE = True

    gpu: str
    compute_capability: str
    sm_count: int
    memory_bytes: int
    l2_cache_bytes: int | None
    driver: str | None
    cudnn: int | None


@dataclass
class Environment:
    """Versions, host and (on CUDA) the card's properties."""

    KEEP_NONE = True

    device: str
    python: str
    platform: str
    cpu_count: int | None
    versions: dict[str, str | None]
    torch_cuda_build: str | None
    triton_interpret: bool
    cuda: CudaInfo | None = flattened()


# --------------------------------------------------------------------------- kernel


@dataclass
class CallTiming:
    """Microseconds per call of a short operation, over ``samples`` timed bursts of ``inner``."""

    median_us: float
    min_us: float
    samples: int
    inner: int
    method: str  # cuda-graph | cuda-events | perf_counter
    gbps: float | None = None  # bytes moved / median time, where bytes are defined


@dataclass
class CopyCeiling:
    bytes: int
    timing: CallTiming = flattened()


@dataclass
class TilingCandidate:
    rows: int
    num_warps: int
    heads: int
    correct: bool
    failed: list[str]
    median_us: dict[str, float]  # "<shape> <dtype>" -> median us per call
    geomean_us: float


@dataclass
class CaseResult:
    case: str
    threshold: float
    dtype: str
    shape: list[int]
    max_abs_diff: float
    atol: float
    checks: dict[str, bool]
    passed: bool = field(metadata={"key": "pass"})


@dataclass
class Correctness:
    all_pass: bool
    n_cases: int
    failed: list[str]
    worst_max_abs_diff: dict[str, float]
    cases: list[CaseResult]


@dataclass
class KernelTiming:
    """Kernel vs a copy of the same bytes vs the torch reference at one shape and dtype."""

    shape: list[int]
    dtype: str
    gate_dtype: str
    bytes: int
    bytes_detail: dict[str, int]
    input_sets: int
    kernel: CallTiming
    copy: CallTiming
    reference: CallTiming
    fraction_of_copy: float
    fraction_of_copy_best: float
    speedup_vs_reference: float
    meets_target: bool
    floor_us: float | None = None  # bytes at the card's copy ceiling


@dataclass
class Boundness:
    """Why the kernel is as fast as it is, from its own timings at one shape.

    ``dtype_time_ratio`` is fp32 time / fp16 time: near 2 when the kernel is bound by bytes
    (fp32 moves about twice the bytes), near 1 when per-row work or latency bounds it.
    """

    shape: list[int]
    dtype_time_ratio: float
    bytes_ratio: float
    bound: str  # "bytes" | "rows/latency"


@dataclass
class KernelData:
    module: str
    tiling: list[int] | None = nullable()  # the tiling the timings ran with
    correctness: Correctness | None = None
    copy_ceiling: CopyCeiling | None = None
    timing: list[KernelTiming] | None = None
    boundness: list[Boundness] | None = None


# --------------------------------------------------------------------------- attention


@dataclass
class ImplResult:
    """One implementation of ``maskattn::gated_attention`` (or SDPA) at one shape."""

    status: str  # ok | failed
    error: str | None = None
    timing: CallTiming | None = flattened()
    max_abs_diff: float | None = None  # vs the reference in float64 (not for SDPA)
    atol: float | None = None
    correct: bool | None = None
    ratio_vs_sdpa: float | None = None  # median time / SDPA's median time
    first_call_s: float | None = None  # includes JIT or torch.compile


@dataclass
class AttentionShape:
    shape: list[int]  # b, h, n, t, d
    dtype: str
    open_fraction: float
    impls: dict[str, ImplResult] = field(default_factory=dict)  # sdpa, triton, flex


@dataclass
class AttentionData:
    module: str | None
    shapes: list[AttentionShape] = field(default_factory=list)


# --------------------------------------------------------------------------- gate head


@dataclass
class GateFlips:
    """Gate flips of the activation-dtype latent MLP against the fp32 head (parity's gate
    agreement: a flip within ``margin`` of the threshold is tolerated, the others count)."""

    dtype: str
    entries: int
    flips: int
    tolerated: int
    near_threshold: int
    max_flip_distance: float
    margin: float
    per_layer: dict[str, int]


@dataclass
class GateHeadData:
    model: str
    layers: int
    heads: int
    flips: GateFlips | None = None


# --------------------------------------------------------------------------- tuning sweeps


@dataclass
class KernelResources:
    """Compiler resource report of one tiling (``plugins/kernel_resources.py``)."""

    kernel: str
    tiling: str
    arch: int
    dtype: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_mem: int
    programs_per_sm: int


@dataclass
class AttentionTilingCandidate:
    block_n: int
    num_warps: int
    heads: int  # 0: all heads of the layer
    correct: bool
    median_us: dict[str, float]  # "<shape>" -> median us per call
    geomean_us: float
    error: str | None = None


@dataclass
class Sweep:
    """One kernel's tiling sweep: every candidate checked and timed, the fastest correct one."""

    status: str  # ok | skipped | partial (the budget ran out)
    reason: str | None = None
    default: list[int] | None = None
    candidates: list[Any] | None = None  # TilingCandidate | AttentionTilingCandidate
    criterion: str | None = None
    chosen: list[int] | None = None
    chosen_fraction_of_copy: dict[str, float] | None = None  # masked softmax: per timing row


@dataclass
class TuningData:
    masked_softmax: Sweep | None = None
    gated_attention: Sweep | None = None
    resources: list[KernelResources] | None = None
    resources_error: str | None = None


# --------------------------------------------------------------------------- UNet


@dataclass(frozen=True)
class Variant:
    """One timed configuration of the UNet step.

    ``impl``: ``stock`` (diffusers' AttnProcessor2_0, no gates) or the gated layers'
    attention path: ``sdpa`` (-inf bias), ``reference`` (the oracle), ``op``
    (``maskattn::masked_softmax``, Triton kernel), ``fused`` (``maskattn::gated_attention``,
    Triton kernel) or ``flex`` (the same op with FlexAttention).
    """

    name: str
    masked: bool
    impl: str
    compiled: bool
    graphed: bool = False  # eager step captured once as a CUDA graph, timed by replays
    compile_mode: str | None = None  # torch.compile mode: default | reduce-overhead


@dataclass
class StepTiming:
    median_ms: float
    min_ms: float
    samples: int
    first_call_s: float
    peak_memory_bytes: int | None = nullable()
    output_finite: bool = True
    method: str = ""  # cuda-graph | eager | perf_counter
    compiled_with: str | None = None  # what torch.compile got (backend / mode)


@dataclass
class PairedRatio:
    """masked/unmasked from interleaved step pairs."""

    pairs: int
    ratio_median: float
    ratio_min: float
    ratio_max: float
    recompiles: int | None = None  # graphs dynamo compiled during the pairs (compiled paths)


@dataclass
class VariantResult:
    status: str  # ok | skipped | failed
    reason: str | None = None
    error: str | None = None
    traceback: str | None = None
    variant: Variant | None = flattened()
    timing: StepTiming | None = flattened()
    open_fraction: dict[str, float] | None = None
    paired: PairedRatio | None = None


@dataclass
class Ratio:
    masked: str
    unmasked: str
    ratio_median: float
    ratio_min: float
    ratio_paired: float | None = nullable()


@dataclass
class Agreement:
    max_abs_diff: float
    rel_l2: float


@dataclass
class ProfileRow:
    name: str
    calls: int
    self_us: float


@dataclass
class ProfileStep:
    clock: str  # device | cpu
    total_ms: float
    calls: int
    kernels: list[ProfileRow]


@dataclass
class Profile:
    status: str  # ok | skipped | failed
    reason: str | None = None
    error: str | None = None
    top: int | None = None
    variants: dict[str, ProfileStep] | None = None


@dataclass
class UNetData:
    model: str
    dtype: str
    build_s: float
    parameters: int
    gate_parameters: int
    gated_layers: int
    gate_stage: str
    compile_backend: str
    inputs: dict[str, Any]  # input name -> shape (nested for added_cond_kwargs)
    variants: dict[str, VariantResult] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    kernel_path: str | None = None
    profile: Profile | None = None
    agreement: dict[str, Agreement] | None = None


# --------------------------------------------------------------------------- the run


@dataclass
class Targets:
    kernel_copy_fraction_min: float
    unet_ratio_max: float
    attention_ratio_max: float
    gate_flips_max: int


@dataclass
class TargetResult:
    """One target: the limit, what was measured (None: not measured) and whether it was met
    (None on the dry run, whose timings mean nothing, and where nothing was measured)."""

    KEEP_NONE = True

    limit: float
    measured: float | None
    met: bool | None
    detail: str


@dataclass
class Verdict:
    """Each target's result, correctness of the kernels, failed parts, overall ok."""

    KEEP_NONE = True

    targets: dict[str, TargetResult]
    kernel_correct: bool | None
    attention_correct: bool | None
    failed: list[str]
    ok: bool
    note: str


@dataclass
class Parts:
    environment: Part[Environment] | None = None
    kernel: Part[KernelData] | None = None
    attention: Part[AttentionData] | None = None
    gate_head: Part[GateHeadData] | None = None
    unet: Part[UNetData] | None = None
    tuning: Part[TuningData] | None = None

    def items(self) -> list[tuple[str, Part[Any]]]:
        """``(name, part)`` of the parts that started, in run order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)]


@dataclass
class CheckResults:
    """Everything ``results.json`` holds."""

    schema: str
    dry_run: bool
    plan: str
    created_utc: str
    config: CheckConfig
    targets: Targets
    byte_definition: str
    parts: Parts = field(default_factory=Parts)
    complete: bool = False
    verdict: Verdict | None = None
    elapsed_s: float | None = None


@dataclass
class CheckOutcome:
    """What :func:`~maskattn_deploy.bench.gpu_check.run.run_check` returns."""

    ok: bool  # no part failed and the kernel was not wrong
    out_dir: Path
    verdict: Verdict | None
    results: CheckResults | None = None  # None when the run happened in a child process
    child_exit_code: int | None = None
