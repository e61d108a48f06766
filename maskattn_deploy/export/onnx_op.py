"""The masked softmax in ONNX: one custom node per gated layer plus its model-local function.

The custom node is what TensorRT sees: ``op_type`` = :data:`PLUGIN_NAME`, domain
:data:`ONNX_DOMAIN`, string attribute ``plugin_namespace`` (the parser looks the plugin up by
name, version and namespace), ``plugin_version``, ``aot=1`` (pick the ahead-of-time
implementation) and ``threshold`` (float, on the gate logit).

The function (a ``FunctionProto`` with the same domain and name) is what ONNX Runtime and
``onnx.inliner`` see: the contract of docs/design.md section 3 in standard ops::

    g       = Cast<float>(G)                                   [b,1,n,t]
    first   = Range(t) == ArgMax(g, select_last_index=0)       lowest index on ties
    open    = (g > threshold) or first                         never an empty row
    bias    = Where(open, 0, -inf)                             [b,1,n,t], shared by the heads
    p       = Softmax(Cast<float>(S) + bias)                   fp32 accumulation
    P       = CastLike(p, S)                                   exp(-inf) = 0: exact zeros

``first`` alone decides only rows with nothing above the threshold: in any other row the
largest logit is above it already, so the argmax fallback needs no "row is empty" test. The mask
is applied as an additive bias on ``[b,1,n,t]`` that broadcasts over the heads (one cheap Add
on the large tensor instead of a broadcasting Where).

A row that keeps one open token never sees an all ``-inf`` softmax, so no NaN appears for finite
inputs; a non-finite logit (``+inf`` + ``-inf`` is NaN) only spoils its own row. ``threshold``
is read from the node through ``ref_attr_name`` so one function serves every layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from maskattn_deploy.ops.contract import (
    ONNX_DOMAIN,
    ONNX_DOMAIN_VERSION,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

if TYPE_CHECKING:
    import onnx

# Attributes every custom node carries (the function declares the same list).
NODE_ATTRIBUTES = ("threshold", "plugin_namespace", "plugin_version", "aot")


def op_schema() -> onnx.defs.OpSchema:
    """Schema the dynamo exporter needs to emit the custom node through onnxscript."""
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        PLUGIN_NAME,
        ONNX_DOMAIN,
        ONNX_DOMAIN_VERSION,
        "Softmax of S over the open set of gate logits G (maskattn-deploy docs/design.md section 3).",
        inputs=[
            OpSchema.FormalParameter("logits", "T", "S [b,h,n,t]"),
            OpSchema.FormalParameter("gate_logits", "T1", "G [b,1,n,t]"),
        ],
        outputs=[OpSchema.FormalParameter("probs", "T", "P [b,h,n,t], dtype of S")],
        type_constraints=[("T", floats, "logits"), ("T1", floats, "gate logits")],
        attributes=[
            OpSchema.Attribute("threshold", attr.FLOAT, "open where g > threshold"),
            OpSchema.Attribute("plugin_namespace", attr.STRING, "TensorRT plugin namespace"),
            OpSchema.Attribute("plugin_version", attr.STRING, "TensorRT plugin version"),
            OpSchema.Attribute("aot", attr.INT, "1: TensorRT AOT implementation"),
        ],
    )


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    import onnxscript
    import torch

    import maskattn_deploy.ops.torch_op  # noqa: F401  (registers torch.ops.maskattn.*)

    opset = onnxscript.values.Opset(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)
    masked_softmax = onnxscript.values.Op(opset, PLUGIN_NAME, op_schema())

    def translate(logits: Any, gate_logits: Any, threshold: float) -> Any:
        return masked_softmax(
            logits,
            gate_logits,
            threshold=float(threshold),
            plugin_namespace=PLUGIN_NAMESPACE,
            plugin_version=PLUGIN_VERSION,
            aot=1,
        )

    return {torch.ops.maskattn.masked_softmax.default: translate}


def make_function(opset: int) -> onnx.FunctionProto:
    """The model-local function holding the decomposition (opset = the model's default opset)."""
    import onnx
    from onnx import TensorProto, helper

    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], output: str, **attrs: Any) -> None:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))

    def const(name: str, dtype: int, value: float | int, dims: list[int] | None = None) -> None:
        add("Constant", [], name, value=helper.make_tensor(name, dtype, dims or [], [value]))

    threshold = helper.make_node("Constant", [], ["threshold"])
    ref = onnx.AttributeProto(
        name="value_float", ref_attr_name="threshold", type=onnx.AttributeProto.FLOAT
    )
    threshold.attribute.append(ref)
    nodes.append(threshold)
    const("zero", TensorProto.FLOAT, 0.0)
    const("neg_inf", TensorProto.FLOAT, float("-inf"))
    const("i0", TensorProto.INT64, 0)
    const("i1", TensorProto.INT64, 1)
    add("Cast", ["gate_logits"], "g", to=TensorProto.FLOAT)  # [b,1,n,t] fp32
    add("Greater", ["g", "threshold"], "above")
    add("ArgMax", ["g"], "best", axis=-1, keepdims=1, select_last_index=0)  # first maximum
    add("Shape", ["g"], "t_1d", start=-1)
    add("Squeeze", ["t_1d"], "t")
    add("Range", ["i0", "t", "i1"], "token")  # [t]
    add("Equal", ["token", "best"], "first")  # [b,1,n,t]
    add("Or", ["above", "first"], "is_open")
    add("Where", ["is_open", "zero", "neg_inf"], "bias")  # [b,1,n,t]
    add("Cast", ["logits"], "s", to=TensorProto.FLOAT)  # [b,h,n,t] fp32
    add("Add", ["s", "bias"], "s_open")
    # Closed tokens hold -inf, so exp gives exactly 0; every row keeps one open token.
    add("Softmax", ["s_open"], "p", axis=-1)
    add("CastLike", ["p", "logits"], "probs")
    return helper.make_function(
        ONNX_DOMAIN,
        PLUGIN_NAME,
        ["logits", "gate_logits"],
        ["probs"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(NODE_ATTRIBUTES),
        doc_string="MaskAttn masked softmax (docs/design.md section 3): exact open-set softmax with argmax "
        "fallback, fp32 accumulation; the TensorRT plugin replaces this node.",
    )


def is_custom_node(node: Any) -> bool:
    """True for a masked-softmax custom node (ONNX NodeProto or onnx_ir Node)."""
    return node.op_type == PLUGIN_NAME and node.domain == ONNX_DOMAIN


def custom_nodes(nodes: Iterable[Any]) -> list[Any]:
    """The masked-softmax custom nodes among ``nodes``, in graph order."""
    return [node for node in nodes if is_custom_node(node)]


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every custom node replaced by its function body (standard ops)."""
    import onnx.inliner

    return onnx.inliner.inline_local_functions(model)
