"""The implementations behind ``maskattn::gated_attention`` and entry points to time them.

``impl`` selects one (see docs/design.md section 7.1):

``triton``
    The fused Triton kernel (:mod:`maskattn_deploy.plugins.gated_attention_triton`) for CUDA
    tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter);
    the explicit reference path for anything else. The default.
``flex``
    PyTorch's FlexAttention with a ``score_mod`` that reads the open set (formed once per call
    by :func:`~maskattn_deploy.ops.reference.open_mask`, shared by the heads): compiled with
    ``torch.compile`` on CUDA, the eager (dense) FlexAttention everywhere else.
``reference``
    :func:`~maskattn_deploy.ops.reference.gated_attention_reference`, the oracle.

Every implementation returns ``o [b, h, n, d]`` in the ``[b, n, h, d]`` memory layout (a
transposed view), the layout the op's fake kernel promises and SDPA returns, so a caller's
``o.transpose(1, 2).reshape(b, n, h * d)`` needs no copy.

:func:`random_inputs`, :func:`run` and :func:`run_sdpa` are what a benchmark needs: build
inputs of a shape, call one implementation once, and call the unmasked SDPA baseline on the
same shapes.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from maskattn_deploy.ops.contract import ATTENTION_IMPLS, DEFAULT_ATTENTION_IMPL, DEFAULT_THRESHOLD
from maskattn_deploy.ops.reference import (
    check_attention_shapes,
    gated_attention_reference,
    open_mask,
)


def check_impl(impl: str) -> str:
    """Return ``impl`` or raise ValueError naming the choices."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"gated attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}"
        )
    return impl


def bnhd_layout(o: torch.Tensor) -> torch.Tensor:
    """``o [b, h, n, d]`` as a view of ``[b, n, h, d]`` memory (copied only when it is not)."""
    if o.transpose(1, 2).is_contiguous():
        return o
    b, h, n, d = o.shape
    return o.new_empty(b, n, h, d).transpose(1, 2).copy_(o)


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised output for ``q [b, h, n, d]`` in the op's layout (used by the fake)."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def triton_runs_here(q: torch.Tensor) -> bool:
    """True when the Triton kernel can take ``q``: CUDA with Triton, or the interpreter on CPU."""
    from maskattn_deploy._lazy import available

    if not available("triton"):
        return False
    return q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def triton_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when the shapes are within the kernel's limits (t <= 256, d <= 256)."""
    from maskattn_deploy.plugins.gated_attention_triton import MAX_HEAD_DIM, MAX_T

    return 1 <= k.shape[2] <= MAX_T and 1 <= q.shape[-1] <= MAX_HEAD_DIM


def run_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float,
    scale: float,
    impl: str,
) -> torch.Tensor:
    """The op's body: one gated attention call with ``impl`` (see the module docstring)."""
    check_attention_shapes(q, k, v, gate_logits)
    check_impl(impl)
    if impl == "triton" and triton_runs_here(q) and triton_fits(q, k):
        from maskattn_deploy.plugins.gated_attention_triton import gated_attention_triton

        return gated_attention_triton(q, k, v, gate_logits, threshold, scale)
    if impl == "flex":
        return bnhd_layout(flex_gated_attention(q, k, v, gate_logits, threshold, scale))
    return bnhd_layout(gated_attention_reference(q, k, v, gate_logits, threshold, scale))


def flex_gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | None = None,
) -> torch.Tensor:
    """Gated attention with FlexAttention: closed tokens' scores become ``-inf``.

    The open set (argmax fallback included) is formed once per call; every row keeps one open
    token, so no row is all ``-inf``. Compiled on CUDA (FlexAttention's fast path), eager
    elsewhere.
    """
    is_open = open_mask(gate_logits, threshold)  # [b, n, t]

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return torch.where(is_open[b, q_idx, kv_idx], score, float("-inf"))

    if q.is_cuda:
        return _compiled_flex()(q, k, v, score_mod=score_mod, scale=scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _eager_flex()(q, k, v, score_mod=score_mod, scale=scale)


def _eager_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex() -> Any:
    """FlexAttention compiled once per process (its eager form is a dense reference)."""
    return torch.compile(_eager_flex(), dynamic=False)


# --- entry points for benchmarks and the GPU check -----------------------------------------


class AttentionDims(NamedTuple):
    """The sizes of one gated attention call: batch, heads, latent tokens ``n``, text tokens
    ``t``, head width ``d`` (a plain ``(b, h, n, t, d)`` tuple unpacks the same way)."""

    batch: int
    heads: int
    n_tokens: int
    t: int
    head_dim: int


@dataclass
class GatedAttentionInputs:
    """Inputs of one gated attention call; ``q``/``k``/``v`` are ``[b, h, *, d]`` views of the
    ``[b, *, h, d]`` memory the attention projections produce."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate_logits: torch.Tensor
    threshold: float
    scale: float

    @property
    def shape(self) -> AttentionDims:
        """``(b, h, n, t, d)``."""
        b, h, n, d = self.q.shape
        return AttentionDims(b, h, n, self.k.shape[2], d)


def random_inputs(
    dims: AttentionDims | tuple[int, int, int, int, int],
    *,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    open_fraction: float = 0.3,
    seed: int = 0,
) -> GatedAttentionInputs:
    """Seeded inputs of sizes ``dims``: unit-variance q/k/v, fp32 gate logits opening about
    ``open_fraction``."""
    if not 0.0 < open_fraction <= 1.0:
        raise ValueError(f"open_fraction must be in (0, 1], got {open_fraction}")
    batch, heads, n_tokens, t, head_dim = dims
    gen = torch.Generator().manual_seed(seed)

    def projection(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, tokens, heads, head_dim, generator=gen)
        return x.to(device=device, dtype=dtype).transpose(1, 2)  # [b, h, tokens, d] view

    q, k, v = projection(n_tokens), projection(t), projection(t)
    shift = float(torch.special.ndtri(torch.tensor(min(open_fraction, 1 - 1e-6))))
    gates = (torch.randn(batch, n_tokens, t, generator=gen) + shift).to(device)
    return GatedAttentionInputs(q, k, v, gates, DEFAULT_THRESHOLD, head_dim**-0.5)


def run(inputs: GatedAttentionInputs, impl: str = DEFAULT_ATTENTION_IMPL) -> torch.Tensor:
    """One call of the ``maskattn::gated_attention`` op with ``impl``."""
    from maskattn_deploy.ops.torch_op import gated_attention_op

    i = inputs
    return gated_attention_op(i.q, i.k, i.v, i.gate_logits, i.threshold, i.scale, impl=impl)


def run_sdpa(inputs: GatedAttentionInputs) -> torch.Tensor:
    """The unmasked baseline: PyTorch's SDPA on the same q/k/v (what a plain layer runs)."""
    import torch.nn.functional as F

    i = inputs
    return F.scaled_dot_product_attention(i.q, i.k, i.v, scale=i.scale)
