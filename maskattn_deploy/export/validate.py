"""Validation of a written component: checker, shape inference, ONNX Runtime, numbers.

Runs on the file as saved (external data included): ``onnx.checker`` full check on the path
(works past 2 GB), shape inference to a scratch file, an ONNX Runtime CPU session, and a
comparison with the PyTorch fp32 reference on seeded random inputs at the recipe's validation
points, judged by parity's comparator (:mod:`maskattn_deploy.parity.compare`) under the
component's tolerance (one tolerance system). Each output prints one line with its verdict.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from maskattn_deploy.errors import ExportError
from maskattn_deploy.export.component_spec import ShapePoint, Tolerance

if TYPE_CHECKING:
    import onnx

    from maskattn_deploy.export.components import Component
    from maskattn_deploy.parity.compare import OutputVerdict

logger = logging.getLogger(__name__)

VALIDATION_SEED = 1234


@dataclass(frozen=True)
class OutputCheck:
    """One output at one shape point: ONNX Runtime vs the PyTorch reference, judged by
    parity's comparator under the component's tolerance."""

    component: str
    output: str
    point: str  # "B=2 192x128" (pixels)
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    failures: tuple[str, ...]
    tolerance: Tolerance

    @classmethod
    def from_verdict(cls, verdict: OutputVerdict, point: str) -> OutputCheck:
        return cls(
            component=verdict.component,
            output=verdict.output,
            point=point,
            max_abs=float(verdict.max_abs),
            mean_abs=float(verdict.mean_abs),
            rel_l2=float(verdict.rel_l2),
            cosine=float(verdict.cosine),
            failures=tuple(verdict.failures),
            tolerance=verdict.tolerance,
        )

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        verdict = "ok" if self.ok else f"FAIL ({'; '.join(self.failures)})"
        return (
            f"{self.component:>14} {self.output:<22} @ {self.point:<13} max abs "
            f"{self.max_abs:.2e}  rel_l2 {self.rel_l2:.2e}  cos {self.cosine:.6f}  {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite numbers become None)."""
        values = asdict(self) | {"ok": self.ok, "failures": list(self.failures)}
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()
        }


def point_label(point: ShapePoint) -> str:
    return f"B={point.batch} {point.height}x{point.width}"


def reference_outputs(
    component: Component, points: list[ShapePoint], seed: int = VALIDATION_SEED
) -> list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Graph-dtype inputs and fp32 PyTorch outputs per point (call before casting to fp16).

    fp16 inputs are rounded first and fed to the fp32 module as fp32, so the comparison
    measures the graph's internal precision, not the rounding of the inputs.
    """
    results = []
    module = component.module
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
        logger.info("%s: computing the reference on an fp32 copy", component.name)
        module = copy.deepcopy(module).float()
    for point in points:
        inputs = component.graph_inputs(point, seed)
        as_fp32 = [t.float() if t.is_floating_point() else t for t in inputs.values()]
        with torch.inference_mode():
            out = module(*as_fp32)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        results.append((inputs, [o.detach().float().cpu() for o in outs]))
    return results


def check_file(path: Path) -> onnx.ModelProto:
    """Full checker on the path and shape inference; returns the inferred graph (no weights)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    with tempfile.TemporaryDirectory(prefix="maskattn-infer-") as scratch:
        inferred = Path(scratch) / "inferred.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(inferred), check_type=True, strict_mode=True
            )
        except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
            raise ExportError(f"{path} fails shape inference: {str(exc).splitlines()[0]}") from exc
        return onnx.load(str(inferred), load_external_data=False)


def ort_session(path: Path) -> Any:
    """An ONNX Runtime CPU session for ``path``; errors become an ExportError."""
    from maskattn_deploy._lazy import require

    ort = require("onnxruntime", "validating the export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure kind
        raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc


def compare(
    session: Any,
    component: Component,
    points: list[ShapePoint],
    references: list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]],
    say: Callable[[str], None] | None = None,
) -> list[OutputCheck]:
    """Run ORT at each point and judge its outputs against the references (parity's
    comparator and the component's tolerance at the export precision)."""
    from maskattn_deploy.parity.compare import compare_output

    checks = []
    names = [o.name for o in component.outputs]
    for point, (inputs, refs) in zip(points, references, strict=True):
        feed = {k: v.numpy() for k, v in inputs.items()}
        outs = session.run(names, feed)
        for name, got, ref in zip(names, outs, refs, strict=True):
            got_t = torch.from_numpy(got).float()
            if tuple(got_t.shape) != tuple(ref.shape):
                raise ExportError(
                    f"{component.name} output {name}: ONNX Runtime shape "
                    f"{tuple(got_t.shape)} != PyTorch {tuple(ref.shape)}"
                )
            verdict = compare_output(
                component.name, name, "onnxruntime", got_t, ref, component.tolerance
            )
            check = OutputCheck.from_verdict(verdict, point_label(point))
            checks.append(check)
            if say is not None:
                say(check.line())
    return checks


def ort_fp16_fallback_ops(model: onnx.ModelProto) -> list[str]:
    """Op types with fp16 tensors that ONNX Runtime's CPU provider has no fp16 kernel for.

    ORT runs them in fp32 between inserted Casts (its InsertCastTransformer), so the CPU check
    measures fp16 storage, not fp16 arithmetic, for these ops; TensorRT runs them in fp16.
    Uses ORT's kernel registry (a private but long-stable API); [] if it is unavailable.
    """
    from onnx import TensorProto

    try:
        from onnxruntime.capi import _pybind_state as ort_c

        kernels = ort_c.get_all_opkernel_def()
    except (ImportError, AttributeError):
        return []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    has_fp16: dict[str, bool] = {}
    for k in kernels:
        if k.provider != "CPUExecutionProvider" or k.domain not in ("", "ai.onnx"):
            continue
        lo, hi = k.version_range
        if lo <= opset <= hi:
            fp16 = any("tensor(float16)" in v for v in k.type_constraints.values())
            has_fp16[k.op_name] = has_fp16.get(k.op_name, False) or fp16
    from maskattn_deploy.export.graph import value_types

    types = value_types(model)
    used = {
        n.op_type
        for n in model.graph.node
        if n.domain in ("", "ai.onnx")
        and any(types.get(o) == TensorProto.FLOAT16 for o in n.output)
    }
    # Ops without any CPU kernel (CastLike...) are expanded by ORT into ops that have one.
    return sorted(op for op in used if op in has_fp16 and not has_fp16[op])
