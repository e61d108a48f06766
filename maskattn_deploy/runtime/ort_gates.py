"""Gate masks from an exported UNet on ONNX Runtime, without a torch reference pass.

Every gated layer of an export is one custom node (``MaskedSoftmax``, or the fused
``MaskedCrossAttention``), named ``<layer>/<op type>``, one of whose inputs holds the gate logits
``G [b, 1, n, t]`` (docs/design.md section 3). To
record masks, the UNet session is created from a copy of the graph that also returns each
node's gate-logit tensor; the open set is then the contract's own rule
(:func:`maskattn_deploy.ops.reference.open_mask`: ``g > threshold`` with the argmax fallback),
so the recorded masks are exactly the ones the exported graph applied. Without recording the
session runs only the component's own outputs, at no extra cost.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

STAGES = ("high", "mid", "low")


@dataclass(frozen=True)
class GateOutput:
    """One gated layer's gate-logit tensor in the graph."""

    layer: str
    tensor: str
    threshold: float


def gate_outputs(model) -> list[GateOutput]:
    """The gate-logit tensors of every masked-softmax node of an ``onnx.ModelProto``."""
    from onnx import helper

    from maskattn_deploy.export.onnx_op import gate_input, is_custom_node

    found = []
    for node in model.graph.node:
        if not is_custom_node(node):
            continue
        threshold = 0.0
        for attribute in node.attribute:
            if attribute.name == "threshold":
                value = helper.get_attribute_value(attribute)
                threshold = float(_first(value))
        layer = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        found.append(GateOutput(layer, gate_input(node), threshold))
    return found


def _first(value) -> float:
    if hasattr(value, "dims"):  # a TensorProto attribute
        from onnx import numpy_helper

        return float(numpy_helper.to_array(value).reshape(-1)[0])
    if isinstance(value, (list, tuple)):
        return float(value[0])
    return float(value)


def with_gate_outputs(onnx_path: Path) -> tuple[bytes | str, list[GateOutput], Path | None]:
    """The model with gate logits added as graph outputs, for ``InferenceSession``.

    Returns (model bytes, or a path when the weights live in external files; the gate
    outputs; a temp folder to delete when the session is gone, or None). External weight
    files are linked beside the rewritten graph, never copied.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    gates = gate_outputs(model)
    known = {v.name: v for v in model.graph.value_info}
    present = {o.name for o in model.graph.output}
    for gate in gates:
        if gate.tensor in present:
            continue
        info = known.get(gate.tensor)
        elem = info.type.tensor_type.elem_type if info is not None else onnx.TensorProto.FLOAT
        model.graph.output.append(onnx.helper.make_tensor_value_info(gate.tensor, elem, None))
    data_files = sorted(set(_external_files(model)))
    if not data_files:
        return model.SerializeToString(), gates, None
    folder = Path(tempfile.mkdtemp(prefix="maskattn-gates-"))
    try:
        for name in data_files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to((onnx_path.parent / name).resolve())
        target = folder / onnx_path.name
        onnx.save(model, str(target))
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return str(target), gates, folder


def _external_files(model) -> Iterable[str]:
    """Files the graph's weights are stored in (the exporter keeps weights as initializers)."""
    from onnx import TensorProto

    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    yield entry.value


def open_masks(logits, threshold: float) -> torch.Tensor:
    """``[b, n, t]`` bool open set of gate logits ``[b, 1, n, t]`` (numpy or torch)."""
    from maskattn_deploy.ops.reference import open_mask

    values = torch.as_tensor(logits)
    return open_mask(values, threshold)[:, 0].cpu()


_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def stage_namer(layers: list[str], configured: str | None):
    """``layer -> stage`` for an export's gated layers, as :mod:`maskattn_deploy.gating.placement`
    names them: the configured stage when the gates cover one stage; for ``all``, the
    highest-resolution gated level is ``high``, the mid block ``low``, the rest ``mid``."""
    if configured in STAGES:
        return lambda layer: "low" if layer.startswith("mid_block.") else configured
    downs = [
        int(m.group(2)) for n in layers if (m := _LEVEL.match(n)) and m.group(1) == "down_blocks"
    ]
    ups = [int(m.group(2)) for n in layers if (m := _LEVEL.match(n)) and m.group(1) == "up_blocks"]

    def stage(layer: str) -> str:
        if layer.startswith("mid_block."):
            return "low"
        match = _LEVEL.match(layer)
        if match is None:
            return "mid"
        index = int(match.group(2))
        top = min(downs) if match.group(1) == "down_blocks" else max(ups)
        return "high" if index == top else "mid"

    return stage
