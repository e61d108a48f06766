"""Post-processing of an exported graph and the structural checks on it.

On the in-memory ``onnx_ir`` model that the dynamo exporter returns (weights are not copied):
name each custom node after its layer, attach the model-local function, set the symbolic I/O
shapes of the contract, optionally expose per-layer probabilities, and strip exporter debug
metadata. On saved files (``onnx.ModelProto`` without weights): which layers carry the custom
node, which still use a standard softmax, and which fp32 tensors an fp16 graph keeps.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from maskattn_deploy.errors import ExportError
from maskattn_deploy.export.component_spec import FLOAT32, SPECS
from maskattn_deploy.export.onnx_op import (
    FUNCTIONS,
    NODE_TYPES,
    custom_nodes,
    gate_input,
    is_custom_node,
)
from maskattn_deploy.export.spec import BATCH, STEPS, per_layer_output
from maskattn_deploy.ops.contract import ONNX_DOMAIN, ONNX_DOMAIN_VERSION, PLUGIN_NAME

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

    from maskattn_deploy.export.components import Component

logger = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Node metadata kept from the exporter: the module scopes (layer names for localisation and
# the checks below). The rest (stack traces with local paths, FX text) only bloats the file.
_KEEP_METADATA = (SCOPES_KEY,)
_UNET_PREFIX = "unet."
_GATE_SCOPE = "gates."


def node_scopes(node: Any) -> list[str]:
    """Module scopes recorded by the exporter (outermost first); [] when absent."""
    props = node.metadata_props
    raw = props.get(SCOPES_KEY) if isinstance(props, dict) else _proto_prop(node, SCOPES_KEY)
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)]


def _proto_prop(node: Any, key: str) -> str | None:
    for prop in node.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def attention_layer(node: Any) -> str | None:
    """UNet attention module (``...attn1``/``...attn2``) a node was traced in, if any."""
    for scope in reversed(node_scopes(node)):
        if scope.endswith((".attn1", ".attn2")):
            return scope.removeprefix(_UNET_PREFIX)
    return None


def layer_of_custom_node(node: Any) -> str:
    """The gated layer a custom node belongs to: from its name ``<layer>/<op_type>``."""
    for op_type in NODE_TYPES:
        suffix = f"/{op_type}"
        if node.name and node.name.endswith(suffix):
            return node.name[: -len(suffix)]
    layer = attention_layer(node)
    if layer is None:
        raise ExportError(f"custom node {node.name!r} has no attention layer scope")
    return layer


# --- in-memory post-processing (onnx_ir) -------------------------------------------------------


def optimize(model: ir.Model) -> None:
    """Constant folding and clean-up, in place.

    The exporter's own optimizer (``optimize=True``) adds onnxscript's pattern rewriter, which
    costs about 40% of a UNet export on a CPU for fusions TensorRT and ONNX Runtime redo anyway;
    folding, dead-code and duplicate removal are what the graph needs.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    _drop_noop_casts(model.graph)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.NameFixPass(),
    )(model)


def _drop_noop_casts(graph: ir.Graph) -> None:
    """Remove Cast/CastLike nodes whose input already has the target type."""
    for node in list(graph):
        if node.op_type not in ("Cast", "CastLike") or node.domain not in ("", "ai.onnx"):
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source is None or source.dtype is None or source.dtype != out.dtype:
            continue
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)


def finalize(model: ir.Model, component: Component, opset: int, per_layer: bool) -> list[str]:
    """Prepare the exported model in place; returns the gated layers (checkpoint order)."""
    graph = model.graph
    _set_io(graph, component)
    broadcast_steps(graph)
    layers = _name_custom_nodes(graph)
    check_gate_coverage(layers, component.gated_layers, _softmax_layers(graph))
    if layers:
        _attach_functions(model, opset)
    if per_layer:
        _add_per_layer_outputs(graph, layers)
    for node in graph:
        for key in [k for k in node.metadata_props if k not in _KEEP_METADATA]:
            del node.metadata_props[key]
    model.metadata_props["maskattn.component"] = component.name
    model.metadata_props["maskattn.precision"] = component.precision
    order = component.gated_layers
    return sorted(layers, key=order.index) if order else layers  # the checkpoint's order


