"""What one GPU-check run does and how long it may take: the plans, the user's config, the budget.

Two plans run the same code: :data:`GPU_PLAN` at the full SDXL sizes on a lent card, and
:data:`DRY_PLAN` at tiny sizes on the CPU (CI), where timings mean nothing and only the code
paths matter. A :class:`Budget` turns the run's wall-clock limit into skip decisions: each part
and each expensive variant states an estimate and is skipped, with the reason recorded, when
less time is left.

The GPU plan's estimates (seconds, from the H200 runs of 2026-11-27) add up to about 450 s::

    environment 0 | kernel ~20 | attention ~40 | gate_head ~25 (builds the UNet)
    unet: eager + CUDA graphs + profile ~50, compile default pair ~130 + ~60,
          compile reduce-overhead pair ~2 x 60, then extras (compiled flex and op, ~60
          each) only while ~60 s stay for tuning
    tuning: what is left, ~10 s per tiling (the masked-softmax sweep first, the compiler
          resource report, then the fused kernel's sweep)

The first ``torch.compile`` of the SDXL UNet took 87-145 s; a later compile of a variant that
shares most kernels took 17 s (Triton's kernel cache), so compiles after the first are
estimated at ``recompile`` (or 1.1x the longest later compile so far).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

SCHEMA = "maskattn-gpu-check-v2"
# Targets (benchmarks/README.md, "Targets").
TARGET_COPY_FRACTION = 0.70  # masked-softmax kernel >= 70% of copy bandwidth
TARGET_UNET_RATIO = 1.03  # masked / unmasked UNet step, CUDA-graph and compiled paths
TARGET_ATTENTION_RATIO = 1.15  # fused gated attention / SDPA on the same unmasked shapes
TARGET_GATE_FLIPS = 0  # activation-dtype latent MLP vs the fp32 head: flips allowed
PARTS = ("environment", "kernel", "attention", "gate_head", "unet", "tuning")
CFG_BATCH = 2  # classifier-free guidance: unconditional + conditional
BYTE_DEFINITION = (
    "B = bytes(S) + bytes(G) + bytes(P); the copy baseline copies B/2 "
    "bytes (read + write = B); GB/s = B / median; fraction = t_copy / t_kernel"
)


@dataclass(frozen=True)
class Plan:
    """Sizes, repeat counts and time estimates of one mode (GPU run or CPU dry run)."""

    name: str
    case_tokens: int  # n of the correctness cases (rows b*h*n = 6n: not a block multiple)
    timing_shapes: tuple[tuple[int, int, int, int], ...]
    timing_dtypes: tuple[str, ...]
    kernel_inner: int  # calls per timed sample (graph-captured on CUDA)
    kernel_samples: int
    rotate_l2_factor: float  # rotate input sets until their bytes exceed this many L2s
    peak_copy_bytes: int  # size of the large copy that gives the card's copy ceiling
    model: str  # "sdxl" | "tiny"
    latent: int
    unet_dtype: str
    unet_warmup: int
    unet_samples: int
    variant_cap_s: float  # stop sampling a UNet variant after this long (>= 2 samples)
    paired_samples: int  # interleaved masked/unmasked step pairs per eager masked variant
    compile_backend: str  # "inductor" honours the variants' compile modes
    tuning_candidates: int  # how many of each kernel's TUNING_CANDIDATES tilings to time
    tuning_samples: int
    # Fused gated attention vs SDPA: (b, h, n, t, d) per shape, the dtype, timing repeats.
    attention_shapes: tuple[tuple[int, int, int, int, int], ...] = ()
    attention_dtype: str = "float16"
    attention_inner: int = 20
    attention_samples: int = 30
    flip_dtype: str = "float16"  # UNet dtype of the gate-flip count
    resource_arch: int | None = None  # compiler resource report's sm (None: the card's)
    cpu_threads: int | None = None  # torch threads (None: leave torch's default)
    left_out: tuple[str, ...] = ()  # UNet variants this plan does not run
    estimate_s: dict[str, float] = field(default_factory=dict)


GPU_PLAN = Plan(
    name="gpu",
    case_tokens=333,
    timing_shapes=((2, 10, 4096, 77), (2, 20, 1024, 77)),
    timing_dtypes=("float16", "float32"),
    kernel_inner=20,
    kernel_samples=50,
    rotate_l2_factor=4.0,
    peak_copy_bytes=1 << 30,
    model="sdxl",
    latent=128,
    unet_dtype="float16",
    unet_warmup=3,
    unet_samples=15,
    variant_cap_s=12.0,
    paired_samples=10,
    compile_backend="inductor",
    tuning_candidates=99,  # all
    tuning_samples=20,
    # SDXL's gated cross-attention: mid stage (the default gates, 1024 tokens, 20 heads) and
    # high stage (4096 tokens, 10 heads); 64-wide heads, 77 text tokens, CFG batch 2.
    attention_shapes=((2, 20, 1024, 77, 64), (2, 10, 4096, 77, 64)),
    # Seen on an H200 (2026-11-27): kernel part 90 s with 10 tilings (now in ``tuning``),
    # SDXL UNet built in 15 s, first compiles 87-145 s, a later compile 17 s.
    estimate_s={"kernel": 20, "attention": 40, "gate_head": 25, "unet": 30, "eager": 5,
                "graph": 8, "profile": 15, "compile": 130, "recompile": 60, "tuning": 10,
                "tuning_reserve": 60},
)  # fmt: skip
DRY_PLAN = Plan(
    name="dry-run",
    case_tokens=5,
    timing_shapes=((1, 2, 16, 77),),
    timing_dtypes=("float16", "float32"),
    kernel_inner=1,
    kernel_samples=3,
    rotate_l2_factor=0.0,
    peak_copy_bytes=1 << 22,
    model="tiny",
    latent=8,
    unet_dtype="float32",
    unet_warmup=1,
    unet_samples=2,
    variant_cap_s=5.0,
    paired_samples=2,
    compile_backend="eager",  # dynamo tracing without C++/Triton code generation on the CPU
    tuning_candidates=2,  # the interpreter is slow: enough to keep the code path alive
    tuning_samples=2,
    attention_shapes=((1, 2, 16, 77, 64), (1, 2, 8, 5, 80)),
    attention_dtype="float32",  # CPU: fp16 matmuls are slow and not what a GPU runs
    attention_inner=1,
    attention_samples=2,
    resource_arch=90,  # no card: the report compiles for sm_90 (no GPU needed)
    cpu_threads=1,  # one thread: shared CI cores make multi-threaded barriers stall for seconds
    # Same code as the variants that run; each extra variant costs CI seconds.
    left_out=("graph_masked_sdpa", "graph_masked_op", "compile_masked_flex",
              "compile_masked_op"),
    estimate_s={"kernel": 5, "attention": 5, "gate_head": 5, "unet": 5, "eager": 3,
                "graph": 3, "profile": 3, "compile": 15, "recompile": 15, "tuning": 2,
                "tuning_reserve": 5},
)  # fmt: skip


@dataclass(frozen=True)
class CheckConfig:
    """What the user asked for (the CLI builds it)."""

    out: str | None = None
    dry_run: bool = False
    budget_s: float = 480.0
    skip_compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from maskattn_deploy.checks import check_float, check_int

        check_float("budget_s", self.budget_s, 0.0, 7 * 24 * 3600.0)
        check_int("seed", self.seed, 0, 2**63 - 1)

    @property
    def plan(self) -> Plan:
        return DRY_PLAN if self.dry_run else GPU_PLAN


class Budget:
    """Wall-clock budget of the run: later parts are skipped rather than overrunning it."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = float(total_s)
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def skip_reason(self, what: str, estimate_s: float) -> str | None:
        """None when ``what`` (estimated ``estimate_s``) fits; else why it is skipped."""
        left = self.remaining()
        if left >= estimate_s:
            return None
        return (
            f"budget: {what} needs ~{estimate_s:.0f} s, "
            f"{max(left, 0.0):.0f} s of {self.total_s:.0f} s left"
        )
