"""The gated layers in ONNX: one custom node per gated layer plus its model-local function.

Two node types, chosen by the export option ``--attention-node``: ``softmax`` (the default)
writes the masked softmax alone (``MaskedSoftmax``, from the ``maskattn::masked_softmax`` op),
``fused`` writes QK^T, the masked softmax and PV as one ``MaskedCrossAttention`` node (from the
``maskattn::gated_attention`` op, see the end of this docstring).

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

``MaskedCrossAttention`` takes ``q [b,h,n,d]``, ``k, v [b,h,t,d]`` (dtype T) and gate logits
``G [b,n,t]`` (fp32 or T) and carries the same attributes plus ``scale``. Its function is the
explicit path of the torch reference (:func:`~maskattn_deploy.ops.reference.gated_attention_reference`)::

    s       = MatMul(q, Transpose(k)) * CastLike(scale, q)     [b,h,n,t], dtype T
    P       = the MaskedSoftmax body above on (s, Unsqueeze(G, 1))
    o       = MatMul(P, v)                                     [b,h,n,d], dtype T
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from maskattn_deploy.ops.contract import (
    ATTENTION_PLUGIN_NAME,
    ONNX_DOMAIN,
    ONNX_DOMAIN_VERSION,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

if TYPE_CHECKING:
    import onnx

# The attributes both custom nodes carry for TensorRT's plugin lookup, with their values.
PLUGIN_ATTRIBUTES = {
    "plugin_namespace": PLUGIN_NAMESPACE,
    "plugin_version": PLUGIN_VERSION,
    "aot": 1,
}
# Attributes of each custom node (its function declares the same list).
NODE_ATTRIBUTES = ("threshold", *PLUGIN_ATTRIBUTES)
ATTENTION_NODE_ATTRIBUTES = ("threshold", "scale", *PLUGIN_ATTRIBUTES)
# Custom node types and the index of their gate-logit input.
NODE_TYPES = (PLUGIN_NAME, ATTENTION_PLUGIN_NAME)
GATE_INPUT = {PLUGIN_NAME: 1, ATTENTION_PLUGIN_NAME: 3}
# Export option --attention-node: the custom node type each value writes.
ATTENTION_NODES = {"softmax": PLUGIN_NAME, "fused": ATTENTION_PLUGIN_NAME}
# The types the TensorRT plugins implement (fp32/fp16 tensors, fp32/fp16 gate logits); a bf16
# graph would parse and then find no plugin kernel.
_FLOATS = ["tensor(float)", "tensor(float16)"]


def _plugin_attributes() -> list[onnx.defs.OpSchema.Attribute]:
    """Schema entries of :data:`PLUGIN_ATTRIBUTES` (both custom nodes end with them)."""
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
    return [
        OpSchema.Attribute("plugin_namespace", attr.STRING, "TensorRT plugin namespace"),
        OpSchema.Attribute("plugin_version", attr.STRING, "TensorRT plugin version"),
        OpSchema.Attribute("aot", attr.INT, "1: TensorRT AOT implementation"),
    ]


def op_schema() -> onnx.defs.OpSchema:
    """Schema the dynamo exporter needs to emit the custom node through onnxscript."""
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
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
        type_constraints=[("T", _FLOATS, "logits"), ("T1", _FLOATS, "gate logits")],
        attributes=[
            OpSchema.Attribute("threshold", attr.FLOAT, "open where g > threshold"),
            *_plugin_attributes(),
        ],
    )


def attention_op_schema() -> onnx.defs.OpSchema:
    """Schema of the fused ``MaskedCrossAttention`` node for the dynamo exporter."""
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
    return OpSchema(
        ATTENTION_PLUGIN_NAME,
        ONNX_DOMAIN,
        ONNX_DOMAIN_VERSION,
        "softmax(scale * q k^T) over the open set of G, times v (maskattn-deploy docs/design.md "
        "section 2.3).",
        inputs=[
            OpSchema.FormalParameter("query", "T", "q [b,h,n,d]"),
            OpSchema.FormalParameter("key", "T", "k [b,h,t,d]"),
            OpSchema.FormalParameter("value", "T", "v [b,h,t,d]"),
            OpSchema.FormalParameter("gate_logits", "T1", "G [b,n,t]"),
        ],
        outputs=[OpSchema.FormalParameter("out", "T", "o [b,h,n,d], dtype of q")],
        type_constraints=[("T", _FLOATS, "q, k, v"), ("T1", _FLOATS, "gate logits")],
        attributes=[
            OpSchema.Attribute("threshold", attr.FLOAT, "open where g > threshold"),
            OpSchema.Attribute("scale", attr.FLOAT, "factor on q k^T"),
            *_plugin_attributes(),
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
            **PLUGIN_ATTRIBUTES,
        )

    gated_attention = onnxscript.values.Op(opset, ATTENTION_PLUGIN_NAME, attention_op_schema())

    def translate_attention(
        q: Any, k: Any, v: Any, gate_logits: Any, threshold: float, scale: float, impl: str
    ) -> Any:
        # ``impl`` picks a torch implementation; the node has one meaning everywhere.
        return gated_attention(
            q,
            k,
            v,
            gate_logits,
            threshold=float(threshold),
            scale=float(scale),
            **PLUGIN_ATTRIBUTES,
        )

    return {
        torch.ops.maskattn.masked_softmax.default: translate,
        torch.ops.maskattn.gated_attention.default: translate_attention,
    }


class _Body:
    """Nodes of a function body under construction (names are local to the function)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(self, name: str, dtype: int, value: float | int) -> str:
        from onnx import helper

        return self.add("Constant", [], name, value=helper.make_tensor(name, dtype, [], [value]))

    def attribute(self, name: str) -> str:
        """A float attribute of the node as a scalar tensor (``ref_attr_name``)."""
        import onnx
        from onnx import helper

        node = helper.make_node("Constant", [], [name])
        node.attribute.append(
            onnx.AttributeProto(
                name="value_float", ref_attr_name=name, type=onnx.AttributeProto.FLOAT
            )
        )
        self.nodes.append(node)
        return name

    def masked_softmax(self, logits: str, gate_logits: str, out: str) -> str:
        """The masked-softmax decomposition of the module docstring: P like ``logits``."""
        from onnx import TensorProto

        threshold = self.attribute("threshold")
        zero = self.const("zero", TensorProto.FLOAT, 0.0)
        neg_inf = self.const("neg_inf", TensorProto.FLOAT, float("-inf"))
        i0 = self.const("i0", TensorProto.INT64, 0)
        i1 = self.const("i1", TensorProto.INT64, 1)
        g = self.add("Cast", [gate_logits], "g", to=TensorProto.FLOAT)  # [b,1,n,t] fp32
        above = self.add("Greater", [g, threshold], "above")
        best = self.add("ArgMax", [g], "best", axis=-1, keepdims=1, select_last_index=0)
        t_1d = self.add("Shape", [g], "t_1d", start=-1)
        t = self.add("Squeeze", [t_1d], "t")
        token = self.add("Range", [i0, t, i1], "token")  # [t]
        first = self.add("Equal", [token, best], "first")  # [b,1,n,t]: the first maximum
        is_open = self.add("Or", [above, first], "is_open")
        bias = self.add("Where", [is_open, zero, neg_inf], "bias")  # [b,1,n,t]
        s = self.add("Cast", [logits], "s", to=TensorProto.FLOAT)  # [b,h,n,t] fp32
        s_open = self.add("Add", [s, bias], "s_open")
        # Closed tokens hold -inf, so exp gives exactly 0; every row keeps one open token.
        p = self.add("Softmax", [s_open], "p", axis=-1)
        return self.add("CastLike", [p, logits], out)


