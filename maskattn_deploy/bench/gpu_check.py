"""One prepared GPU validation run: environment, masked-softmax kernel, full-size SDXL UNet.

A GPU is lent only now and then, for minutes, so everything worth measuring happens in one
invocation that fits a time budget (``budget_s``, default 480 s on an H100 including model
construction) and writes what it has after every step (``results.json`` + ``results.md``,
atomically), so a run cut short still leaves data. Parts, in order:

1. ``environment``: card, driver, CUDA, torch/triton/diffusers versions, SMs, memory.
2. ``kernel``: first a tiling sweep (each ``(ROWS, num_warps, HEADS)`` of the kernel's
   ``TUNING_CANDIDATES``, checked on the t = 77 cases and timed; the fastest correct one is
   applied for the rest of the run), then the Triton kernel against the reference oracle on
   every case of docs/design.md section 3.3 (exact zero pattern, max abs diff within fp32 1e-6 / fp16
   2e-3, poisoned output buffers), then its time at the SDXL shapes next to a device-to-device
   copy of the same bytes and the torch reference.
3. ``unet``: the SDXL UNet (random fp16 weights, built on the GPU from
   :mod:`maskattn_deploy.bench.sdxl_config`) with gates on the default ``mid`` stage; one CFG
   step (batch 2, 128x128 latent, 77 tokens). Unmasked is diffusers' stock SDPA processor;
   masked runs the gated processor three ways: the open set as a -inf bias to SDPA, the
   ``maskattn::masked_softmax`` op with its reference implementation (kernel held back) and
   the op on the Triton kernel. The same step is also captured as a CUDA graph (unmasked,
   kernel, SDPA bias: Python and launch overhead out, what the GPU itself spends); then,
   budget allowing, ``torch.compile`` of the unmasked, kernel and SDPA-bias paths. Reported:
   median/min ms, masked/unmasked ratios (for eager and graph paths also from interleaved
   step pairs, which cancel drift), peak memory, and how far the masked
   paths' outputs differ from each other.

``dry_run`` runs the same code on the CPU at tiny sizes (the built-in tiny UNet instead of
SDXL, ``time.perf_counter`` instead of CUDA events). ``triton.jit`` picks interpretation when
the kernel module is imported, so the dry run executes in a child process started with
``TRITON_INTERPRET=1``; in that throwaway process the kernel is also registered for CPU
tensors, so the UNet's kernel path runs the interpreted kernel.

Bytes, defined once for the kernel and its copy baseline: ``B = bytes(S) + bytes(G) +
bytes(P)``, the least traffic of one masked softmax (each input read once, the output written
once). The baseline copies a ``B/2``-byte buffer (reads ``B/2``, writes ``B/2``), so both move
``B`` bytes; GB/s is ``B / median time`` for both and the fraction of copy bandwidth is
``t_copy / t_kernel``. Input sets rotate so that the data of one timing exceeds the L2 cache.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import BackendUnavailableError
from maskattn_deploy.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

SCHEMA = "maskattn-gpu-check-v1"
TARGET_COPY_FRACTION = 0.70  # kernel >= 70% of copy bandwidth (benchmarks/README.md)
TARGET_UNET_RATIO = 1.03  # masked / unmasked UNet step on the kernel path (benchmarks/README.md)
# Max abs error vs the reference: fp32 only summation order differs; fp16: rounding of P.
ATOL = {"float32": 1e-6, "float16": 2e-3}
POISON = 123.0  # never a probability: any survivor in P is an unwritten element
KERNEL_MODULE = "maskattn_deploy.plugins.masked_softmax_triton"
PARTS = ("environment", "kernel", "unet")
CFG_BATCH = 2  # classifier-free guidance: unconditional + conditional
Echo = Callable[[str], None]


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


# --------------------------------------------------------------------------- results I/O


class Recorder:
    """Holds the results and rewrites results.json / results.md after every step."""

    def __init__(self, out_dir: Path, results: dict[str, Any], echo: Echo) -> None:
        self.out_dir = out_dir
        self.results = results
        self.echo = echo

    def save(self) -> None:
        write_json_atomic(self.out_dir / "results.json", self.results)
        with atomic_path(self.out_dir / "results.md") as tmp:
            tmp.write_text(render_markdown(self.results))

    def run_part(
        self, name: str, fn: Callable[[dict[str, Any]], None], budget: Budget, estimate_s: float
    ) -> dict[str, Any]:
        """Run one part unless the budget says no; failures are recorded, never raised."""
        entry: dict[str, Any] = {"status": "running"}
        self.results["parts"][name] = entry
        reason = budget.skip_reason(name, estimate_s)
        if reason is not None:
            entry.update(status="skipped", reason=reason)
            self.echo(f"[{name}] skipped: {reason}")
            self.save()
            return entry
        self.echo(f"[{name}] start at {budget.elapsed():.1f} s")
        start = time.perf_counter()
        try:
            fn(entry)
            if entry["status"] == "running":
                entry["status"] = "ok"
        except Exception as exc:  # a broken part must not cost the later parts
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            entry["traceback"] = traceback.format_exc()[-4000:]
            logger.debug("part %s failed", name, exc_info=True)
        except BaseException as exc:  # SIGTERM (timeout) or Ctrl-C: save what there is, stop
            entry.update(status="interrupted", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            entry["elapsed_s"] = round(time.perf_counter() - start, 3)
            self.save()
        tail = f": {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""
        self.echo(
            f"[{name}] {entry['status']} in {entry['elapsed_s']:.1f} s "
            f"(total {budget.elapsed():.1f} s of {budget.total_s:.0f} s){tail}"
        )
        return entry


@dataclass
class RunContext:
    """Everything the parts share."""

    config: CheckConfig
    plan: Plan
    device: torch.device
    budget: Budget
    recorder: Recorder
    timer: Timer
    echo: Echo
    kernel: Any = None
    kernel_missing: str | None = None
    kernel_path: str = ""
    compile_s: float = 0.0  # longest first (compiling) call so far: the next compile's estimate
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # last output per variant

    def l2_bytes(self) -> int:
        if self.device.type != "cuda":
            return 0
        props = torch.cuda.get_device_properties(self.device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def default_out_dir(dry_run: bool) -> Path:
    """``benchmarks/<UTC date>-<gpu name>`` (``-cpu-dry-run`` for the dry run)."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    card = "cpu-dry-run" if dry_run else _slug(torch.cuda.get_device_name(0))
    return Path("benchmarks") / f"{date}-{card}"


