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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.bench.memory import MemoryPeak, PeakMemory
from maskattn_deploy.bench.timing import (
    PairedStats,
    Stats,
    Switched,
    measure,
    measure_interleaved,
)
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportFolder, ExportManifest
from maskattn_deploy.parity.inputs import ModelDims, ShapeCase, default_case, make_feed

log = logging.getLogger(__name__)

Say = Callable[[str], None]
TINY = "tiny"
# Full-size SDXL UNet with random weights built on the GPU (no download): UNet step only.
SDXL_RANDOM = "sdxl-random"
DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")
# CPU targets (tiny model, batch 2, 256x256; results in benchmarks/cpu.md).
TARGET_ORT_VS_TORCH = 0.8
TARGET_MASK_RATIO = 1.15
# Untimed runs after each masked/unmasked switch, so timed runs are back-to-back steady state
# like a denoising loop (see bench.timing; on two CPU cores the first run after a switch is
# ~1.5x slower for ONNX Runtime, whose other session's threads are still spinning).
SETTLE_RUNS = 1


@dataclass
class BenchConfig:
    """What to measure (the CLI builds it from flags)."""

    export_dir: Path | None = None
    unmasked_export_dir: Path | None = None
    model: str | None = None  # default: the export's model, else tiny
    gates: Path | None = None  # default: the export's gates, else tiny's seeded gates
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    shapes: list[ShapeCase] | None = None
    precision: str | None = None  # default: the export's, else fp16 on CUDA / fp32 on CPU
    repeats: int = 10
    warmup: int = 2
    steps: int = 4  # end-to-end denoising steps
    e2e_repeats: int = 3
    end_to_end: bool = True
    unmasked: bool = True
    export_unmasked: bool = True  # may export the plain UNet into the cache when none is given
    threads: int | None = None
    device: str | None = None
    ort_provider: str = "auto"
    prompt: str = "a red circle left of a blue square"
    seed: int = 0


@dataclass
class UnetBench:
    """UNet step latency of one backend on one shape case."""

    backend: str
    case: str
    masked: Stats
    unmasked: Stats | None = None
    ratio: float | None = None  # masked / unmasked, median of interleaved pairs
    cpu_ratio: float | None = None  # the same in process CPU time (shared-CPU robust)
    runner: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case,
            "runner": self.runner,
            "masked": self.masked.as_dict(),
            "unmasked": self.unmasked.as_dict() if self.unmasked else None,
            "masked_over_unmasked": self.ratio,
            "masked_over_unmasked_cpu_time": self.cpu_ratio,
            "note": self.note,
        }


@dataclass
class PipelineBench:
    """End-to-end latency of one backend (masked model, CFG)."""

    backend: str
    case: str
    steps: int
    images: int
    total: Stats
    text_encoders_ms: float
    unet_step_ms: float
    vae_ms: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.total.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case,
            "steps": self.steps,
            "images": self.images,
            "total": self.total.as_dict(),
            "images_per_s": self.images_per_s,
            "text_encoders_ms": self.text_encoders_ms,
            "unet_step_ms": self.unet_step_ms,
            "vae_ms": self.vae_ms,
        }


@dataclass
class TargetCheck:
    """One performance target and whether this run met it."""

    name: str
    value: float
    limit: float
    scope: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "met": self.met,
            "scope": self.scope,
        }


@dataclass
class BenchResult:
    """Everything one bench run measured."""

    machine: str
    settings: dict[str, Any]
    backends: dict[str, str] = field(default_factory=dict)  # name -> "ran: ..." / "skipped: why"
    unet: list[UnetBench] = field(default_factory=list)
    pipeline: list[PipelineBench] = field(default_factory=list)
    memory: dict[str, MemoryPeak] = field(default_factory=dict)
    targets: list[TargetCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "backends": self.backends,
            "unet": [u.as_dict() for u in self.unet],
            "pipeline": [p.as_dict() for p in self.pipeline],
            "memory": {k: m.as_dict() for k, m in self.memory.items()},
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
            "wall_s": self.wall_s,
        }


def _say_nothing(_: str) -> None:
    pass


# --------------------------------------------------------------------------- setup


@dataclass
class _Setup:
    model: str
    gates: Path | None
    precision: str
    device: torch.device
    export_dir: Path | None
    manifest: ExportManifest | None
    cases: list[ShapeCase]
    gates_error: str = ""  # why the torch backend has no gates (exports carry their own)