def make_function(opset: int) -> onnx.FunctionProto:
    """The masked softmax's model-local function (opset = the model's default opset)."""
    from onnx import helper

    body = _Body()
    body.masked_softmax("logits", "gate_logits", "probs")
    return helper.make_function(
        ONNX_DOMAIN,
        PLUGIN_NAME,
        ["logits", "gate_logits"],
        ["probs"],
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(NODE_ATTRIBUTES),
        doc_string="MaskAttn masked softmax (docs/design.md section 3): exact open-set softmax "
        "with argmax fallback, fp32 accumulation; the TensorRT plugin replaces this node.",
    )


def make_attention_function(opset: int) -> onnx.FunctionProto:
    """The fused gated attention's model-local function: the torch reference's explicit path."""
    from onnx import TensorProto, helper

    body = _Body()
    scale = body.attribute("scale")
    key_t = body.add("Transpose", ["key"], "key_t", perm=[0, 1, 3, 2])  # [b,h,d,t]
    scores = body.add("MatMul", ["query", key_t], "scores")  # [b,h,n,t], dtype of q
    scale_t = body.add("CastLike", [scale, scores], "scale_t")
    logits = body.add("Mul", [scores, scale_t], "logits")
    axis = body.add(
        "Constant", [], "axis1", value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    )
    gates = body.add("Unsqueeze", ["gate_logits", axis], "gates")  # [b,1,n,t]
    probs = body.masked_softmax(logits, gates, "probs")
    body.add("MatMul", [probs, "value"], "out")  # [b,h,n,d]
    return helper.make_function(
        ONNX_DOMAIN,
        ATTENTION_PLUGIN_NAME,
        ["query", "key", "value", "gate_logits"],
        ["out"],
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(ATTENTION_NODE_ATTRIBUTES),
        doc_string="MaskAttn gated cross-attention (docs/design.md section 2.3): "
        "softmax(scale * q k^T) over the open set of G, times v; the TensorRT plugin replaces "
        "this node with the fused kernel.",
    )


FUNCTIONS = {PLUGIN_NAME: make_function, ATTENTION_PLUGIN_NAME: make_attention_function}


def is_custom_node(node: Any) -> bool:
    """True for a gated layer's custom node, either type (ONNX NodeProto or onnx_ir Node)."""
    return node.op_type in NODE_TYPES and node.domain == ONNX_DOMAIN


def custom_nodes(nodes: Iterable[Any]) -> list[Any]:
    """The gated layers' custom nodes among ``nodes``, in graph order."""
    return [node for node in nodes if is_custom_node(node)]


def gate_input(node: Any) -> Any:
    """The gate-logit input of a custom node (a name or an onnx_ir Value)."""
    return (
        node.inputs[GATE_INPUT[node.op_type]]
        if hasattr(node, "inputs")
        else node.input[GATE_INPUT[node.op_type]]
    )


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every custom node replaced by its function body (standard ops)."""
    import onnx.inliner

    return onnx.inliner.inline_local_functions(model)