def new_results(config: CheckConfig, plan: Plan) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "dry_run": config.dry_run,
        "plan": plan.name,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "targets": {
            "kernel_copy_fraction_min": TARGET_COPY_FRACTION,
            "unet_ratio_max": TARGET_UNET_RATIO,
        },
        "byte_definition": "B = bytes(S) + bytes(G) + bytes(P); the copy baseline copies B/2 "
        "bytes (read + write = B); GB/s = B / median; fraction = t_copy / t_kernel",
        "parts": {},
        "complete": False,
    }


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout else None


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions, host and (on CUDA) the card's properties."""
    import maskattn_deploy

    info: dict[str, Any] = {
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
            "maskattn_deploy": maskattn_deploy.__version__,
        },
        "torch_cuda_build": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
            driver=_nvidia_driver(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# --------------------------------------------------------------------------- timing


class Timer:
    """Per-call times: CUDA events (CUDA-graph replays when capture works) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once_ms(self, fn: Callable[[], object]) -> float:
        """Time one call of ``fn`` (already warm) in milliseconds."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end))

    def per_call_us(
        self, calls: list[Callable[[], object]], inner: int, samples: int
    ) -> dict[str, Any]:
        """Median/min microseconds per call; each sample runs ``inner`` calls cycling ``calls``."""
        for fn in calls:  # warm-up: compilation and allocation stay out of the numbers
            fn()
        self.sync()

        def loop() -> None:
            for i in range(inner):
                calls[i % len(calls)]()

        run, method = loop, "perf_counter" if not self.cuda else "cuda-events"
        if self.cuda:
            graph = self._capture(loop)
            if graph is not None:
                run, method = graph.replay, "cuda-graph"
        run()
        per_call = [self.once_ms(run) * 1e3 / inner for _ in range(samples)]
        return {
            "median_us": statistics.median(per_call),
            "min_us": min(per_call),
            "samples": samples,
            "inner": inner,
            "method": method,
        }

    def _capture(self, loop: Callable[[], None]) -> Any:
        """A CUDA graph of ``loop`` (hides launch gaps between short kernels), or None."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loop()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop()
            return graph
        except Exception as exc:  # capture is an optimisation: fall back to events
            logger.warning("CUDA graph capture failed (%s); timing eager launches", exc)
            return None


# --------------------------------------------------------------------------- kernel part


def ensure_plugins_importable() -> None:
    """Map ``maskattn_deploy.plugins`` onto ``<checkout>/plugins`` when the package is not
    pip-installed (a bare source checkout on a lent GPU machine), as pyproject's package-dir does.
    """
    import importlib.util

    import maskattn_deploy

    if importlib.util.find_spec("maskattn_deploy.plugins") is not None:
        return
    folder = Path(maskattn_deploy.__file__).resolve().parent.parent / "plugins"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "maskattn_deploy.plugins", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["maskattn_deploy.plugins"] = module
    spec.loader.exec_module(module)
    maskattn_deploy.plugins = module  # type: ignore[attr-defined]


def load_kernel(device: torch.device) -> tuple[Any, str | None]:
    """``(kernel module, None)`` or ``(None, why it cannot run here)``; imports lazily."""
    from maskattn_deploy._lazy import available, install_hint

    if not available("triton"):
        return None, f"triton is not installed: {install_hint('triton')}"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, (
            "the kernel runs on the CPU only under TRITON_INTERPRET=1 set before triton is "
            "imported (the dry run starts a child process with it)"
        )
    ensure_plugins_importable()
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except Exception as exc:
        return None, f"{KERNEL_MODULE} is not importable ({type(exc).__name__}: {exc})"
    if not callable(getattr(module, "masked_softmax_triton", None)):
        return None, f"{KERNEL_MODULE} has no masked_softmax_triton(S, G, threshold, out)"
    return module, None


@dataclass
class KernelCase:
    """One correctness case: fp32 base logits, gate logits, threshold and the poison value."""

    name: str
    S: torch.Tensor  # [b, h, n, t] fp32 (cast per dtype)
    G: torch.Tensor  # [b, 1, n, t] fp32
    threshold: float = 0.0
    poison: float = float("nan")
    gate_like_logits: bool = False  # G in the dtype of S instead of fp32


def kernel_cases(n: int, seed: int) -> list[KernelCase]:
    """Every case of docs/design.md section 3.3. Both plans' ``n`` (333, 5) are odd, so no case's token
    rows per (batch, head) slice are a multiple of the kernel's rows per program (2 to 256)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def gate(b: int, rows: int, t: int) -> torch.Tensor:
        return randn(b, 1, rows, t) * 2.0 - 0.5  # ~40% open, never all zero

    cases = [
        KernelCase(f"random-t{t}", randn(2, 3, n, t) * 3, gate(2, n, t))
        for t in (1, 2, 77, 154, 231)
    ]
    S = randn(2, 3, n, 77) * 4
    one = torch.full((2, 1, n, 77), -3.0)
    one[..., 40] = 2.0
    ties = torch.full((2, 1, n, 77), -2.0)
    ties[..., 9] = ties[..., 30] = -0.5  # equal maxima, all closed: index 9 opens
    ties[:, :, 1] = -1.0  # a row of equal gates: index 0 opens
    near = (torch.rand(2, 3, n, 77, generator=gen) * 2 - 1) * 6.0e4  # fp16 max is 65504
    bad = randn(1, 2, 4, 77)
    bad[0, 0, 1, 5], bad[0, 1, 2, 6] = float("inf"), float("nan")
    bad_gate = torch.full((1, 1, 4, 77), 1.0)
    bad_gate[..., 50:] = -1.0
    cases += [
        KernelCase("all-open", S, torch.rand(2, 1, n, 77, generator=gen) + 0.5),
        KernelCase("all-closed-fallback", S, -torch.rand(2, 1, n, 77, generator=gen) - 0.1),
        KernelCase("one-open-token", S, one),
        KernelCase("ties-in-gate", S, ties),
        KernelCase("threshold-0.3", S, gate(2, n, 77), threshold=0.3),
        KernelCase("near-fp16-range", near, gate(2, n, 77)),
        KernelCase("gate-dtype-of-logits", S, gate(2, n, 77), gate_like_logits=True),
        KernelCase("rows-7", randn(1, 1, 7, 77), gate(1, 7, 77)),
        KernelCase("rows-odd-t154", randn(3, 2, n + 2, 154), gate(3, n + 2, 154)),
        KernelCase("non-finite-logits", bad, bad_gate),
    ]
    for i, case in enumerate(cases):
        case.poison = POISON if i % 2 else float("nan")
    return cases


def check_output(
    got: torch.Tensor, S: torch.Tensor, G: torch.Tensor, threshold: float, wrote_into_out: bool
) -> dict[str, Any]:
    """Compare a kernel output (CPU) with the reference on the same inputs."""
    from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask

    want = masked_softmax_reference(S, G, threshold)
    dtype = str(S.dtype).removeprefix("torch.")
    finite_rows = torch.isfinite(S.float()).all(dim=-1, keepdim=True).expand_as(want)
    diff = (got.float() - want.float())[finite_rows].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    closed = ~open_mask(G, threshold).expand_as(want)
    checks = {
        "dtype_shape": got.dtype == S.dtype and got.shape == S.shape,
        "wrote_into_out": wrote_into_out,
        "within_tolerance": max_abs <= ATOL[dtype],
        "zero_pattern": bool(torch.equal(got[finite_rows] == 0, want[finite_rows] == 0)),
        "closed_exactly_zero": bool(torch.all(got[closed] == 0)),
        "nan_pattern": bool(torch.equal(torch.isnan(got), torch.isnan(want))),
        "no_poison_left": not bool(torch.any(got == POISON)),
    }
    return {
        "dtype": dtype,
        "shape": list(S.shape),
        "max_abs_diff": max_abs,
        "atol": ATOL[dtype],
        "checks": checks,
        "pass": all(checks.values()),
    }


def kernel_correctness(
    kernel: Any, device: torch.device, plan: Plan, seed: int, only_t: int | None = None
) -> dict[str, Any]:
    """Every case (or those with ``t == only_t``) in fp32 and fp16 against the reference."""
    results = []
    for case in kernel_cases(plan.case_tokens, seed):
        if only_t is not None and case.S.shape[-1] != only_t:
            continue
        for dtype in (torch.float32, torch.float16):
            S = case.S.to(dtype)
            G = case.G.to(dtype) if case.gate_like_logits else case.G
            out = torch.full(S.shape, case.poison, dtype=dtype, device=device)
            got = kernel.masked_softmax_triton(S.to(device), G.to(device), case.threshold, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row = check_output(got.cpu(), S, G, case.threshold, got.data_ptr() == out.data_ptr())
            results.append({"case": case.name, "threshold": case.threshold, **row})
    failed = [f"{r['case']}/{r['dtype']}" for r in results if not r["pass"]]
    worst = {
        d: max((r["max_abs_diff"] for r in results if r["dtype"] == d), default=0.0)
        for d in ("float32", "float16")
    }
    return {"all_pass": not failed, "n_cases": len(results), "failed": failed,
            "worst_max_abs_diff": worst, "cases": results}  # fmt: skip


def _sets_for(set_bytes: int, l2_bytes: int, factor: float) -> int:
    """Input sets to rotate so one timing's data is ``factor`` times the L2 (1..32)."""
    if factor <= 0 or l2_bytes <= 0:
        return 1
    return max(1, min(32, math.ceil(factor * l2_bytes / set_bytes)))


def _rate(stats: dict[str, Any], nbytes: int) -> dict[str, Any]:
    return {**stats, "gbps": nbytes / (stats["median_us"] * 1e-6) / 1e9}


def _kernel_inputs(
    shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, sets: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``sets`` independent (S, G, poisoned P) triples: rotating them defeats the L2."""
    b, h, n, t = shape
    data = []
    for _ in range(sets):
        S = (torch.randn(shape, device=device) * 3).to(dtype)
        G = torch.randn((b, 1, n, t), device=device) * 2 - 0.5
        data.append((S, G, torch.full_like(S, POISON)))
    return data


def time_kernel_shape(
    kernel: Any, shape: tuple[int, int, int, int], dtype: str, device: torch.device,
    plan: Plan, timer: Timer, l2_bytes: int,
) -> dict[str, Any]:  # fmt: skip
    """Kernel vs a copy of the same bytes vs the torch reference at one shape and dtype."""
    from maskattn_deploy.ops.reference import masked_softmax_reference

    b, h, n, t = shape
    torch_dtype = getattr(torch, dtype)
    elem = torch.empty((), dtype=torch_dtype).element_size()
    s_bytes, g_bytes = b * h * n * t * elem, b * n * t * 4
    nbytes = 2 * s_bytes + g_bytes  # S read + G read + P write
    sets = _sets_for(nbytes, l2_bytes, plan.rotate_l2_factor)
    data = _kernel_inputs(shape, torch_dtype, device, sets)
    copies = [
        (torch.randint(1, 255, (nbytes // 2,), dtype=torch.uint8, device=device),
         torch.empty(nbytes // 2, dtype=torch.uint8, device=device))
        for _ in range(sets)
    ]  # fmt: skip
    inner, samples = plan.kernel_inner, plan.kernel_samples
    k = timer.per_call_us(
        [lambda d=d: kernel.masked_softmax_triton(d[0], d[1], 0.0, out=d[2]) for d in data],
        inner, samples,
    )  # fmt: skip
    c = timer.per_call_us([lambda p=p: p[1].copy_(p[0]) for p in copies], inner, samples)
    r = timer.per_call_us(
        [lambda d=d: masked_softmax_reference(d[0], d[1], 0.0) for d in data], inner, samples
    )
    row = {
        "shape": list(shape), "dtype": dtype, "gate_dtype": "float32",
        "bytes": nbytes, "bytes_detail": {"S": s_bytes, "G": g_bytes, "P": s_bytes},
        "input_sets": sets,
        "kernel": _rate(k, nbytes), "copy": _rate(c, nbytes), "reference": _rate(r, nbytes),
    }  # fmt: skip
    row["fraction_of_copy"] = c["median_us"] / k["median_us"]
    row["fraction_of_copy_best"] = c["min_us"] / k["min_us"]
    row["speedup_vs_reference"] = r["median_us"] / k["median_us"]
    row["meets_target"] = row["fraction_of_copy"] >= TARGET_COPY_FRACTION
    return row


def copy_ceiling(device: torch.device, plan: Plan, timer: Timer) -> dict[str, Any]:
    """The card's device-to-device copy rate on a large buffer (read + write bytes)."""
    half = plan.peak_copy_bytes // 2
    src = torch.randint(1, 255, (half,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stats = timer.per_call_us([lambda: dst.copy_(src)], 3, max(3, plan.kernel_samples // 5))
    return {"bytes": 2 * half, **_rate(stats, 2 * half)}


def tune_tiling(ctx: RunContext) -> dict[str, Any]:
    """Time each candidate tiling (ROWS, num_warps, HEADS) at t = 77 and keep the fastest.

    A candidate counts only if it passes every t = 77 correctness case. The winner is applied
    with ``use_launch_config`` for the rest of the run (kernel timings and the UNet); the
    criterion is the geometric mean of its median times over the timing shapes and dtypes.
    """
    kernel, plan = ctx.kernel, ctx.plan
    candidates = tuple(getattr(kernel, "TUNING_CANDIDATES", ()))[: plan.tuning_candidates]
    if not candidates or not hasattr(kernel, "use_launch_config"):
        return {"status": "skipped", "reason": "the kernel module has no tuning candidates"}
    rows = []
    for tiling in candidates:
        kernel.use_launch_config(*tiling)
        try:
            correct = kernel_correctness(kernel, ctx.device, plan, ctx.config.seed, only_t=77)
            times = {}
            for shape in plan.timing_shapes:
                for dtype in plan.timing_dtypes:
                    data = _kernel_inputs(shape, getattr(torch, dtype), ctx.device, 2)
                    calls = [lambda d=d: kernel.masked_softmax_triton(d[0], d[1], 0.0, out=d[2])
                             for d in data]  # fmt: skip
                    stats = ctx.timer.per_call_us(calls, plan.kernel_inner, plan.tuning_samples)
                    times[f"{list(shape)} {dtype}"] = stats["median_us"]
        finally:
            kernel.use_launch_config(None)
        geo = math.exp(statistics.fmean(math.log(v) for v in times.values()))
        row = {"rows": tiling[0], "num_warps": tiling[1], "heads": tiling[2],
               "correct": correct["all_pass"],
               "failed": correct["failed"], "median_us": times, "geomean_us": geo}  # fmt: skip
        rows.append(row)
        outcome = "ok" if row["correct"] else "WRONG: " + ", ".join(row["failed"])
        ctx.echo(f"  tiling rows={tiling[0]:<3} warps={tiling[1]} heads={tiling[2]:<2}: "
                 f"geomean {geo:.2f} us ({outcome})")  # fmt: skip
    good = [r for r in rows if r["correct"]]
    result: dict[str, Any] = {
        "status": "ok", "default": list(kernel.launch_config(128)), "candidates": rows,
        "criterion": "geometric mean of median us over the timing shapes and dtypes",
    }  # fmt: skip
    if good:
        best = min(good, key=lambda r: r["geomean_us"])
        kernel.use_launch_config(best["rows"], best["num_warps"], best["heads"])
        result["chosen"] = [best["rows"], best["num_warps"], best["heads"]]
        ctx.echo(f"  tiling chosen: rows={best['rows']} warps={best['num_warps']} "
                 f"heads={best['heads']}")  # fmt: skip
    return result


def kernel_part(entry: dict[str, Any], ctx: RunContext) -> None:
    if ctx.kernel is None:
        entry.update(status="skipped", reason=ctx.kernel_missing)
        return
    entry["module"] = ctx.kernel.__name__
    entry["tuning"] = tune_tiling(ctx)
    entry["tiling"] = (
        list(ctx.kernel.launch_config(128)) if entry["tuning"]["status"] == "ok" else None
    )
    ctx.recorder.save()
    entry["correctness"] = kernel_correctness(ctx.kernel, ctx.device, ctx.plan, ctx.config.seed)
    ctx.recorder.save()
    l2 = ctx.l2_bytes()
    entry["copy_ceiling"] = copy_ceiling(ctx.device, ctx.plan, ctx.timer)
    entry["timing"] = []
    for shape in ctx.plan.timing_shapes:
        for dtype in ctx.plan.timing_dtypes:
            row = time_kernel_shape(ctx.kernel, shape, dtype, ctx.device, ctx.plan, ctx.timer, l2)
            row["floor_us"] = row["bytes"] / (entry["copy_ceiling"]["gbps"] * 1e9) * 1e6
            entry["timing"].append(row)
            ctx.echo(_kernel_line(row))
            ctx.recorder.save()
    if not entry["correctness"]["all_pass"]:
        entry.update(status="failed", error=f"kernel mismatches: {entry['correctness']['failed']}")


def _kernel_line(row: dict[str, Any]) -> str:
    return (
        f"  kernel {row['shape']} {row['dtype']}: {row['kernel']['median_us']:.2f} us "
        f"({row['kernel']['gbps']:.0f} GB/s), copy {row['copy']['median_us']:.2f} us "
        f"({row['copy']['gbps']:.0f} GB/s), reference {row['reference']['median_us']:.2f} us; "
        f"{100 * row['fraction_of_copy']:.0f}% of copy"
    )


# --------------------------------------------------------------------------- UNet part


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


@dataclass(frozen=True)
class Variant:
    """One timed configuration of the UNet step."""

    name: str
    masked: bool
    impl: str  # stock (AttnProcessor2_0) | sdpa (-inf bias) | reference (op) | kernel (op)
    compiled: bool
    graphed: bool = False  # eager step captured once as a CUDA graph, timed by replays


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


def _step_fn(unet: torch.nn.Module, inputs: dict[str, Any], variant: Variant, ctx: RunContext):
    """One CFG step of ``variant`` (call after :func:`_configure`; graphs capture it here)."""
    module = unet_step_module(unet)
    if variant.compiled:
        import torch._dynamo as dynamo  # binds only `dynamo`, not a local `torch`

        dynamo.reset()
        module = torch.compile(module, backend=ctx.plan.compile_backend)
    args = tuple(inputs.values())

    def step() -> torch.Tensor:
        with torch.no_grad(), _variant_mode(unet, variant):
            return module(*args)

    if variant.graphed and ctx.device.type == "cuda":
        return _graphed(step, ctx.device)
    return step  # the dry run has no CUDA graphs: the graph variants run eagerly there


def _graphed(step: Callable[[], torch.Tensor], device: torch.device):
    """Capture ``step`` as a CUDA graph (after two warm-up calls on a side stream)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def time_variant(
    step: Callable[[], torch.Tensor], variant: Variant, ctx: RunContext
) -> dict[str, Any]:
    """Warm up ``step`` (compiles when compiled), then time it; peak memory on CUDA."""
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    out = step()
    ctx.timer.sync()
    first_call_s = time.perf_counter() - start
    for _ in range(ctx.plan.unet_warmup - 1):
        step()
    times: list[float] = []
    sampling = time.perf_counter()
    while len(times) < ctx.plan.unet_samples:
        times.append(ctx.timer.once_ms(step))
        if len(times) >= 2 and time.perf_counter() - sampling > ctx.plan.variant_cap_s:
            break
    result = {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "samples": len(times),
        "first_call_s": first_call_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if cuda else None,
        "output_finite": bool(torch.isfinite(out).all()),
        "method": "cuda-graph" if variant.graphed and cuda else "eager" if cuda else "perf_counter",
    }
    ctx.outputs[variant.name] = out.detach().float().cpu()
    if variant.compiled:
        import torch._dynamo as dynamo

        dynamo.reset()
    return result


def _variant_skip(variant: Variant, ctx: RunContext, kernel_ok: bool | None) -> str | None:
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


def unet_part(entry: dict[str, Any], ctx: RunContext) -> None:
    from maskattn_deploy.bench.sdxl_config import count_parameters
    from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

    start = time.perf_counter()
    unet = build_unet(ctx.plan, ctx.device, ctx.config.seed)
    ctx.timer.sync()
    dtype = getattr(torch, ctx.plan.unet_dtype)
    inputs = unet_inputs(unet, ctx.plan.latent, dtype, ctx.device, ctx.config.seed)
    gates = install_gates(unet, GateConfig(stage="mid"))
    remove_gates(unet)
    entry.update(
        model=ctx.plan.model, dtype=ctx.plan.unet_dtype, build_s=time.perf_counter() - start,
        parameters=count_parameters(unet), gate_parameters=gates.num_parameters(),
        gated_layers=len(gates.layers), gate_stage="mid", compile_backend=ctx.plan.compile_backend,
        inputs=_shapes(inputs),
        variants={}, ratios={},
    )  # fmt: skip
    ctx.echo(f"  {ctx.plan.model} UNet built in {entry['build_s']:.1f} s "
             f"({entry['parameters'] / 1e9:.3f} B parameters, {len(gates.layers)} gated layers)")  # fmt: skip
    ctx.recorder.save()
    kernel_ok: bool | None = None
    for variant in VARIANTS:
        if variant.compiled and "profile" not in entry:  # before compiles eat the budget
            entry["profile"] = profile_part(unet, inputs, gates, ctx, kernel_ok)
        if variant.impl == "kernel" and kernel_ok is None:
            kernel_ok, ctx.kernel_path = register_kernel_path(ctx)
            entry["kernel_path"] = ctx.kernel_path
        _run_variant(unet, inputs, gates, variant, entry, ctx, kernel_ok)
    entry["agreement"] = output_agreement(ctx.outputs)
    ctx.outputs.clear()
    del unet, gates, inputs
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


PROFILED = ("eager_unmasked", "eager_masked_kernel")
PROFILE_TOP = 25


def profile_part(unet, inputs, gates, ctx: RunContext, kernel_ok: bool | None) -> dict[str, Any]:
    """Where one step's time goes: the top kernels (device time; CPU ops on the dry run) of
    the unmasked and the masked kernel-path step, from ``torch.profiler``."""
    reason = ctx.budget.skip_reason("profile", 20.0)
    if reason is not None or kernel_ok is False:
        return {"status": "skipped", "reason": reason or ctx.kernel_path}
    result: dict[str, Any] = {"status": "ok", "top": PROFILE_TOP, "variants": {}}
    try:
        for name in PROFILED:
            variant = VARIANT_BY_NAME[name]
            _configure(unet, gates, variant)
            result["variants"][name] = profile_step(_step_fn(unet, inputs, variant, ctx), ctx)
            ctx.echo(_profile_line(name, result["variants"][name]))
    except Exception as exc:  # a profiler problem must not cost the compile variants
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    ctx.recorder.save()
    return result


def profile_step(step: Callable[[], Any], ctx: RunContext) -> dict[str, Any]:
    """Profile one warm step; kernels by self device time (CPU: ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    step()
    ctx.timer.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        ctx.timer.sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [
        {"name": e.key[:120], "calls": int(e.count), "self_us": float(getattr(e, key, 0.0))}
        for e in prof.key_averages()
    ]
    rows = sorted((r for r in rows if r["self_us"] > 0), key=lambda r: -r["self_us"])
    return {
        "clock": "device" if cuda else "cpu",
        "total_ms": sum(r["self_us"] for r in rows) / 1e3,
        "calls": sum(r["calls"] for r in rows),
        "kernels": rows[:PROFILE_TOP],
    }


def _profile_line(name: str, p: dict[str, Any]) -> str:
    top = ", ".join(f"{r['name'][:40]} {r['self_us'] / 1e3:.2f} ms" for r in p["kernels"][:3])
    return f"  profile {name}: {p['total_ms']:.2f} ms {p['clock']} time in {p['calls']} calls; top: {top}"


def _shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: _shapes(v) if isinstance(v, dict) else list(v.shape) for k, v in inputs.items()}


def _configure(unet: torch.nn.Module, gates: Any, variant: Variant) -> None:
    """Stock processors, or gates (their mode is set per step: :func:`_variant_mode`)."""
    from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

    remove_gates(unet)
    if variant.masked:
        install_gates(unet, GateConfig(stage="mid"), gates=gates)


def _variant_mode(unet: torch.nn.Module, variant: Variant) -> contextlib.AbstractContextManager:
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


def _run_variant(unet, inputs, gates, variant: Variant, entry, ctx: RunContext, kernel_ok) -> None:
    reason = _variant_skip(variant, ctx, kernel_ok)
    if reason is not None:
        entry["variants"][variant.name] = {"status": "skipped", "reason": reason}
        ctx.echo(f"  {variant.name}: skipped ({reason})")
        ctx.recorder.save()
        return
    _configure(unet, gates, variant)
    try:
        step = _step_fn(unet, inputs, variant, ctx)  # built (compiled, captured) once
        row = {"status": "ok", **asdict(variant), **time_variant(step, variant, ctx)}
        if variant.compiled:
            ctx.compile_s = max(ctx.compile_s, row["first_call_s"])
        if variant.name == "eager_masked_reference":
            row["open_fraction"] = _open_fraction(gates, step)
        partner = PARTNER.get(variant.name)
        if not variant.compiled and partner and _ok(entry, partner):
            row["paired"] = paired_ratio(unet, inputs, gates, variant, step, ctx)
    except Exception as exc:  # e.g. a compile failure: record it, keep the other variants
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    entry["variants"][variant.name] = row
    entry["ratios"] = unet_ratios(entry["variants"])
    ctx.echo(_variant_line(variant.name, row))
    ctx.recorder.save()


def _ok(entry: dict[str, Any], variant_name: str) -> bool:
    return entry["variants"].get(variant_name, {}).get("status") == "ok"


def paired_ratio(
    unet, inputs, gates, masked: Variant, masked_step: Callable[[], Any], ctx: RunContext
) -> dict[str, Any]:
    """masked/unmasked from interleaved steps (A B, B A, ...): drift cancels pair by pair."""
    unmasked = VARIANT_BY_NAME[PARTNER[masked.name]]
    _configure(unet, gates, unmasked)  # a graph captures the processors installed now
    steps = {unmasked.name: _step_fn(unet, inputs, unmasked, ctx), masked.name: masked_step}
    ratios = []
    for i in range(ctx.plan.paired_samples):
        times = {}
        for v in (unmasked, masked) if i % 2 == 0 else (masked, unmasked):
            _configure(unet, gates, v)
            times[v.name] = ctx.timer.once_ms(steps[v.name])
        ratios.append(times[masked.name] / times[unmasked.name])
    _configure(unet, gates, masked)
    return {
        "pairs": len(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def _open_fraction(gates, step: Callable[[], Any]) -> dict[str, float]:
    """Fraction of open gate entries per stage in one observed (untimed) step."""
    with gates.mode(observing=True):
        step()
    return gates.open_fractions()


def unet_ratios(variants: dict[str, Any]) -> dict[str, Any]:
    """masked / unmasked step time for each path whose two variants ran."""
    ratios = {}
    for name, (masked, unmasked) in RATIOS.items():
        a, b = variants.get(masked, {}), variants.get(unmasked, {})
        if a.get("status") == "ok" and b.get("status") == "ok":
            ratios[name] = {
                "masked": masked,
                "unmasked": unmasked,
                "ratio_median": a["median_ms"] / b["median_ms"],
                "ratio_min": a["min_ms"] / b["min_ms"],
                "ratio_paired": a.get("paired", {}).get("ratio_median"),
            }
    return ratios


def output_agreement(outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Same-gate paths against each other, compiled vs eager: relative L2 and max abs diff."""
    found = {}
    for name, (a, b) in AGREEMENT.items():
        if a in outputs and b in outputs:
            diff = outputs[a] - outputs[b]
            found[name] = {
                "max_abs_diff": float(diff.abs().max()),
                "rel_l2": float(diff.norm() / outputs[b].norm().clamp_min(1e-30)),
            }
    return found


def _variant_line(name: str, row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"  {name}: {row['status']} ({row.get('error')})"
    mem = row["peak_memory_bytes"]
    mem_text = f", peak {mem / 2**30:.2f} GiB" if mem is not None else ""
    return (
        f"  {name}: median {row['median_ms']:.2f} ms, min {row['min_ms']:.2f} ms over "
        f"{row['samples']} (first call {row['first_call_s']:.1f} s){mem_text}"
    )


# --------------------------------------------------------------------------- verdict


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Targets met or missed (None where not measured or on the dry run) and failed parts."""
    parts = results["parts"]
    kernel, unet = parts.get("kernel", {}), parts.get("unet", {})
    correctness = kernel.get("correctness", {}).get("all_pass")
    fractions = [row["fraction_of_copy"] for row in kernel.get("timing", [])]
    ratios = {path: _kernel_ratio(unet, path) for path in ("eager", "graph", "compile")}
    # Judged on the path a deployment runs: compiled, else CUDA graph, else eager.
    target_path = next((p for p in ("compile", "graph", "eager") if ratios[p]), None)
    ratio = ratios[target_path] if target_path else None
    real = not results["dry_run"]
    failed = [name for name, p in parts.items() if p.get("status") == "failed"]
    failed += [f"unet.{n}" for n, v in unet.get("variants", {}).items() if v["status"] == "failed"]
    return {
        "kernel_correct": correctness,
        "kernel_min_copy_fraction": min(fractions) if fractions else None,
        "kernel_meets_target": (min(fractions) >= TARGET_COPY_FRACTION) if real and fractions else None,
        "unet_ratio_eager_kernel": ratios["eager"],
        "unet_ratio_graph_kernel": ratios["graph"],
        "unet_ratio_compile_kernel": ratios["compile"],
        "unet_target_path": target_path,
        "unet_meets_target": (ratio <= TARGET_UNET_RATIO) if real and ratio else None,
        "failed": failed,
        "ok": not failed and correctness is not False,
        "note": "dry run: CPU timings say nothing about a GPU; targets are judged on a GPU only"
        if not real else "",
    }  # fmt: skip


def _kernel_ratio(unet: dict[str, Any], path: str) -> float | None:
    """masked/unmasked of the kernel path: from interleaved pairs where they ran."""
    r = unet.get("ratios", {}).get(f"{path}_kernel", {})
    return r.get("ratio_paired") or r.get("ratio_median")


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _env_md(env: dict[str, Any]) -> list[str]:
    v = env.get("versions", {})
    mem = env.get("memory_bytes")
    versions = (
        f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, diffusers "
        f"{v.get('diffusers')}, python {env.get('python')}, maskattn-deploy {v.get('maskattn_deploy')}"
    )
    if env.get("device") != "cuda":
        return [f"- device: CPU ({env.get('cpu_count')} cores, {env.get('platform')})", versions]
    return [
        f"- card: {env.get('gpu', 'CPU (dry run)')}, compute capability "
        f"{env.get('compute_capability', '-')}, {env.get('sm_count', '-')} SMs, "
        f"{_fmt(mem / 2**30 if mem else None, '.1f')} GiB, driver {env.get('driver', '-')}, "
        f"CUDA {env.get('torch_cuda_build', '-')}",
        versions,
    ]


def _kernel_md(kernel: dict[str, Any]) -> list[str]:
    corr = kernel.get("correctness")
    lines = []
    if corr:
        worst = corr["worst_max_abs_diff"]
        lines.append(
            f"Correctness: {corr['n_cases'] - len(corr['failed'])}/{corr['n_cases']} cases pass "
            f"(worst max abs diff fp32 {worst['float32']:.2e} <= {ATOL['float32']:.0e}, "
            f"fp16 {worst['float16']:.2e} <= {ATOL['float16']:.0e})"
            + (f"; failed: {', '.join(corr['failed'])}" if corr["failed"] else "")
        )
    tuning = kernel.get("tuning") or {}
    if tuning.get("candidates"):
        keys = list(tuning["candidates"][0]["median_us"])
        lines += ["", f"Tiling (ROWS, num_warps, HEADS) at t = 77, median us per call; default "
                  f"{tuning['default']}, chosen {tuning.get('chosen')} ({tuning['criterion']}):",
                  "", "| rows | warps | heads | correct | " + " | ".join(keys) + " | geomean |",
                  "| ---: | ---: | ---: | --- |" + " ---: |" * (len(keys) + 1)]  # fmt: skip
        for c in tuning["candidates"]:
            cells = " | ".join(f"{c['median_us'][k]:.2f}" for k in keys)
            lines.append(f"| {c['rows']} | {c['num_warps']} | {c.get('heads', 1)} | {c['correct']} | {cells} | "
                         f"{c['geomean_us']:.2f} |")  # fmt: skip
        lines.append("")
    if kernel.get("copy_ceiling"):
        lines.append(f"Copy ceiling: {kernel['copy_ceiling']['gbps']:.0f} GB/s "
                     f"({kernel['copy_ceiling']['bytes'] / 1e6:.0f} MB, read + write)")  # fmt: skip
    if kernel.get("timing"):
        lines += ["", "| shape | dtype | MB moved | kernel us (median/min) | kernel GB/s | copy us | "
                  "copy GB/s | % of copy | reference us | vs reference | floor us |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in kernel["timing"]:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['bytes'] / 1e6:.2f} | "
                f"{r['kernel']['median_us']:.2f} / {r['kernel']['min_us']:.2f} | "
                f"{r['kernel']['gbps']:.0f} | {r['copy']['median_us']:.2f} | {r['copy']['gbps']:.0f} | "
                f"{100 * r['fraction_of_copy']:.0f}% | {r['reference']['median_us']:.2f} | "
                f"{r['speedup_vs_reference']:.1f}x | {_fmt(r.get('floor_us'))} |"
            )
    return lines


def _unet_md(unet: dict[str, Any]) -> list[str]:
    lines = [
        f"Model {unet.get('model')} ({_fmt(unet.get('parameters', 0) / 1e9, '.3f')} B parameters, "
        f"{unet.get('dtype')}), {unet.get('gated_layers')} gated layers (stage mid), inputs "
        f"{unet.get('inputs')}, built in {_fmt(unet.get('build_s'), '.1f')} s; kernel path: "
        f"{unet.get('kernel_path', '-')}; compile backend {unet.get('compile_backend')}",
        "",
        "| variant | status | median ms | min ms | samples | first call s | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in unet.get("variants", {}).items():
        mem = v.get("peak_memory_bytes")
        lines.append(
            f"| {name} | {v['status']}{': ' + v['reason'] if v.get('reason') else ''} | "
            f"{_fmt(v.get('median_ms'))} | {_fmt(v.get('min_ms'))} | {_fmt(v.get('samples'), 'd')} | "
            f"{_fmt(v.get('first_call_s'), '.1f')} | {_fmt(mem / 2**30 if mem else None)} |"
        )
    if unet.get("ratios"):
        lines += ["", "| path | masked / unmasked (median) | (min) | (interleaved pairs) |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for name, r in unet["ratios"].items():
            paired = _fmt(r.get("ratio_paired"), ".3f")
            lines.append(f"| {name} | {r['ratio_median']:.3f} | {r['ratio_min']:.3f} | {paired} |")
    lines += _profile_md(unet.get("profile") or {})
    if unet.get("agreement"):
        lines.append("")
    for name, a in unet.get("agreement", {}).items():
        lines.append(f"- {name}: rel L2 {a['rel_l2']:.2e}, max abs {a['max_abs_diff']:.2e}")
    return lines


def _profile_md(profile: dict[str, Any]) -> list[str]:
    if not profile:
        return []
    if profile["status"] != "ok":
        return [
            "",
            f"Profile: {profile['status']} ({profile.get('reason') or profile.get('error')})",
        ]
    lines = []
    for name, p in profile["variants"].items():
        lines += ["", f"Profile of one `{name}` step: {p['total_ms']:.2f} ms of {p['clock']} time "
                  f"in {p['calls']} calls; top {len(p['kernels'])} by self time:", "",
                  "| kernel / op | calls | self ms |", "| --- | ---: | ---: |"]  # fmt: skip
        for r in p["kernels"]:
            name_cell = r["name"].replace("|", "\\|")
            lines.append(f"| `{name_cell}` | {r['calls']} | {r['self_us'] / 1e3:.3f} |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The human-readable twin of results.json."""
    parts = results["parts"]
    title = "dry run (CPU)" if results["dry_run"] else "GPU run"
    lines = [f"# MaskAttn GPU check: {title}, {results['created_utc']}", ""]
    lines += _env_md(parts.get("environment", {}))
    lines += ["", "| part | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name in PARTS:
        p = parts.get(name, {"status": "not reached"})
        note = p.get("reason") or p.get("error") or ""
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('elapsed_s'), '.1f')} | {note} |")
    if parts.get("kernel", {}).get("status") in ("ok", "failed"):
        lines += ["", "## Kernel", ""] + _kernel_md(parts["kernel"])
    if parts.get("unet", {}).get("variants"):
        lines += ["", "## UNet step (CFG batch 2)", ""] + _unet_md(parts["unet"])
    if "verdict" in results:
        lines += ["", "## Verdict", "", "```", json.dumps(results["verdict"], indent=2), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- orchestration


def _needs_interpreter_child(config: CheckConfig) -> bool:
    from maskattn_deploy._lazy import available

    return config.dry_run and os.environ.get("TRITON_INTERPRET") != "1" and available("triton")


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """``timeout`` sends SIGTERM: turn it into SystemExit so the last results get saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(config: CheckConfig, echo: Echo = print) -> dict[str, Any]:
    """Run every part that fits the budget; returns the results (also written to disk)."""
    ensure_plugins_importable()
    if _needs_interpreter_child(config):
        return _run_in_interpreter_child(config, echo)
    if config.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise BackendUnavailableError(
            "no CUDA GPU is visible: run `maskattn-deploy selftest --dry-run` on a CPU "
            "machine, or run the GPU check on a machine with an NVIDIA GPU"
        )
    plan = DRY_PLAN if config.dry_run else GPU_PLAN
    if plan.cpu_threads:
        torch.set_num_threads(plan.cpu_threads)
    out = Path(config.out) if config.out else default_out_dir(config.dry_run)
    budget = Budget(config.budget_s)
    results = new_results(replace(config, out=str(out)), plan)
    recorder = Recorder(out, results, echo)
    ctx = RunContext(config, plan, device, budget, recorder, Timer(device), echo)
    echo(f"GPU check ({plan.name}) -> {out} (budget {config.budget_s:.0f} s)")
    with _sigterm_as_exit():
        recorder.run_part("environment", lambda e: e.update(environment_info(device)), budget, 0)
        ctx.kernel, ctx.kernel_missing = load_kernel(device)
        recorder.run_part(
            "kernel", lambda e: kernel_part(e, ctx), budget, plan.estimate_s["kernel"]
        )
        recorder.run_part("unet", lambda e: unet_part(e, ctx), budget, plan.estimate_s["unet"])
        results.update(verdict=verdict(results), complete=True,
                       elapsed_s=round(budget.elapsed(), 2))  # fmt: skip
        recorder.save()
    echo(summary_text(results))
    return results


def summary_text(results: dict[str, Any]) -> str:
    """A short table printed last (a lent machine's reply carries only the tail)."""
    lines = ["", "== summary =="]
    for name in PARTS:
        p = results["parts"].get(name, {})
        lines.append(f"{name:<12} {p.get('status', '-'):<8} {_fmt(p.get('elapsed_s'), '.1f'):>7} s")
    for row in results["parts"].get("kernel", {}).get("timing", []):
        lines.append(_kernel_line(row).strip())
    for name, r in results["parts"].get("unet", {}).get("ratios", {}).items():
        lines.append(
            f"unet ratio {name}: {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, "
            f"interleaved {_fmt(r.get('ratio_paired'), '.3f')})"
        )
    lines.append("verdict: " + json.dumps(results.get("verdict", {}), sort_keys=True))
    return "\n".join(lines)


def _package_parent() -> Path:
    import maskattn_deploy

    return Path(maskattn_deploy.__file__).resolve().parent.parent


def _run_in_interpreter_child(config: CheckConfig, echo: Echo) -> dict[str, Any]:
    """Run the dry run in ``python -m`` this module with TRITON_INTERPRET=1 from the start."""
    out = Path(config.out) if config.out else default_out_dir(True)
    child = replace(config, out=str(out.resolve()))
    paths = [str(_package_parent()), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    cmd = [sys.executable, "-m", __name__, json.dumps(asdict(child))]
    started = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(config.budget_s * 2 + 120, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # the parent was interrupted: do not leave the child running
            proc.kill()
    path = out / "results.json"
    if not path.is_file() or path.stat().st_mtime < started - 1.0:  # none, or an old run's
        raise RuntimeError(f"the dry-run child process exited with {code} and wrote no {path}")
    results = json.loads(path.read_text())
    results["child_exit_code"] = code
    return results


def _child_main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # the interpreter's numpy warns on -inf - -inf lanes
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = CheckConfig(**json.loads(argv[0]))
    results = run_check(config, echo=lambda s: print(s, flush=True))
    return 0 if results["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
