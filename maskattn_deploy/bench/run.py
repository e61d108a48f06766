"""``maskattn-deploy bench``: UNet step latency, masking overhead, pipeline latency, memory.

Per backend and shape case:

- UNet step latency of the masked (gated) UNet and of the plain UNet, interleaved repeat by
  repeat on the same backend in the same run (see :mod:`maskattn_deploy.bench.timing`), so the
  masked/unmasked ratio is not skewed by a noisy machine (each timed run follows an untimed one
  of the same variant, so both are measured back to back as in a denoising loop);
- end-to-end pipeline latency (text encoders, UNet steps with CFG, VAE) and images/s;
- peak process RSS during the backend's block, and CUDA peaks on a GPU.

The plain UNet is the same model without gate processors: on torch the gates are removed and
re-installed between repeats (diffusers' stock SDPA processor runs in between); on ONNX
Runtime and TensorRT it is an export of the same model without gates (``--unmasked-export``,
or exported once into the cache for the tiny model and any model named with ``--model``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from maskattn_deploy.bench.config import (
    SDXL_RANDOM,
    BenchConfig,
    BenchSetup,
    Say,
    resolve_setup,
)
from maskattn_deploy.bench.exports import masked_export, open_backend, unmasked_export
from maskattn_deploy.bench.memory import PeakMemory
from maskattn_deploy.bench.results import BenchResult, PipelineBench, TargetCheck, UnetBench
from maskattn_deploy.bench.timing import (
    PairedStats,
    Stats,
    Switched,
    measure,
    measure_interleaved,
)
from maskattn_deploy.errors import UserError
from maskattn_deploy.parity.inputs import ModelDims, ShapeCase, make_feed

log = logging.getLogger(__name__)

# CPU targets (tiny model, batch 2, 256x256; results in benchmarks/cpu.md).
TARGET_ORT_VS_TORCH = 0.8
TARGET_MASK_RATIO = 1.15
# Untimed runs after each masked/unmasked switch, so timed runs are back-to-back steady state
# like a denoising loop (see bench.timing; on two CPU cores the first run after a switch is
# ~1.5x slower for ONNX Runtime, whose other session's threads are still spinning).
SETTLE_RUNS = 1

# Puts a UNet shared by both variants into the masked or the plain variant.
Switches = tuple[Callable[[], None], Callable[[], None]]


def _say_nothing(_: str) -> None:
    pass


def _torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16}[precision]


@dataclass
class _Context:
    """One bench run: its settings, what they resolved to, the results so far, progress."""

    config: BenchConfig
    setup: BenchSetup
    result: BenchResult
    say: Say


# --------------------------------------------------------------------------- entry point


def run_bench(config: BenchConfig, say: Say = _say_nothing, pipe: Any = None) -> BenchResult:
    """Measure every requested backend; ``pipe`` lets a caller pass an already loaded pipeline
    (for example a full-size SDXL built from a config with random weights on a GPU)."""
    from maskattn_deploy.parity.report import machine_line

    start = time.perf_counter()
    setup = resolve_setup(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = _Context(config, setup, BenchResult(machine_line(), _settings(config, setup)), say)
    say(
        f"bench: model {setup.model}, {setup.precision}, cases "
        f"{', '.join(c.label for c in setup.cases)}, {config.repeats} repeats after "
        f"{config.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    for name in dict.fromkeys(config.backends):
        _bench_backend(ctx, name, pipe)
        gc.collect()
    _targets(ctx.result, setup)
    ctx.result.wall_s = time.perf_counter() - start
    return ctx.result


def _settings(config: BenchConfig, setup: BenchSetup) -> dict[str, Any]:
    return {
        "model": setup.model,
        "gates": str(setup.gates) if setup.gates else None,
        "precision": setup.precision,
        "device": str(setup.device),
        "cases": [c.label for c in setup.cases],
        "repeats": config.repeats,
        "warmup": config.warmup,
        "steps": config.steps,
        "e2e_repeats": config.e2e_repeats,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": config.threads,
        "export_dir": str(setup.export_dir) if setup.export_dir else None,
    }


def _bench_backend(ctx: _Context, name: str, pipe: Any) -> None:
    from maskattn_deploy.runtime.base import check_backend_name

    check_backend_name(name)
    # CUDA peaks where the backend's work can touch the GPU (torch only on a CUDA device).
    cuda = torch.cuda.is_available() and (name != "torch" or ctx.setup.device.type == "cuda")
    try:
        with PeakMemory(cuda=cuda) as peak:
            if name == "torch":
                _bench_torch(ctx, pipe)
            else:
                _bench_exported(ctx, name)
    except UserError as exc:
        ctx.result.backends[name] = f"skipped: {exc}"
        ctx.say(f"SKIPPED {name}: {exc}")
        return
    if peak.result is not None:
        ctx.result.memory[name] = peak.result
        ctx.say(f"{'':<7} {name} peak memory: {peak.result.short()}")


# --------------------------------------------------------------------------- torch


def _gate_switches(unet: torch.nn.Module, gates: Any) -> Switches:
    """Install ``gates`` on ``unet`` (masked) or remove them (plain), each when needed."""
    from maskattn_deploy.gating import install_gates, installed_gates, remove_gates

    def masked() -> None:
        if installed_gates(unet) is None:
            install_gates(unet, gates.config, gates)

    def unmasked() -> None:
        remove_gates(unet)
        unet.requires_grad_(False)  # frozen like the gated UNet: the same CPU kernels

    return masked, unmasked


def _bench_torch(ctx: _Context, pipe: Any) -> None:
    from maskattn_deploy.gating import installed_gates
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.runtime.torch_backend import torch_backend

    setup = ctx.setup
    dtype = _torch_dtype(setup.precision)
    if setup.device.type == "cpu" and dtype != torch.float32:
        raise UserError(
            "torch fp16 on the CPU is not a deployment target; use precision fp32",
            params=("precision",),
        )
    if setup.model == SDXL_RANDOM and pipe is None:
        _bench_sdxl_random(ctx, dtype)
        return
    if setup.gates is None and (pipe is None or installed_gates(pipe.unet) is None):
        raise UserError(setup.gates_error)
    if pipe is None:
        pipe = load_pipeline(setup.model, torch_dtype=dtype, device=setup.device)
    gates = installed_gates(pipe.unet) or load_gates(setup.gates, pipe.unet)
    backend = torch_backend(pipe, setup.device, dtype)
    ctx.result.backends["torch"] = f"ran: {backend.runner('unet').describe()}"
    switches = _gate_switches(pipe.unet, gates)
    masked = switches[0]
    try:
        _unet_cases(ctx, "torch", backend, backend, switches)
        masked()
        if ctx.config.end_to_end:
            from maskattn_deploy.runtime.model_info import ModelInfo

            info = ModelInfo.from_pipe(pipe, setup.model, getattr(gates, "checkpoint_sha256", None))
            _pipeline(ctx, "torch", backend, info)
    finally:
        masked()
        backend.release()


def _bench_sdxl_random(ctx: _Context, dtype: torch.dtype) -> None:
    """The SDXL base UNet with random weights and seeded random ``mid`` gates (UNet step only)."""
    from maskattn_deploy.bench.sdxl_config import build_sdxl_unet
    from maskattn_deploy.gating import GateConfig, install_gates
    from maskattn_deploy.runtime.base import Backend
    from maskattn_deploy.runtime.torch_backend import TorchComponentRunner

    setup = ctx.setup
    if setup.device.type != "cuda":
        raise UserError(
            f"model {SDXL_RANDOM} builds the 2.6 B-parameter UNet on a CUDA GPU", params=("model",)
        )
    ctx.say(f"building the SDXL UNet with random {setup.precision} weights on {setup.device}")
    unet = build_sdxl_unet(setup.device, dtype)
    torch.manual_seed(1234)
    gates = install_gates(unet, GateConfig())
    runner = TorchComponentRunner("unet", unet, setup.device, dtype)
    backend = Backend("torch", {"unet": runner}, setup.device)
    backend.pipe = None  # type: ignore[attr-defined]
    ctx.result.backends["torch"] = f"ran: {runner.describe()} (random weights, seeded gates)"
    ctx.result.notes.append(
        f"{SDXL_RANDOM}: SDXL base UNet architecture with random weights and seeded untrained "
        "gates; latency does not depend on the weights' values, the open fraction of the gates "
        "does not change the dense masked-softmax cost"
    )
    switches = _gate_switches(unet, gates)
    try:
        _unet_cases(
            ctx, "torch", backend, backend, switches, dims=ModelDims.from_unet_config(unet.config)
        )
    finally:
        switches[0]()


# --------------------------------------------------------------------------- exported


def _bench_exported(ctx: _Context, name: str) -> None:
    config = ctx.config
    masked_dir = masked_export(ctx.setup, ctx.say)
    backend = open_backend(name, masked_dir, config)
    plain = None
    note = ""
    if config.unmasked:
        try:
            plain_dir = unmasked_export(config, ctx.setup, ctx.say)
            plain = open_backend(name, plain_dir, config, ("unet",))
        except UserError as exc:
            note = f"unmasked not measured: {exc}"
            ctx.say(f"note: {name} {note}")
    ctx.result.backends[name] = f"ran: {backend.runner('unet').describe()}"
    try:
        _unet_cases(ctx, name, backend, plain, note=note)
        if config.end_to_end:
            from maskattn_deploy.runtime.model_info import ModelInfo

            _pipeline(ctx, name, backend, ModelInfo.from_export(masked_dir))
    finally:
        backend.release()
        if plain is not None:
            plain.release()


# --------------------------------------------------------------------------- measurements


def _feed(case: ShapeCase, backend: Any, dims: ModelDims) -> dict[str, Any]:
    feed = make_feed("unet", case, dims, seed=0)
    return {k: v.to(backend.device) for k, v in feed.items()}


def _unet_dims(model: str, pipe: Any = None) -> ModelDims:
    """UNet feed widths from the UNet config (of ``pipe``, or read without loading weights)."""
    if pipe is not None:
        return ModelDims.from_unet_config(pipe.unet.config)
    from diffusers import UNet2DConditionModel

    from maskattn_deploy.models.loader import BUILT_IN

    source = str(BUILT_IN[model]()) if model in BUILT_IN else model  # tiny, tiny-fitted
    try:  # a local diffusers folder or a hub id (HF cache / network)
        config = UNet2DConditionModel.load_config(source, subfolder="unet")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the UNet config of {model}: {exc}") from exc
    return ModelDims.from_unet_config(config)


def _unet_cases(
    ctx: _Context,
    name: str,
    backend: Any,
    plain: Any,
    switches: Switches | None = None,
    note: str = "",
    dims: ModelDims | None = None,
) -> None:
    """UNet step latency per shape case: masked and ``plain`` interleaved when there is a plain
    UNet (``plain`` may be ``backend`` itself, put into each variant by ``switches``), else
    masked only with ``note`` saying why."""
    config = ctx.config
    dims = dims or _unet_dims(ctx.setup.model, getattr(backend, "pipe", None))
    for case in ctx.setup.cases:
        feed = _feed(case, backend, dims)

        def run_masked(feed: dict[str, Any] = feed) -> None:
            backend.run("unet", feed)

        def run_plain(feed: dict[str, Any] = feed) -> None:
            (plain or backend).run("unet", feed)

        if plain is not None and config.unmasked:
            to_masked, to_plain = switches or (_noop, _noop)
            paired = measure_interleaved(
                Switched(run_masked, to_masked),
                Switched(run_plain, to_plain),
                config.repeats,
                config.warmup,
                backend.synchronize,
                settle=SETTLE_RUNS,
            )
            entry = UnetBench(name, case.label, paired.a, paired.b, paired.ratio)
            if backend.device.type == "cpu":
                entry.cpu_ratio = paired.cpu_ratio
            _log_paired(name, case, paired, ctx.say)
        else:
            stats = measure(run_masked, config.repeats, config.warmup, backend.synchronize)
            entry = UnetBench(name, case.label, stats, note=note)
            ctx.say(f"{'':<7} {name} UNet {case.label}: masked {stats.ms()} ms")
        entry.runner = backend.runner("unet").describe()
        entry.note = entry.note or note
        ctx.result.unet.append(entry)


def _noop() -> None:
    pass


def _log_paired(name: str, case: ShapeCase, paired: PairedStats, say: Say) -> None:
    cpu = f" (CPU time {paired.cpu_ratio:.3f})" if paired.cpu_ratio is not None else ""
    say(
        f"{'':<7} {name} UNet {case.label}: masked {paired.a.ms()} ms, unmasked "
        f"{paired.b.ms()} ms, masked/unmasked {paired.ratio:.3f}{cpu}"
    )


def _pipeline(ctx: _Context, name: str, backend: Any, info: Any) -> None:
    from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline

    config = ctx.config
    case = ctx.setup.cases[0]
    gen = GenerateConfig(
        prompt=config.prompt,
        steps=config.steps,
        seed=config.seed,
        height=case.height,
        width=case.width,
        num_images=max(1, case.batch // 2),
    )
    pipeline = Pipeline(backend, info)
    pipeline.generate(gen, progress=False)  # warm-up (also loads lazily created sessions)
    runs = [pipeline.generate(gen, progress=False).timings for _ in range(config.e2e_repeats)]
    total = Stats(tuple(t.total_s for t in runs))
    median = sorted(runs, key=lambda t: t.total_s)[len(runs) // 2]
    bench = PipelineBench(
        name,
        case.label,
        config.steps,
        gen.num_images,
        total,
        median.text_encoders_s * 1e3,
        median.unet_per_step_s * 1e3,
        median.vae_s * 1e3,
    )
    ctx.result.pipeline.append(bench)
    ctx.say(
        f"{'':<7} {name} pipeline {case.label}, {config.steps} steps: {total.ms()} ms, "
        f"{bench.images_per_s:.2f} images/s"
    )


def _targets(result: BenchResult, setup: BenchSetup) -> None:
    """The issue's CPU targets, evaluated where this run measured both sides."""
    by = {(u.backend, u.case): u for u in result.unet}
    scope = f"{setup.device.type}, {setup.precision}"
    for (backend, case), entry in by.items():
        if entry.ratio is not None:
            result.targets.append(
                TargetCheck(
                    f"{backend} masked/unmasked UNet step ({case})",
                    entry.ratio,
                    TARGET_MASK_RATIO,
                    scope,
                )
            )
        torch_entry = by.get(("torch", case))
        if backend == "onnxruntime" and torch_entry is not None:
            value = entry.masked.median / torch_entry.masked.median
            result.targets.append(
                TargetCheck(
                    f"onnxruntime / torch eager UNet step ({case})",
                    value,
                    TARGET_ORT_VS_TORCH,
                    scope,
                )
            )
