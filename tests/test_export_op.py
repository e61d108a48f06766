"""The masked-softmax custom node and its model-local function against the reference oracle.

A one-node ONNX model (custom node + function) runs in ONNX Runtime on the docs/design.md
section 3.3 cases; the function inlined into plain ops gives identical numbers; the dynamo exporter turns
the torch custom op into exactly one attributed custom node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maskattn_deploy.export.onnx_op import (
    NODE_ATTRIBUTES,
    custom_nodes,
    inline_functions,
    make_function,
    translation_table,
)
from maskattn_deploy.ops.contract import (
    ONNX_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask
from maskattn_deploy.ops.torch_op import masked_softmax_op

OPSET = 18


def one_node_model(s_type: int, g_type: int, threshold: float) -> onnx.ModelProto:
    node = helper.make_node(
        PLUGIN_NAME,
        ["S", "G"],
        ["P"],
        domain=ONNX_DOMAIN,
        threshold=threshold,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
        aot=1,
    )
    graph = helper.make_graph(
        [node],
        "masked_softmax",
        [
            helper.make_tensor_value_info("S", s_type, ["b", "h", "n", "t"]),
            helper.make_tensor_value_info("G", g_type, ["b", 1, "n", "t"]),
        ],
        [helper.make_tensor_value_info("P", s_type, ["b", "h", "n", "t"])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        functions=[make_function(OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"S": s.numpy(), "G": g.numpy()})
    return torch.from_numpy(out)


def gate_cases(b: int, n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Random gates plus rows that are all open, all closed, one open, and tied maxima."""
    g = torch.randn(b, 1, n, t, generator=gen)
    g[0, 0, 0] = torch.rand(t, generator=gen) + 0.1  # all open
    g[0, 0, 1] = -torch.rand(t, generator=gen) - 0.1  # all closed: argmax fallback
    if n > 2:
        g[0, 0, 2] = -1.0
        g[0, 0, 2, t - 1] = 2.0  # exactly one open token, the last one
    if n > 3:
        g[1, 0, 3] = -3.0
        g[1, 0, 3, t // 2 :] = -0.5  # tied maxima in a closed row: lowest index wins
    return g


@pytest.mark.parametrize("t", [1, 2, 77, 154, 231])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_function_matches_reference_fp32(t: int, threshold: float) -> None:
    gen = torch.Generator().manual_seed(t)
    b, h, n = 2, 3, 5  # b*h*n = 30: not a multiple of any block size
    s = torch.randn(b, h, n, t, generator=gen) * 4
    g = gate_cases(b, n, t, gen)
    got = run(one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, threshold), s, g)
    ref = masked_softmax_reference(s, g, threshold)
    closed = ~open_mask(g, threshold).expand_as(s)
    assert torch.isfinite(got).all()
    assert (got[closed] == 0).all()  # exact zeros, not tiny numbers
    # fp32 softmax in both: only exp/sum rounding differs.
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, h, n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("g_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_function_fp16_logits_near_range(g_type: int) -> None:
    gen = torch.Generator().manual_seed(7)
    b, h, n, t = 2, 4, 6, 77
    s = ((torch.rand(b, h, n, t, generator=gen) * 2 - 1) * 6.0e4).half()  # near fp16 max
    g = gate_cases(b, n, t, gen)
    g = g.half() if g_type == TensorProto.FLOAT16 else g
    got = run(one_node_model(TensorProto.FLOAT16, g_type, 0.0), s, g)
    ref = masked_softmax_reference(s, g, 0.0)
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert (got[~open_mask(g).expand_as(s)] == 0).all()
    # Both accumulate in fp32 and round once to fp16: one fp16 ulp at 1.0 is 9.8e-4.
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-3, rtol=0)


def test_nonfinite_logits_stay_in_their_row() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(1, 2, 4, 9, generator=gen)
    g = torch.randn(1, 1, 4, 9, generator=gen).abs()  # all open
    s[0, 0, 1, 3] = float("inf")
    s[0, 1, 2, 5] = float("nan")
    got = run(one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, 0.0), s, g)
    ref = masked_softmax_reference(s, g)
    clean = torch.ones(1, 2, 4, dtype=torch.bool)
    clean[0, 0, 1] = clean[0, 1, 2] = False
    # Rows without a non-finite logit are untouched (fp32 rounding only).
    torch.testing.assert_close(got[clean], ref[clean], atol=1e-6, rtol=1e-6)


def test_forced_open_threshold_is_plain_softmax() -> None:
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 2, 3, 77, generator=gen)
    g = torch.randn(2, 1, 3, 77, generator=gen)
    got = run(one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, float("-inf")), s, g)
    # threshold -inf opens every token: the result is torch's own softmax up to fp32 rounding.
    torch.testing.assert_close(got, torch.softmax(s, -1), atol=1e-6, rtol=1e-6)


def test_inlined_function_gives_identical_outputs() -> None:
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 5, 77, generator=gen)
    g = gate_cases(2, 5, 77, gen)
    model = one_node_model(TensorProto.FLOAT, TensorProto.FLOAT, 0.0)
    inlined = inline_functions(model)
    assert not custom_nodes(inlined.graph.node) and not inlined.functions
    assert {n.domain for n in inlined.graph.node} <= {"", "ai.onnx"}
    # ORT inlines the function itself, so the plain-op graph must give the same bits.
    assert torch.equal(run(inlined, s, g), run(model, s, g))


def test_function_reads_threshold_through_ref_attr() -> None:
    function = make_function(OPSET)
    assert list(function.attribute) == list(NODE_ATTRIBUTES)
    refs = [a.ref_attr_name for n in function.node for a in n.attribute if a.ref_attr_name]
    assert refs == ["threshold"]
    assert (function.domain, function.name) == (ONNX_DOMAIN, PLUGIN_NAME)


class _OneOp(torch.nn.Module):
    def forward(self, logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        return masked_softmax_op(logits, gate_logits, 0.25) * 2.0


def test_dynamo_export_emits_one_attributed_custom_node() -> None:
    s, g = torch.randn(2, 3, 4, 77), torch.randn(2, 1, 4, 77)
    program = torch.onnx.export(
        _OneOp().eval(),
        (s, g),
        dynamo=True,
        custom_translation_table=translation_table(),
        opset_version=OPSET,
        verbose=False,
    )
    nodes = custom_nodes(program.model_proto.graph.node)
    assert len(nodes) == 1
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {
        "threshold": pytest.approx(0.25),
        "plugin_namespace": PLUGIN_NAMESPACE.encode(),
        "plugin_version": PLUGIN_VERSION.encode(),
        "aot": 1,
    }
    assert nodes[0].domain == ONNX_DOMAIN
    model = program.model_proto
    model.functions.append(make_function(OPSET))
    got = run_named(model, {"logits": s, "gate_logits": g})
    np.testing.assert_allclose(got, (masked_softmax_reference(s, g, 0.25) * 2).numpy(), atol=1e-6)


def run_named(model: onnx.ModelProto, feed: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
