"""``maskattn-deploy parity``: every backend against the PyTorch fp32 reference.

For each shape case and component, the same seeded inputs go through the reference (the
diffusers modules of the exported model with the exported gates installed, fp32) and through
each backend; every output gets a verdict from the tolerance table. On the UNet, when the
export carries per-layer outputs (``export --per-layer``), each gated layer's mask is checked
for gate agreement and the layers are walked in execution order to name the first one whose
attention probabilities leave tolerance. Finally an end-to-end run with the same seed on each
backend is compared image to image (PSNR, max pixel difference).

Backends that cannot run here (no TensorRT, no GPU, no engines) are reported as SKIPPED with the
reason; they never count as passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.checks import check_int
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import COMPONENT_IO
from maskattn_deploy.export.folder import ExportFolder, ExportManifest
from maskattn_deploy.export.spec import PER_LAYER_OUTPUT_PREFIX
from maskattn_deploy.parity.compare import (
    OutputVerdict,
    compare_images,
    compare_output,
    compare_outputs,
)
from maskattn_deploy.parity.gates import gate_agreement, mask_from_probs
from maskattn_deploy.parity.inputs import (
    ModelDims,
    ShapeCase,
    check_cases_for_export,
    check_shape_cases,
    default_case,
    make_feed,
)
from maskattn_deploy.parity.reference import Reference, load_reference
from maskattn_deploy.parity.results import BackendStatus, Localisation, ParityResult
from maskattn_deploy.parity.tolerances import (
    PROBS,
    gate_margin_for,
    image_tolerance_for,
    tolerance_for,
)
from maskattn_deploy.runtime.limits import MAX_SEED, MAX_STEPS

log = logging.getLogger(__name__)

Say = Callable[[str], None]
DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")
E2E_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


@dataclass
class ParityConfig:
    """What to compare (the CLI builds it from flags)."""

    export_dir: Path
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    components: tuple[str, ...] | None = None  # None: every exported component
    shapes: list[ShapeCase] | None = None  # None: the recipe's optimum shape
    per_layer: bool = False  # require per-layer outputs (fail if the export has none)
    end_to_end: bool = True
    steps: int = 4
    prompt: str = "a red circle left of a blue square"
    seed: int = 0
    model: str | None = None  # override the model spec recorded in the manifest
    gates: Path | None = None  # override the gates recorded in the manifest
    device: str | None = None
    ort_provider: str = "auto"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_shape_cases(self.shapes)


def _say_nothing(_: str) -> None:
    pass


def run_parity(config: ParityConfig, say: Say = _say_nothing) -> ParityResult:
    """Run every comparison ``config`` asks for and return the verdicts (never raises on FAIL)."""
    from maskattn_deploy.runtime.base import check_backend_name

    start = time.perf_counter()
    for name in config.backends:  # before minutes of loading: a typo fails at once
        check_backend_name(name)
    if config.shapes:  # before minutes of loading too
        check_cases_for_export(config.shapes, ExportFolder.open(config.export_dir))
    ref = load_reference(config.export_dir, config.model, config.gates, config.device)
    manifest, precision = ref.manifest, ref.precision
    components = _components(config, manifest)
    cases = config.shapes or [default_case(manifest)]
    result = ParityResult(
        export_dir=str(config.export_dir),
        precision=precision,
        reference=ref.describe(),
        cases=[c.label for c in cases],
        components=components,
        settings={"seed": config.seed, "steps": config.steps, "prompt": config.prompt},
    )
    say(f"reference: {ref.describe()}; precision {precision}; cases {', '.join(result.cases)}")
    backends = _open_backends(config, ref, components, result)
    for line in result.backends:
        say(str(line))
    try:
        for case in cases:
            _compare_case(config, ref, backends, case, components, result, say)
        if config.end_to_end:
            _compare_images(config, ref, backends, cases[0], result, say)
    finally:
        for backend in backends.values():
            backend.release()
    result.wall_s = time.perf_counter() - start
    return result


def _components(config: ParityConfig, manifest: ExportManifest) -> list[str]:
    exported = [name for name in COMPONENT_IO if name in manifest.components]
    if config.components is None:
        return exported
    unknown = [c for c in config.components if c not in COMPONENT_IO]
    if unknown:
        raise UserError(
            f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENT_IO)}"
        )
    missing = [c for c in config.components if c not in exported]
    if missing:
        raise UserError(
            f"{config.export_dir} has no {', '.join(missing)}; exported: {', '.join(exported)}"
        )
    return list(config.components)


# --------------------------------------------------------------------------- backends


def _open_backends(
    config: ParityConfig, ref: Reference, components: list[str], result: ParityResult
) -> dict[str, Any]:
    """Backends to compare; unavailable ones become SKIPPED statuses with the reason."""
    from maskattn_deploy.runtime.base import check_backend_name

    opened: dict[str, Any] = {}
    wanted = tuple(dict.fromkeys(config.backends))
    needed = tuple(dict.fromkeys(components + (list(E2E_COMPONENTS) if config.end_to_end else [])))
    for name in wanted:
        check_backend_name(name)
        try:
            backend = _make_backend(name, config, ref, needed, components)
        except UserError as exc:  # missing package, GPU, engine: a reason, not a crash
            result.backends.append(BackendStatus(name, "skipped", str(exc)))
            continue
        if backend is None:
            result.backends.append(
                BackendStatus(name, "reference", f"{ref.describe()}, the oracle")
            )
            continue
        opened[name] = backend
        result.backends.append(BackendStatus(name, "ran", detail=backend.describe()))
    return opened


def _make_backend(
    name: str,
    config: ParityConfig,
    ref: Reference,
    needed: tuple[str, ...],
    components: list[str],
) -> Any:
    export_dir, manifest = config.export_dir, ref.manifest
    available = tuple(c for c in needed if c in manifest.components)
    if name == "torch":
        return ref.torch_at_precision()
    if name == "onnxruntime":
        from maskattn_deploy.runtime.ort_backend import ort_backend

        return ort_backend(export_dir, manifest, config.ort_provider, available).activate(
            components
        )
    from maskattn_deploy.runtime.trt_backend import trt_backend

    return trt_backend(export_dir, manifest, available)


def _run_all_outputs(backend: Any, component: str, feed: dict[str, Any]) -> dict[str, Any]:
    """Run a component and return every output, per-layer probabilities included.

    ONNX Runtime is asked for every output its graph has (``probs/<layer>`` of ``--per-layer``
    exports); TensorRT engines return all of theirs; a torch backend at another precision
    records its gated layers the way the reference does.
    """
    runner = backend.runner(component)
    runner.activate()
    if hasattr(runner, "use_all_outputs"):  # ONNX Runtime: ask for the extra outputs too
        runner.use_all_outputs()
    gates = getattr(backend, "gates", None)
    if component == "unet" and gates is not None and getattr(backend, "pipe", None) is not None:
        from maskattn_deploy.export.spec import per_layer_output
        from maskattn_deploy.parity.capture import capture_gated_layers

        with capture_gated_layers(backend.pipe.unet, gates) as record:
            out = dict(runner.infer(feed))
        out.update({per_layer_output(r.layer): r.probs for r in record.records})
        return out
    return runner.infer(feed)


# --------------------------------------------------------------------------- components


def _compare_case(
    config: ParityConfig,
    ref: Reference,
    backends: dict[str, Any],
    case: ShapeCase,
    components: list[str],
    result: ParityResult,
    say: Say,
) -> None:
    dims = ModelDims.from_pipe(ref.pipe)
    for component in components:
        feed = make_feed(component, case, dims, config.seed)
        tic = time.perf_counter()
        expected, capture = ref.run(component, feed, capture=component == "unet")
        say(f"{'':<7} {component} {case.label}: reference in {time.perf_counter() - tic:.1f}s")
        tolerance = tolerance_for(component, _component_precision(ref, component))
        for name, backend in backends.items():
            try:
                actual = _run_all_outputs(backend, component, feed)
            except UserError as exc:
                result.errors.append(f"{component} [{name} {case.label}]: {exc}")
                say(f"FAIL    {component} [{name} {case.label}]: {exc}")
                continue
            for verdict in compare_outputs(
                component, name, actual, expected, tolerance, case.label
            ):
                result.outputs.append(verdict)
                say(str(verdict))
            if component == "unet":
                _layers(config, ref, name, actual, capture, case, result, say)


def _component_precision(ref: Reference, component: str) -> str:
    """The precision a component was exported in (the VAE stays fp32 in fp16 exports)."""
    return ref.manifest.component_precision(component)


# --------------------------------------------------------------------------- per layer


def _layers(
    config: ParityConfig,
    ref: Reference,
    backend: str,
    actual: dict[str, Any],
    capture: Any,
    case: ShapeCase,
    result: ParityResult,
    say: Say,
) -> None:
    """Gate agreement and localisation from the ``probs/<layer>`` outputs, when present."""
    from maskattn_deploy.runtime.masks import layer_grid

    layer_outputs = {
        k[len(PER_LAYER_OUTPUT_PREFIX) :]: v
        for k, v in actual.items()
        if k.startswith(PER_LAYER_OUTPUT_PREFIX)
    }
    if not layer_outputs:
        note = (
            f"the {backend} UNet has no per-layer outputs, so gate agreement and localisation "
            "were not checked (export with --per-layer to enable them)"
        )
        if config.per_layer:
            result.errors.append(f"--per-layer: {note}")
        elif note not in result.gates_note:
            result.gates_note = note
        result.localisation.append(Localisation(backend, case.label, note=note))
        say(f"SKIPPED gates/localisation [{backend}]: {note}")
        return
    precision = _component_precision(ref, "unet")
    margin = gate_margin_for(precision).margin
    tolerance = tolerance_for(PROBS, precision)
    loc = Localisation(backend, case.label)
    for record in capture.records:  # execution order
        probs = layer_outputs.get(record.layer)
        if probs is None:
            result.errors.append(f"{backend}: no per-layer output for gated layer {record.layer}")
            continue
        probs = torch.as_tensor(probs).float().cpu()
        grid = layer_grid(record.gate_logits.shape[1], case.latent_hw)
        agreement = gate_agreement(
            record.layer,
            backend,
            record.gate_logits,
            mask_from_probs(probs),
            record.threshold,
            margin,
            grid,
            case.label,
        )
        result.gates.append(agreement)
        say(str(agreement))
        loc.layers.append(_layer_verdict(record, probs, agreement, backend, tolerance, case))
    result.localisation.append(loc)
    say(str(loc))


def _layer_verdict(
    record: Any, probs: torch.Tensor, agreement: Any, backend: str, tolerance: Any, case: ShapeCase
) -> OutputVerdict:
    """Probabilities of one layer vs the reference, rows with tolerated flips left out."""
    expected, actual = record.probs.float(), probs
    rows = agreement.flipped_rows  # [b, n]
    if rows is not None and rows.any() and expected.shape == actual.shape:
        keep = ~rows[:, None, :, None]  # broadcast over heads and text tokens
        expected = expected * keep
        actual = actual * keep
    return compare_output("unet", record.layer, backend, actual, expected, tolerance, case.label)


# --------------------------------------------------------------------------- images


def _compare_images(
    config: ParityConfig,
    ref: Reference,
    backends: dict[str, Any],
    case: ShapeCase,
    result: ParityResult,
    say: Say,
) -> None:
    """Same prompt and seed on the reference and each backend; compare the final images."""
    missing = [c for c in E2E_COMPONENTS if c not in ref.manifest.components]
    if missing:
        result.images_note = f"end-to-end run skipped: the export has no {', '.join(missing)}"
        say(f"SKIPPED image: {result.images_note}")
        return
    from maskattn_deploy.runtime.pipeline import GenerateConfig

    gen = GenerateConfig(
        prompt=config.prompt,
        steps=config.steps,
        seed=config.seed,
        height=case.height,
        width=case.width,
        num_images=max(1, case.batch // 2),
    )
    tic = time.perf_counter()
    expected = ref.generate(gen)
    say(f"{'':<7} end to end: reference {config.steps} steps in {time.perf_counter() - tic:.1f}s")
    tolerance = image_tolerance_for(ref.precision)
    for name, backend in backends.items():
        try:
            images = ref.generate_on(backend, gen)
        except UserError as exc:
            result.errors.append(f"end to end [{name}]: {exc}")
            say(f"FAIL    end to end [{name}]: {exc}")
            continue
        verdict = compare_images(name, images, expected, tolerance)
        result.images.append(verdict)
        say(str(verdict))
