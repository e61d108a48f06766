"""The fused ``MaskedCrossAttention`` custom node and its model-local function.

A one-node ONNX model (custom node + function) runs in ONNX Runtime against the torch reference
(``gated_attention_reference``, the explicit path) on the contract's cases; the inlined function
gives identical numbers; the dynamo exporter turns ``maskattn::gated_attention`` into exactly one
attributed custom node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maskattn_deploy.export.onnx_op import (
    ATTENTION_NODE_ATTRIBUTES,
    custom_nodes,
    gate_input,
    inline_functions,
    make_attention_function,
    translation_table,
)
from maskattn_deploy.ops.attention import random_inputs
from maskattn_deploy.ops.contract import (
    ATTENTION_PLUGIN_NAME,
    ONNX_DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from maskattn_deploy.ops.reference import gated_attention_reference
from maskattn_deploy.ops.torch_op import gated_attention_op

OPSET = 18
NAMES = ("q", "k", "v", "g")


def one_node_model(x_type: int, g_type: int, threshold: float, scale: float) -> onnx.ModelProto:
    node = helper.make_node(
        ATTENTION_PLUGIN_NAME,
        list(NAMES),
        ["o"],
        domain=ONNX_DOMAIN,
        threshold=threshold,
        scale=scale,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
        aot=1,
    )
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "gated_attention",
        [
            info("q", x_type, ["b", "h", "n", "d"]),
            info("k", x_type, ["b", "h", "t", "d"]),
            info("v", x_type, ["b", "h", "t", "d"]),
            info("g", g_type, ["b", "n", "t"]),
        ],
        [info("o", x_type, ["b", "h", "n", "d"])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        functions=[make_attention_function(OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, *tensors: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {name: x.contiguous().numpy() for name, x in zip(NAMES, tensors, strict=True)}
    return torch.from_numpy(session.run(None, feed)[0])


def contract_gates(g: torch.Tensor) -> torch.Tensor:
    """Random gates plus rows that are all open, all closed, one open, and tied maxima."""
    g = g.clone()
    t = g.shape[-1]
    g[0, 0] = g[0, 0].abs() + 0.1  # all open
    g[0, 1] = -g[0, 1].abs() - 0.1  # all closed: argmax fallback
    g[0, 2] = -1.0
    g[0, 2, t - 1] = 2.0  # exactly one open token, the last one
    g[1, 3] = -3.0
    g[1, 3, t // 2 :] = -0.5  # tied maxima in a closed row: lowest index wins
    return g


@pytest.mark.parametrize(("t", "d"), [(1, 16), (2, 64), (77, 80), (154, 16), (231, 128)])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_function_matches_reference_fp32(t: int, d: int, threshold: float) -> None:
    i = random_inputs((2, 3, 5, t, d), dtype=torch.float32, seed=t + d)
    g = contract_gates(i.gate_logits)
    got = run(one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, threshold, i.scale),
              i.q, i.k, i.v, g)  # fmt: skip
    want = gated_attention_reference(i.q, i.k, i.v, g, threshold, i.scale)
    assert torch.isfinite(got).all()
    # Same fp32 operations in the same order; matmul blocking may differ.
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # Rows with one open token copy its value row exactly (p = 1).
    assert torch.equal(got[0, :, 2], i.v[0, :, t - 1])
    assert torch.equal(got[1, :, 3], i.v[1, :, t // 2])


@pytest.mark.parametrize("g_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_function_fp16(g_type: int) -> None:
    i = random_inputs((2, 2, 6, 77, 64), dtype=torch.float16, seed=3)
    g = contract_gates(i.gate_logits)
    g = g.half() if g_type == TensorProto.FLOAT16 else g
    got = run(one_node_model(TensorProto.FLOAT16, g_type, 0.0, i.scale), i.q, i.k, i.v, g)
    want = gated_attention_reference(i.q, i.k, i.v, g, 0.0, i.scale)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    # fp16 logits, probabilities and output in both; ORT's fp16 MatMul (fp32 via casts on the
    # CPU) may round the logits differently from torch's: a few fp16 ulps of |o| < 4.
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=0)


def test_forced_open_is_plain_attention() -> None:
    i = random_inputs((2, 2, 3, 77, 16), dtype=torch.float32, seed=5)
    got = run(one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, float("-inf"), i.scale),
              i.q, i.k, i.v, i.gate_logits)  # fmt: skip
    want = torch.nn.functional.scaled_dot_product_attention(i.q, i.k, i.v, scale=i.scale)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)  # fp32 rounding order only


def test_inlined_function_gives_identical_outputs() -> None:
    i = random_inputs((2, 3, 5, 77, 16), dtype=torch.float32, seed=11)
    model = one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, 0.0, i.scale)
    inlined = inline_functions(model)
    assert not custom_nodes(inlined.graph.node) and not inlined.functions
    assert {n.domain for n in inlined.graph.node} <= {"", "ai.onnx"}
    args = (i.q, i.k, i.v, i.gate_logits)
    assert torch.equal(run(inlined, *args), run(model, *args))


def test_function_reads_threshold_and_scale_through_ref_attr() -> None:
    function = make_attention_function(OPSET)
    assert list(function.attribute) == list(ATTENTION_NODE_ATTRIBUTES)
    refs = sorted(a.ref_attr_name for n in function.node for a in n.attribute if a.ref_attr_name)
    assert refs == ["scale", "threshold"]
    assert (function.domain, function.name) == (ONNX_DOMAIN, ATTENTION_PLUGIN_NAME)


class _Layer(torch.nn.Module):
    """What the gated processor traces in fused mode: projections' views in, [b, n, h*d] out."""

    def forward(self, q, k, v, g):  # noqa: ANN001, ANN201
        b, h, n, d = q.shape
        o = gated_attention_op(q, k, v, g, 0.25, 0.125)
        return o.transpose(1, 2).reshape(b, n, h * d)


def test_dynamo_export_emits_one_attributed_custom_node() -> None:
    i = random_inputs((2, 3, 4, 77, 16), dtype=torch.float32, seed=2)
    args = (i.q, i.k, i.v, i.gate_logits)
    program = torch.onnx.export(
        _Layer().eval(), args, dynamo=True, custom_translation_table=translation_table(),
        opset_version=OPSET, verbose=False,
    )  # fmt: skip
    nodes = custom_nodes(program.model_proto.graph.node)
    assert len(nodes) == 1 and nodes[0].op_type == ATTENTION_PLUGIN_NAME
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {
        "threshold": pytest.approx(0.25),
        "scale": pytest.approx(0.125),
        "plugin_namespace": PLUGIN_NAMESPACE.encode(),
        "plugin_version": PLUGIN_VERSION.encode(),
        "aot": 1,
    }
    inputs = [x.name for x in program.model_proto.graph.input]
    assert gate_input(nodes[0]) == inputs[3]
    model = program.model_proto
    model.functions.append(make_attention_function(OPSET))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(inputs, (x.contiguous().numpy() for x in args), strict=True)))
    want = _Layer()(*(x for x in args))
    np.testing.assert_allclose(got[0], want.numpy(), atol=2e-6)
