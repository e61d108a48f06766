"""``maskattn::gated_attention``: the reference against an explicit computation, the
FlexAttention implementation against the reference (eager, on the CPU), the fake kernel under
``torch.compile`` and the entry points a benchmark uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskattn_deploy.ops.attention import (
    flex_gated_attention,
    random_inputs,
    run,
    run_sdpa,
)
from maskattn_deploy.ops.reference import gated_attention_reference
from maskattn_deploy.ops.torch_op import gated_attention, gated_attention_op


def explicit(q, k, v, g, threshold: float, scale: float) -> torch.Tensor:
    """Row by row in Python floats: open set with the first-argmax fallback, softmax, sum p*v."""
    b, h, n, d = q.shape
    t = k.shape[2]
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for ni in range(n):
            gate = [float(x) for x in g[bi, ni]]
            opened = [j for j in range(t) if gate[j] > threshold] or [gate.index(max(gate))]
            for hi in range(h):
                s = [scale * float(q[bi, hi, ni].double() @ k[bi, hi, j].double()) for j in opened]
                e = [math.exp(x - max(s)) for x in s]
                for j, ej in zip(opened, e, strict=True):
                    out[bi, hi, ni] += ej / sum(e) * v[bi, hi, j].double()
    return out


@pytest.mark.parametrize(("t", "threshold"), [(1, 0.0), (2, 0.0), (13, 0.0), (13, 0.7), (13, -9.0)])
def test_reference_matches_explicit(t: int, threshold: float) -> None:
    inputs = random_inputs((2, 2, 5, t, 8), dtype=torch.float32, open_fraction=0.3, seed=t)
    i = inputs
    got = gated_attention_reference(i.q, i.k, i.v, i.gate_logits, threshold, i.scale)
    want = explicit(i.q, i.k, i.v, i.gate_logits, threshold, i.scale)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)  # fp32 matmul rounding


def test_reference_fallback_and_ties() -> None:
    i = random_inputs((1, 2, 3, 10, 8), dtype=torch.float32)
    g = torch.full((1, 3, 10), -2.0)
    g[0, 0, 3] = g[0, 0, 7] = -0.5  # nothing open, tie: token 3
    g[0, 1, 5] = 1.0  # one open token
    g[0, 2] = torch.linspace(-1, 1, 10)  # tokens 5..9 open
    got = gated_attention_reference(i.q, i.k, i.v, g, 0.0, i.scale)
    assert torch.equal(got[0, :, 0], i.v[0, :, 3]) and torch.equal(got[0, :, 1], i.v[0, :, 5])
    torch.testing.assert_close(
        got.double(), explicit(i.q, i.k, i.v, g, 0.0, i.scale), atol=1e-6, rtol=0
    )


# FlexAttention keeps the scores in fp32 like the kernel; the explicit path rounds them to the
# input dtype first (measured on this CPU: 1e-3 fp16, 8e-3 bf16, 4e-7 fp32).
FLEX_ATOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("t", "d"), [(1, 16), (2, 64), (77, 80), (154, 128), (231, 16)])
def test_flex_matches_reference(t: int, d: int, dtype: torch.dtype) -> None:
    i = random_inputs((2, 3, 7, t, d), dtype=dtype, seed=d + t)
    i.gate_logits[0, 1] = -5.0  # an all-closed row: the argmax fallback
    got = flex_gated_attention(i.q, i.k, i.v, i.gate_logits, i.threshold, i.scale)
    want = gated_attention_reference(i.q, i.k, i.v, i.gate_logits, i.threshold, i.scale)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=FLEX_ATOL[dtype], rtol=0)
    best = int(i.gate_logits[0, 1].argmax())
    assert torch.equal(got[0, :, 1], i.v[0, :, best])  # p = 1 on one token: v copied exactly


@pytest.mark.parametrize("impl", ["reference", "triton", "flex"])
def test_op_impls_on_cpu(impl: str) -> None:
    i = random_inputs((2, 2, 9, 77, 16), dtype=torch.float32)
    got = run(i, impl)
    want = gated_attention_reference(i.q, i.k, i.v, i.gate_logits, i.threshold, i.scale)
    # triton on CPU without TRITON_INTERPRET takes the reference path: bit-identical.
    torch.testing.assert_close(got, want, atol=0 if impl != "flex" else 2e-6, rtol=0)
    assert got.transpose(1, 2).is_contiguous()  # [b, n, h, d] memory, like SDPA's output


def test_forced_open_equals_sdpa() -> None:
    i = random_inputs((2, 2, 9, 77, 16), dtype=torch.float32)
    i.threshold = float("-inf")
    for impl in ("reference", "flex"):
        torch.testing.assert_close(run(i, impl), run_sdpa(i), atol=2e-6, rtol=0)


def test_random_inputs_open_fraction() -> None:
    i = random_inputs((1, 1, 256, 77, 16), open_fraction=0.25)
    assert i.shape == (1, 1, 256, 77, 16)
    assert abs(float((i.gate_logits > 0).float().mean()) - 0.25) < 0.02
    assert i.q.dtype == torch.float16 and i.gate_logits.dtype == torch.float32
    with pytest.raises(ValueError, match="open_fraction"):
        random_inputs((1, 1, 4, 4, 16), open_fraction=0.0)


def test_errors_name_the_problem() -> None:
    i = random_inputs((1, 2, 4, 7, 16), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"gate logits \[b,n,t\]"):
        gated_attention_op(i.q, i.k, i.v, i.gate_logits[:, None])
    with pytest.raises(ValueError, match="do not match"):
        gated_attention_op(i.q, i.k, i.v, i.gate_logits[..., :5])
    with pytest.raises(ValueError, match=r"k .* and v .* must both be \[b,h,t,d\]"):
        gated_attention_op(i.q, i.k, i.v[..., :8], i.gate_logits)
    with pytest.raises(TypeError, match="share one floating dtype"):
        gated_attention_op(i.q, i.k.half(), i.v, i.gate_logits)
    with pytest.raises(ValueError, match="impl must be one of triton, flex, reference"):
        gated_attention_op(i.q, i.k, i.v, i.gate_logits, impl="cudnn")


def test_fake_kernel_matches_the_real_output() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    i = random_inputs((2, 3, 5, 77, 16), dtype=torch.float16)
    real = run(i, "reference")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = gated_attention(
            *(mode.from_tensor(x) for x in (i.q, i.k, i.v, i.gate_logits)), 0.0, 0.25, "triton"
        )
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert fake.stride() == real.stride()  # compiled code relies on the fake's layout


def test_torch_compile_traces_the_op_without_graph_breaks() -> None:
    i = random_inputs((2, 2, 9, 77, 16), dtype=torch.float32)

    def layer(q, k, v, g):
        o = gated_attention_op(q * 1.0, k, v, g, 0.0, 0.25)
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # [b, n, h*d]

    explanation = torch._dynamo.explain(layer)(i.q, i.k, i.v, i.gate_logits)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(i.q, i.k, i.v, i.gate_logits), layer(i.q, i.k, i.v, i.gate_logits)
    )


def test_sdpa_entry_point_is_unmasked_attention() -> None:
    i = random_inputs((1, 2, 6, 77, 16), dtype=torch.float32)
    want = F.scaled_dot_product_attention(i.q.contiguous(), i.k.contiguous(), i.v.contiguous())
    torch.testing.assert_close(run_sdpa(i), want, atol=1e-6, rtol=0)