def _set_io(graph: ir.Graph, component: Component) -> None:
    import onnx_ir as ir

    for values, specs in ((graph.inputs, component.inputs), (graph.outputs, component.outputs)):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise ExportError(f"{component.name}: exported I/O {names} differ from the contract")
        for value, spec in zip(values, specs, strict=True):
            value.shape = ir.Shape(list(spec.shape))


def broadcast_steps(graph: ir.Graph) -> None:
    """Let inputs with a timestep axis (``S``) have a length of their own, broadcast in the graph.

    The UNet is traced with one timestep per row, so its graph uses ``timestep`` as a ``[B]``
    tensor. Hugging Face Optimum's pipeline feeds ``[1]`` at any batch (diffusers passes one
    timestep per step), so the input becomes ``[S]`` and an ``Expand`` to the batch of the
    first ``[B, ...]`` input feeds what used it: ``[1]`` and ``[B]`` both work, any other
    length fails in the runtime's shape check of that ``Expand``.
    """
    import onnx_ir as ir

    batch_source = next(
        (v for v in graph.inputs if v.shape is not None and v.shape.dims[:1] == (BATCH,)), None
    )
    for value in graph.inputs:
        if value.shape is None or value.shape.dims[:1] != (STEPS,):
            continue
        if batch_source is None:
            raise ExportError(f"input {value.name} has a timestep axis but no input has a batch")
        uses = list(value.uses())
        batch = ir.node("Shape", [batch_source], {"start": 0, "end": 1}, name=f"{value.name}/batch")
        expand = ir.node("Expand", [value, batch.outputs[0]], name=f"{value.name}/broadcast")
        out = expand.outputs[0]
        out.name, out.type = f"{value.name}/broadcast", value.type
        out.shape = ir.Shape([BATCH, *value.shape.dims[1:]])
        for use in uses:
            use.node.replace_input_with(use.idx, out)
        graph.insert_before(graph.node(0), [batch, expand])


def _name_custom_nodes(graph: ir.Graph) -> list[str]:
    layers = []
    for node in custom_nodes(graph):
        layer = attention_layer(node)
        if layer is None:
            raise ExportError("a masked-softmax node was traced outside any attention layer")
        node.name = f"{layer}/{node.op_type}"
        layers.append(layer)
    return layers


def _softmax_layers(nodes: Iterable[Any]) -> list[str]:
    return [
        layer
        for node in nodes
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx")
        if (layer := attention_layer(node)) is not None
    ]


def _attach_functions(model: ir.Model, opset: int) -> None:
    """The model-local function of each custom node type the graph uses."""
    import onnx_ir as ir

    for op_type in sorted({node.op_type for node in custom_nodes(model.graph)}):
        function = ir.serde.deserialize_function(FUNCTIONS[op_type](opset))
        model.functions[function.identifier()] = function
    model.opset_imports[ONNX_DOMAIN] = ONNX_DOMAIN_VERSION
    model.graph.opset_imports[ONNX_DOMAIN] = ONNX_DOMAIN_VERSION


def _add_per_layer_outputs(graph: ir.Graph, layers: Sequence[str]) -> None:
    import onnx_ir as ir

    for node, layer in zip(custom_nodes(graph), layers, strict=True):
        if node.op_type != PLUGIN_NAME:
            raise ExportError(
                f"{layer}: per-layer probabilities need --attention-node softmax (the fused "
                "node never forms them)"
            )
        probs = node.outputs[0]
        name = per_layer_output(layer)
        identity = ir.Node("", "Identity", [probs], name=f"{layer}/probs", num_outputs=1)
        out = identity.outputs[0]
        out.name = name
        out.type = probs.type
        out.shape = probs.shape
        graph.append(identity)
        graph.outputs.append(out)


