"""What one GPU-check run does and how long it may take: the plans, the user's config, the budget.

Two plans run the same code: :data:`GPU_PLAN` at the full SDXL sizes on a lent card, and
:data:`DRY_PLAN` at tiny sizes on the CPU (CI), where timings mean nothing and only the code
paths matter. A :class:`Budget` turns the run's wall-clock limit into skip decisions: each part
and each expensive variant states an estimate and is skipped, with the reason recorded, when
less time is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

SCHEMA = "maskattn-gpu-check-v1"
TARGET_COPY_FRACTION = 0.70  # kernel >= 70% of copy bandwidth (benchmarks/README.md)
TARGET_UNET_RATIO = 1.03  # masked / unmasked UNet step on the kernel path (benchmarks/README.md)
PARTS = ("environment", "kernel", "unet")
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
    compile_backend: str
    tuning_candidates: int  # how many of the kernel's TUNING_CANDIDATES tilings to time
    tuning_samples: int
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
    # Seen on an H200 (2026-11-27): kernel part 90 s with 10 tilings, first compiles of the
    # SDXL UNet 87-128 s. An estimate of 150 s would reserve 300 s for a compile pair that
    # takes about 145 s, and skip it with less time left than that.
    estimate_s={"kernel": 60, "unet": 45, "eager": 15, "compile": 130},
)
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
    cpu_threads=1,  # one thread: shared CI cores make multi-threaded barriers stall for seconds
    # Same code as their kernel twins; each extra variant costs CI seconds.
    left_out=("compile_masked_sdpa", "graph_masked_sdpa"),
    estimate_s={"kernel": 10, "unet": 5, "eager": 3, "compile": 15},
)


@dataclass(frozen=True)
class CheckConfig:
    """What the user asked for (the CLI builds it)."""

    out: str | None = None
    dry_run: bool = False
    budget_s: float = 480.0
    skip_compile: bool = False
    seed: int = 0

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