def _resolve(config: BenchConfig, say: Say) -> _Setup:
    folder = ExportFolder.open(config.export_dir) if config.export_dir is not None else None
    manifest = folder.manifest if folder is not None else None
    model = config.model or (manifest.model.spec if manifest else None) or TINY
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = (
        config.precision
        or (manifest.precision if manifest else None)
        or ("fp16" if device.type == "cuda" else "fp32")
    )
    if precision not in ("fp32", "fp16"):
        raise UserError(
            f"precision {precision} is not supported; choose fp32 or fp16", params=("precision",)
        )
    gates, gates_error = config.gates, ""
    if gates is not None:
        from maskattn_deploy.gating.checkpoint import read_checkpoint

        read_checkpoint(gates)  # a missing or malformed --gates is refused before any backend
    if gates is None and folder is not None and folder.manifest.gates_sha256:
        gates = folder.find_gates(model=model)
        if gates is None:
            gates_error = (
                f"{folder.path} was exported with gates, but they are not in the export folder "
                "or at the recorded path; pass the same checkpoint with --gates"
            )
    if gates is None and model == TINY and manifest is None:
        from maskattn_deploy.models.tiny import tiny_default_gates_dir

        gates = tiny_default_gates_dir()
    if gates is None and not gates_error:
        gates_error = f"no gates for model {model}: pass --gates CKPT"
    cases = config.shapes or [default_case(manifest)]
    return _Setup(model, gates, precision, device, config.export_dir, manifest, cases, gates_error)


def _torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------- entry point