# --- checks on saved graphs (onnx.ModelProto, weights not needed) ------------------------------


def gated_layers_in(model: onnx.ModelProto) -> list[str]:
    """Layers whose attention uses the custom node, in graph order."""
    return [layer_of_custom_node(n) for n in model.graph.node if is_custom_node(n)]


def standard_softmax_layers(model: onnx.ModelProto) -> list[str]:
    """Attention layers that use a standard Softmax (one per ungated attention layer)."""
    return _softmax_layers(model.graph.node)


def check_gate_coverage(
    in_graph: Sequence[str], expected: Sequence[str], softmax_layers: Iterable[str]
) -> None:
    """Every gated layer has exactly one custom node and no standard softmax; nothing else does."""
    problems = []
    missing = [layer for layer in expected if layer not in in_graph]
    extra = [layer for layer in in_graph if layer not in expected]
    doubled = sorted({layer for layer in in_graph if list(in_graph).count(layer) > 1})
    ungated = sorted(set(softmax_layers) & set(expected))
    if missing:
        problems.append(f"gated layers exported without their gate: {', '.join(missing)}")
    if extra:
        problems.append(f"custom nodes in layers that have no gate: {', '.join(extra)}")
    if doubled:
        problems.append(f"layers with more than one custom node: {', '.join(doubled)}")
    if ungated:
        problems.append(f"gated layers that still use a standard softmax: {', '.join(ungated)}")
    if problems:
        raise ExportError("masked UNet graph is wrong: " + "; ".join(problems))


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (run shape inference on ``model`` first)."""
    graph = model.graph
    types = {i.name: i.data_type for i in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    return types


def fp32_outside_islands(model: onnx.ModelProto, component: str) -> list[str]:
    """fp32 tensors of an fp16 graph that are not in an allowed fp32 island.

    Allowed islands: the gate heads (nodes traced inside ``gates.*``) and what feeds only the
    custom node's gate-logit input; the timestep / time-id embeddings that start from the fp32
    inputs; and Casts to fp32 consumed only by those islands. Resize scales are fp32 by spec.
    """
    from onnx import TensorProto

    graph = model.graph
    types = value_types(model)
    fp32 = TensorProto.FLOAT
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    fixed = (
        {t.name for t in SPECS[component].inputs if t.dtype == FLOAT32}
        if component in SPECS
        else set()
    )
    island_values = {n for n in fixed if types.get(n) == fp32}
    island_nodes: set[int] = set()
    gate_inputs = {gate_input(n) for n in graph.node if is_custom_node(n)}
    for node in graph.node:
        if is_custom_node(node):
            continue  # its output has the dtype of S and must never extend an island
        in_gate = any(s.startswith(_GATE_SCOPE) for s in node_scopes(node))
        grows = any(i in island_values for i in node.input) and not any(
            types.get(i) == TensorProto.FLOAT16 for i in node.input
        )
        makes_gate_input = any(o in gate_inputs for o in node.output)
        if in_gate or grows or makes_gate_input:
            island_nodes.add(id(node))
            island_values.update(o for o in node.output if types.get(o) == fp32)
    for node in graph.node:  # casts and constants that only enter an island
        users = [c for o in node.output for c in consumers.get(o, [])]
        entry = node.op_type in ("Cast", "Constant") and id(node) not in island_nodes
        if entry and users and all(id(c) in island_nodes for c in users):
            island_nodes.add(id(node))
            island_values.update(node.output)
    bad = []
    for node in graph.node:
        if id(node) in island_nodes:
            continue
        bad += [f"{o} ({node.op_type})" for o in node.output if types.get(o) == fp32]
        for index, name in enumerate(node.input):
            is_scales = node.op_type == "Resize" and index == 2
            if name and types.get(name) == fp32 and name not in island_values and not is_scales:
                where = f"{node.op_type} {node.name}".strip()
                bad.append(f"{name} (input of {where})")
    return sorted(set(bad))


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external-data files a model references."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            files.add(ExternalDataInfo(tensor).location)
    return sorted(files)