def run_bench(config: BenchConfig, say: Say = _say_nothing, pipe: Any = None) -> BenchResult:
    """Measure every requested backend; ``pipe`` lets a caller pass an already loaded pipeline
    (for example a full-size SDXL built from a config with random weights on a GPU)."""
    from maskattn_deploy.parity.report import machine_line

    start = time.perf_counter()
    if config.repeats < 1 or config.warmup < 0 or config.steps < 1:
        raise UserError(
            "repeats and steps must be >= 1 and warmup >= 0",
            params=("repeats", "steps", "warmup"),
        )
    setup = _resolve(config, say)
    if config.threads:
        torch.set_num_threads(config.threads)
    result = BenchResult(machine_line(), _settings(config, setup))
    say(
        f"bench: model {setup.model}, {setup.precision}, cases "
        f"{', '.join(c.label for c in setup.cases)}, {config.repeats} repeats after "
        f"{config.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    for name in dict.fromkeys(config.backends):
        _bench_backend(name, config, setup, result, say, pipe)
        gc.collect()
    _targets(result, setup)
    result.wall_s = time.perf_counter() - start
    return result


def _settings(config: BenchConfig, setup: _Setup) -> dict[str, Any]:
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


def _bench_backend(
    name: str, config: BenchConfig, setup: _Setup, result: BenchResult, say: Say, pipe: Any
) -> None:
    from maskattn_deploy.runtime.base import check_backend_name

    check_backend_name(name)
    # CUDA peaks where the backend's work can touch the GPU (torch only on a CUDA device).
    cuda = torch.cuda.is_available() and (name != "torch" or setup.device.type == "cuda")
    try:
        with PeakMemory(cuda=cuda) as peak:
            if name == "torch":
                _bench_torch(config, setup, result, say, pipe)
            else:
                _bench_exported(name, config, setup, result, say)
    except UserError as exc:
        result.backends[name] = f"skipped: {exc}"
        say(f"SKIPPED {name}: {exc}")
        return
    if peak.result is not None:
        result.memory[name] = peak.result
        say(f"{'':<7} {name} peak memory: {peak.result.short()}")


# --------------------------------------------------------------------------- torch


def _bench_torch(
    config: BenchConfig, setup: _Setup, result: BenchResult, say: Say, pipe: Any
) -> None:
    from maskattn_deploy.gating import install_gates, installed_gates, remove_gates
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.runtime.torch_backend import torch_backend

    dtype = _torch_dtype(setup.precision)
    if setup.device.type == "cpu" and dtype != torch.float32:
        raise UserError(
            "torch fp16 on the CPU is not a deployment target; use precision fp32",
            params=("precision",),
        )
    if setup.model == SDXL_RANDOM and pipe is None:
        _bench_sdxl_random(config, setup, result, say, dtype)
        return
    if setup.gates is None and (pipe is None or installed_gates(pipe.unet) is None):
        raise UserError(setup.gates_error)
    if pipe is None:
        pipe = load_pipeline(setup.model, torch_dtype=dtype, device=setup.device)
    gates = installed_gates(pipe.unet) or load_gates(setup.gates, pipe.unet)
    backend = torch_backend(pipe, setup.device, dtype)
    result.backends["torch"] = f"ran: {backend.runner('unet').describe()}"

    def masked() -> None:
        if installed_gates(pipe.unet) is None:
            install_gates(pipe.unet, gates.config, gates)

    def unmasked() -> None:
        remove_gates(pipe.unet)
        pipe.unet.requires_grad_(False)  # frozen like the gated UNet: the same CPU kernels

    try:
        _unet_cases("torch", backend, backend, config, setup, result, say, (masked, unmasked))
        masked()
        if config.end_to_end:
            from maskattn_deploy.runtime.model_info import ModelInfo

            info = ModelInfo.from_pipe(pipe, setup.model, getattr(gates, "checkpoint_sha256", None))
            _pipeline("torch", backend, info, config, setup, result, say)
    finally:
        masked()
        backend.release()


def _bench_sdxl_random(
    config: BenchConfig, setup: _Setup, result: BenchResult, say: Say, dtype: torch.dtype
) -> None:
    """The SDXL base UNet with random weights and seeded random ``mid`` gates (UNet step only)."""
    from maskattn_deploy.bench.sdxl_config import build_sdxl_unet
    from maskattn_deploy.gating import GateConfig, install_gates, installed_gates, remove_gates
    from maskattn_deploy.runtime.base import Backend
    from maskattn_deploy.runtime.torch_backend import TorchComponentRunner

    if setup.device.type != "cuda":
        raise UserError(
            f"model {SDXL_RANDOM} builds the 2.6 B-parameter UNet on a CUDA GPU", params=("model",)
        )
    say(f"building the SDXL UNet with random {setup.precision} weights on {setup.device}")
    unet = build_sdxl_unet(setup.device, dtype)
    torch.manual_seed(1234)
    gates = install_gates(unet, GateConfig())
    runner = TorchComponentRunner("unet", unet, setup.device, dtype)
    backend = Backend("torch", {"unet": runner}, setup.device)
    backend.pipe = None  # type: ignore[attr-defined]
    result.backends["torch"] = f"ran: {runner.describe()} (random weights, seeded gates)"
    result.notes.append(
        f"{SDXL_RANDOM}: SDXL base UNet architecture with random weights and seeded untrained "
        "gates; latency does not depend on the weights' values, the open fraction of the gates "
        "does not change the dense masked-softmax cost"
    )

    def masked() -> None:
        if installed_gates(unet) is None:
            install_gates(unet, gates.config, gates)

    def unmasked() -> None:
        remove_gates(unet)
        unet.requires_grad_(False)  # frozen like the gated UNet

    dims = ModelDims.from_unet_config(unet.config)
    try:
        _unet_cases(
            "torch", backend, backend, config, setup, result, say, (masked, unmasked), dims=dims
        )
    finally:
        masked()


# --------------------------------------------------------------------------- exported


def _bench_exported(
    name: str, config: BenchConfig, setup: _Setup, result: BenchResult, say: Say
) -> None:
    masked_dir = _masked_export(setup, say)
    backend = _open(name, masked_dir, config, say)
    plain = None
    note = ""
    if config.unmasked:
        try:
            plain = _open(name, _unmasked_export(config, setup, say), config, say, ("unet",))
        except UserError as exc:
            note = f"unmasked not measured: {exc}"
            say(f"note: {name} {note}")
    result.backends[name] = f"ran: {backend.runner('unet').describe()}"
    try:
        _unet_cases(name, backend, plain, config, setup, result, say, note=note)
        if config.end_to_end:
            from maskattn_deploy.runtime.model_info import ModelInfo

            _pipeline(name, backend, ModelInfo.from_export(masked_dir), config, setup, result, say)
    finally:
        backend.release()
        if plain is not None:
            plain.release()


def _open(
    name: str,
    export_dir: Path,
    config: BenchConfig,
    say: Say,
    components: tuple[str, ...] | None = None,
) -> Any:
    from maskattn_deploy.runtime.base import PIPELINE_COMPONENTS

    manifest = ExportFolder.open(export_dir).manifest
    wanted = components or (PIPELINE_COMPONENTS if config.end_to_end else ("unet",))
    if name == "onnxruntime":
        from maskattn_deploy.runtime.ort_backend import ort_backend

        return ort_backend(export_dir, manifest, config.ort_provider, wanted, config.threads)
    from maskattn_deploy.runtime.trt_backend import trt_backend

    return trt_backend(export_dir, manifest, wanted)


def _masked_export(setup: _Setup, say: Say) -> Path:
    if setup.export_dir is not None:
        return setup.export_dir
    if setup.model == SDXL_RANDOM:
        raise UserError(
            f"{SDXL_RANDOM} is a torch-only UNet benchmark; for onnxruntime/tensorrt pass an "
            "SDXL export folder (maskattn-deploy export --model SDXL --fp16 ...)"
        )
    if setup.model != TINY:
        raise UserError(
            f"onnxruntime/tensorrt run an export folder: maskattn-deploy export --model "
            f"{setup.model} --gates CKPT --out DIR, then pass DIR to bench"
        )
    from maskattn_deploy.runtime.api import ensure_tiny_export

    path, _ = ensure_tiny_export(setup.gates, say, setup.precision)
    return path


def _unmasked_export(config: BenchConfig, setup: _Setup, say: Say) -> Path:
    """The same UNet exported without gates: given, or exported once into the cache.

    Same recipe (so the same dynamic axes and opset) and precision as the masked export; only
    the UNet is exported, without validation (parity is the validation). The cache key holds the
    UNet fingerprint, precision, recipe name and graph revision.
    """
    if config.unmasked_export_dir is not None:
        return config.unmasked_export_dir
    from maskattn_deploy.export import export_unet
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.runtime.api import exports_cache_dir, model_fingerprint
    from maskattn_deploy.utils import build_once

    recipe = setup.manifest.recipe if setup.manifest is not None else TINY
    name = recipe.get("name", "custom") if isinstance(recipe, dict) else recipe
    target = exports_cache_dir(
        f"{model_fingerprint(setup.model)}-unet-nogates-{setup.precision}-{name}"
    )
    if not ExportFolder.exists(target) and not config.export_unmasked:
        raise UserError(
            "no plain-UNet export in the cache; run maskattn-deploy bench (it exports one "
            "once) or pass --unmasked-export DIR"
        )

    def export() -> None:
        say(
            f"exporting the {setup.model} UNet without gates into {target} (one-time, for the ratio)"
        )
        pipe = load_pipeline(setup.model)
        export_unet(
            pipe.unet,
            target,
            fp16=setup.precision == "fp16",
            recipe=recipe,
            overwrite=True,
            validate=False,
            inplace=True,
            source=setup.model,
            progress=say,
        )

    build_once(target, ExportFolder.exists, export, say)
    return target


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
    name: str,
    backend: Any,
    plain: Any,
    config: BenchConfig,
    setup: _Setup,
    result: BenchResult,
    say: Say,
    switches: tuple[Callable[[], None], Callable[[], None]] | None = None,
    note: str = "",
    dims: ModelDims | None = None,
) -> None:
    dims = dims or _unet_dims(setup.model, getattr(backend, "pipe", None))
    for case in setup.cases:
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
            _log_paired(name, case, paired, say)
        else:
            stats = measure(run_masked, config.repeats, config.warmup, backend.synchronize)
            entry = UnetBench(name, case.label, stats, note=note)
            say(f"{'':<7} {name} UNet {case.label}: masked {stats.ms()} ms")
        entry.runner = backend.runner("unet").describe()
        entry.note = entry.note or note
        result.unet.append(entry)


def _noop() -> None:
    pass


def _log_paired(name: str, case: ShapeCase, paired: PairedStats, say: Say) -> None:
    cpu = f" (CPU time {paired.cpu_ratio:.3f})" if paired.cpu_ratio is not None else ""
    say(
        f"{'':<7} {name} UNet {case.label}: masked {paired.a.ms()} ms, unmasked "
        f"{paired.b.ms()} ms, masked/unmasked {paired.ratio:.3f}{cpu}"
    )


def _pipeline(
    name: str,
    backend: Any,
    info: Any,
    config: BenchConfig,
    setup: _Setup,
    result: BenchResult,
    say: Say,
) -> None:
    from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline

    case = setup.cases[0]
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
    result.pipeline.append(bench)
    say(
        f"{'':<7} {name} pipeline {case.label}, {config.steps} steps: {total.ms()} ms, "
        f"{bench.images_per_s:.2f} images/s"
    )


def _targets(result: BenchResult, setup: _Setup) -> None:
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
