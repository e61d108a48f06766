"""Gated cross-attention in one pass: a Triton kernel for the ``maskattn::gated_attention`` op.

The problem
-----------
A gated cross-attention layer computes, for queries ``q [b, h, n, d]``, keys and values
``k, v [b, h, t, d]`` and gate logits ``G [b, n, t]`` (fp32, shared by the heads)::

    s = scale * q k^T                       [b, h, n, t]
    p = masked_softmax(s, G > threshold)    open set, argmax fallback (docs/design.md section 2.2)
    o = p v                                 [b, h, n, d]

The explicit path (the reference in :mod:`maskattn_deploy.ops.reference`) writes ``s`` and
``p`` to memory and builds the open set with about eight small kernels; a plain attention layer
makes one flash-attention call instead. ``t`` is the text length (77 in SDXL, up to 256 here),
so one program holds a whole row of ``s`` in registers and never needs the online softmax of
flash attention: it reads ``q`` once, ``k`` and ``v`` (a few hundred kB, from the L2) once per
head, the gate rows once for all the heads it handles, and writes ``o`` once.

The kernel
----------
One program handles ``BLOCK_N`` query rows of ``HEADS`` consecutive heads of one batch. It
loads the gate rows ``[BLOCK_N, BLOCK_T]`` and forms the open set with the argmax fallback
(lowest index on ties) once, then for each of its heads: ``s = tl.dot(q, k^T) * SCALE`` in fp32,
closed tokens set to ``-inf``, row max, ``exp``, row sum, ``p = e / sum`` (exact zeros where
closed), ``o = tl.dot(p, v)`` accumulated in fp32 and stored in the output dtype. ``p`` is
rounded to the dtype of ``v`` before the second product, as the explicit path and flash
attention do. fp32 inputs use IEEE fp32 products (no TF32), like torch's default matmul.

``t`` is padded to the power of two ``BLOCK_T`` (at least 16, the smallest ``tl.dot`` tile)
and ``d`` to ``BLOCK_D`` (64, 128, and 128 for ``d = 80``); padded lanes are masked loads of 0.
Programs are numbered head-group fastest, so the programs that read the same gate rows run
next to each other. Every tensor comes with its strides (the last dimension must be
contiguous), so the projections' ``[b, n, h, d]`` memory viewed as ``[b, h, n, d]`` is read
without a copy, and the output can be written in that layout too (what the op returns, so the
processor's ``transpose + reshape`` back to ``[b, n, h*d]`` is free).

Tiling (``BLOCK_N``, ``num_warps``, ``HEADS``) is a launch parameter. :func:`launch_config`
gives a default that has not been measured on a GPU: ``HEADS`` is the largest divisor of ``h``
that still leaves :data:`TARGET_PROGRAMS` programs (``HEADS = h`` forms the open set once per
row for all heads but gives ``b * n / BLOCK_N`` programs, 64 at SDXL's mid stage with
``BLOCK_N = 32``, too few for a 132-SM GPU). The GPU check times :data:`TUNING_CANDIDATES`.

Calling convention (TensorRT AOT plugins): input pointers, int32 scalars, output pointer::

    q, k, v, g, heads, n_tokens, t, d,
    sq_b, sq_h, sq_n, skv_b, skv_h, skv_t, sg_b, sg_n, so_b, so_h, so_n, o

``THRESHOLD`` and ``SCALE`` are compile-time constants (TensorRT passes only int32 scalars to
AOT kernels, so both are baked into the PTX). k and v share one set of strides.

Registers and shared memory
---------------------------
The compiler resource report (:mod:`maskattn_deploy.plugins.kernel_resources`, sm_90, fp16,
t = 77, d = 64) decided two things. First, the AOT compile declares what Triton's JIT infers
from the arguments: 16-byte aligned pointers and q/k/v/o strides that are multiples of 16
elements (true whenever ``d % 16 == 0``); without it every load is scalar and the default
tiling needs 200 registers, with it 128 and no spills. Second, a head loop (``HEADS > 1``)
is software-pipelined with :func:`pipeline_stages` = 2 (the next head's q/k/v load while this
head computes): 155 registers, 44 kB of shared memory, no spills; Triton's default of 3 stages
needs 80 kB. Tiles of 256 x 128 (long prompts with d = 128) are not pipelined and spill.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

logger = logging.getLogger(__name__)

KERNEL_NAME = "gated_attention_kernel"
MAX_T = 256  # one row of s in registers; longer prompts take the reference/flex path
MAX_HEAD_DIM = 256
MIN_BLOCK = 16  # smallest tl.dot tile
# Architectures compiled in CI (the masked-softmax kernel's list); any sm_80+ target works.
SUPPORTED_ARCHS = (80, 86, 89, 90)
MIN_ARCH = 80  # bf16 tl.dot needs sm_80
# Programs the default tiling aims at: about four per SM of a 132-SM GPU.
TARGET_PROGRAMS = 512
DTYPES = ("fp16", "bf16", "fp32")

Tiling = tuple[int, int, int]  # (BLOCK_N, num_warps, HEADS)
# (BLOCK_N, num_warps, HEADS) the GPU check times; HEADS = 0 means all heads of the layer.
# One-warp tilings are left out: a [128, d] k/v tile through one warp's registers spills.
TUNING_CANDIDATES: tuple[Tiling, ...] = (
    (32, 4, 1), (64, 8, 1), (16, 4, 1), (32, 4, 2),
    (32, 8, 2), (32, 4, 5), (16, 4, 0), (32, 4, 0),
)  # fmt: skip


@triton.jit
def gated_attention_kernel(
    q_ptr,  # *fp16|bf16|fp32  [b, h, n, d], last dim contiguous
    k_ptr,  # *same            [b, h, t, d]
    v_ptr,  # *same            [b, h, t, d]
    g_ptr,  # *fp32|same       gate logits [b, n, t], last dim contiguous
    heads,  # i32 h
    n_tokens,  # i32 n
    t,  # i32 text tokens
    d,  # i32 head dim
    sq_b, sq_h, sq_n,  # i32 strides of q (elements)
    skv_b, skv_h, skv_t,  # i32 strides of k and of v (the same)
    sg_b, sg_n,
    so_b, so_h, so_n,
    o_ptr,  # *same as q       [b, h, n, d] (any strides with a contiguous last dim)
    THRESHOLD: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEADS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blocks = tl.cdiv(n_tokens, BLOCK_N)
    groups = tl.cdiv(heads, HEADS)
    group = pid % groups
    rest = pid // groups
    block = rest % blocks
    batch = rest // blocks
    b64 = batch.to(tl.int64)  # batch offsets may exceed 2**31 elements
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < n_tokens
    col_ok = cols < t
    dim_ok = dims < d
    ok = row_ok[:, None] & col_ok[None, :]  # [BLOCK_N, BLOCK_T]

    # The open set of these rows, once for the HEADS heads (G has no head axis).
    g_offs = b64 * sg_b + rows[:, None] * sg_n + cols[None, :]
    g = tl.load(g_ptr + g_offs, mask=ok, other=float("-inf")).to(tl.float32)
    is_open = (g > THRESHOLD) & ok
    any_open = tl.max(is_open.to(tl.int32), axis=1) > 0
    g_max = tl.max(g, axis=1)  # fallback: first column holding the row maximum
    first_max = tl.min(tl.where((g == g_max[:, None]) & ok, cols[None, :], BLOCK_T), axis=1)
    fallback = cols[None, :] == first_max[:, None]
    keep = tl.where(any_open[:, None], is_open, fallback) & ok

    kv_mask = col_ok[:, None] & dim_ok[None, :]  # [BLOCK_T, BLOCK_D]
    for i in range(HEADS):
        head = group * HEADS + i
        live = row_ok & ((rows * 0 + head) < heads)  # a tensor mask: the last group may be partial
        q_offs = b64 * sq_b + head * sq_h + rows[:, None] * sq_n + dims[None, :]
        q = tl.load(q_ptr + q_offs, mask=live[:, None] & dim_ok[None, :], other=0.0)
        kv_head = head % heads  # in range even past the last head (its rows are not stored)
        kv_offs = b64 * skv_b + kv_head * skv_h + cols[:, None] * skv_t + dims[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE  # [BLOCK_N, BLOCK_T] fp32
        s = tl.where(keep, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        e = tl.where(keep, tl.exp(s - s_max[:, None]), 0.0)
        p = e / tl.sum(e, axis=1)[:, None]
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        o = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [BLOCK_N, BLOCK_D] fp32
        o_offs = b64 * so_b + head * so_h + rows[:, None] * so_n + dims[None, :]
        tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=live[:, None] & dim_ok[None, :])


# --- sizes and tiling ----------------------------------------------------------------------


def block_t(t: int) -> int:
    """``BLOCK_T`` for ``t`` text tokens: the next power of two, at least 16."""
    if not 1 <= t <= MAX_T:
        raise ValueError(f"the fused gated-attention kernel takes 1 <= t <= {MAX_T}, got t={t}")
    return max(MIN_BLOCK, triton.next_power_of_2(t))


def block_d(d: int) -> int:
    """``BLOCK_D`` for head dim ``d``: the next power of two, at least 16 (80 -> 128)."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"the fused gated-attention kernel takes head dims 1..{MAX_HEAD_DIM}, got {d}"
        )
    return max(MIN_BLOCK, triton.next_power_of_2(d))


def check_tiling(tiling: Tiling) -> None:
    """Raise ValueError unless ``(BLOCK_N, num_warps, HEADS)`` is a tiling the kernel takes."""
    rows, num_warps, heads = tiling
    if rows < MIN_BLOCK or rows & (rows - 1) or rows > 128:
        raise ValueError(f"BLOCK_N must be a power of two in [16, 128], got {rows}")
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps}")
    if heads < 0:
        raise ValueError(f"heads per program must be >= 0 (0: all heads), got {heads}")


def default_rows(block_t_: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)``: 32 rows on 4 warps up to ``BLOCK_T = 128``, 16 above.

    A row of ``s`` lives in registers: 32 x 128 fp32 on 128 threads is 32 values per thread,
    like 16 x 256 (the compiler resource report shows no spills for either).
    """
    return (32, 4) if block_t_ <= 128 else (16, 4)


def heads_per_program(batch: int, heads: int, n_tokens: int, rows: int) -> int:
    """Largest divisor of ``heads`` that keeps at least :data:`TARGET_PROGRAMS` programs.

    One head per program when even that gives fewer; all heads when the rows alone give enough.
    """
    base = batch * triton.cdiv(n_tokens, rows)
    for group in range(heads, 0, -1):
        if heads % group == 0 and base * (heads // group) >= TARGET_PROGRAMS:
            return group
    return 1


def resolve_tiling(
    tiling: Tiling | None, t: int, batch: int, heads: int, n_tokens: int
) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, HEADS)`` with HEADS in ``1..heads`` (0 resolved to all heads)."""
    if tiling is None:
        rows, warps = default_rows(block_t(t))
        return rows, warps, heads_per_program(batch, heads, n_tokens, rows)
    check_tiling(tiling)
    rows, warps, group = tiling
    return rows, warps, heads if group == 0 else min(group, heads)


def pipeline_stages(block_t_: int, block_d_: int, heads: int) -> int:
    """Software-pipeline stages of the head loop: 2 (prefetch the next head) when it has more
    than one iteration and the tiles are at most 128 x 128, else 1 (no prefetch buffers)."""
    return 2 if heads > 1 and block_t_ * block_d_ <= 128 * 128 else 1


def grid_programs(batch: int, heads: int, n_tokens: int, rows: int, group: int) -> int:
    """Programs for ``q [batch, heads, n_tokens, d]``: the kernel's split of its program id."""
    return batch * triton.cdiv(heads, group) * triton.cdiv(n_tokens, rows)


# --- launch on torch tensors ---------------------------------------------------------------


def gated_attention_triton(
    q: Any,
    k: Any,
    v: Any,
    gate_logits: Any,
    threshold: float = 0.0,
    scale: float | None = None,
    out: Any = None,
    tiling: Tiling | None = None,
) -> Any:
    """Launch the kernel on torch tensors; returns ``o [b, h, n, d]``.

    CUDA tensors (a normal launch) or CPU tensors under ``TRITON_INTERPRET=1``. ``scale``
    defaults to ``d ** -0.5``. ``out`` may be a preallocated (possibly dirty) ``[b, h, n, d]``
    tensor of q's dtype with a contiguous last dim; by default the output is allocated in the
    ``[b, n, h, d]`` memory layout (returned as a ``[b, h, n, d]`` view), like SDPA's.
    ``tiling`` is ``(BLOCK_N, num_warps, HEADS)`` (HEADS 0: all heads); default
    :func:`resolve_tiling`.
    """
    from maskattn_deploy.ops.reference import check_attention_shapes

    check_attention_shapes(q, k, v, gate_logits)
    b, h, n, d = q.shape
    t = k.shape[2]
    q, k, v, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, gate_logits))
    if k.stride() != v.stride():  # the kernel takes one set of strides for both
        k, v = k.contiguous(), v.contiguous()
    if out is None:
        out = q.new_empty(b, n, h, d).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be a [b,h,n,d] tensor of q's dtype with a contiguous last dim")
    if b * h * n == 0:
        return out
    rows, warps, group = resolve_tiling(tiling, t, b, h, n)
    grid = (grid_programs(b, h, n, rows, group),)
    gated_attention_kernel[grid](
        q, k, v, g, h, n, t, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        g.stride(0), g.stride(1), out.stride(0), out.stride(1), out.stride(2), out,
        THRESHOLD=float(threshold), SCALE=float(d**-0.5 if scale is None else scale),
        BLOCK_N=rows, BLOCK_T=block_t(t), BLOCK_D=block_d(d), HEADS=group, num_warps=warps,
        num_stages=pipeline_stages(block_t(t), block_d(d), group),
    )  # fmt: skip
    return out


# --- ahead-of-time compilation -------------------------------------------------------------


@dataclass(frozen=True)
class LaunchMetadata:
    """What a launcher needs besides the PTX: block size, shared memory, tiling, constants."""

    num_warps: int
    shared_mem: int
    block_n: int
    block_t: int
    block_d: int
    heads_per_program: int
    threshold: float
    scale: float
    arch: int
    dtype: str

    @property
    def block_x(self) -> int:
        return self.num_warps * 32

    def grid_x(self, batch: int, heads: int, n_tokens: int) -> int:
        """Programs for ``q [batch, heads, n_tokens, d]``."""
        return grid_programs(batch, heads, n_tokens, self.block_n, self.heads_per_program)


SCALAR_ARGS = (
    "heads", "n_tokens", "t", "d",
    "sq_b", "sq_h", "sq_n", "skv_b", "skv_h", "skv_t", "sg_b", "sg_n", "so_b", "so_h", "so_n",
)  # fmt: skip


def kernel_signature(dtype: str, gate_dtype: str = "fp32") -> dict[str, str]:
    """Triton signature of the runtime arguments for q/k/v/o of ``dtype``."""
    if dtype not in DTYPES or gate_dtype not in DTYPES:
        raise ValueError(f"dtype and gate dtype must be one of {DTYPES}, got {dtype}/{gate_dtype}")
    ptr = f"*{dtype}"
    sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "g_ptr": f"*{gate_dtype}"}
    sig.update(dict.fromkeys(SCALAR_ARGS, "i32"))
    sig["o_ptr"] = ptr
    return sig


@dataclass(frozen=True)
class CompileRequest:
    """One AOT compile of the kernel: types, shape constants, baked-in constants and tiling."""

    dtype: str
    arch: int
    t: int
    head_dim: int
    threshold: float = 0.0
    scale: float | None = None  # default head_dim ** -0.5
    tiling: Tiling = (32, 4, 1)  # HEADS must be >= 1 here (the head count is not known)
    gate_dtype: str = "fp32"
    ptx_version: int | None = None


# Arguments a launch on contiguous (or projection-layout) tensors makes multiples of 16: the
# pointers (16-byte aligned allocations) and, when d % 16 == 0, d and every q/k/v/o stride.
_ALIGNED_POINTERS = ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "o_ptr")
_ALIGNED_WITH_D = ("d", "sq_b", "sq_h", "sq_n", "skv_b", "skv_h", "skv_t", "so_b", "so_h", "so_n")


def alignment_attrs(head_dim: int) -> dict[tuple[int, ...], list[list[Any]]]:
    """``tt.divisibility`` hints for an AOT compile: what the JIT infers from real arguments.

    The launcher (TensorRT) must pass 16-byte aligned buffers; strides are multiples of 16
    for contiguous ``[b, h, *, d]`` tensors when ``d`` is.
    """
    names = gated_attention_kernel.arg_names
    aligned = _ALIGNED_POINTERS + (_ALIGNED_WITH_D if head_dim % 16 == 0 else ())
    return {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}


def compile_kernel(request: CompileRequest) -> Any:
    """``triton.compile`` for ``sm_<arch>`` without a GPU; returns Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if request.arch < MIN_ARCH:
        raise ValueError(f"arch must be sm_{MIN_ARCH} or newer (bf16 products), got {request.arch}")
    check_tiling(request.tiling)
    rows, warps, group = request.tiling
    if group < 1:
        raise ValueError("an AOT compile needs HEADS >= 1 (the head count is a runtime value)")
    scale = request.head_dim**-0.5 if request.scale is None else request.scale
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    src = ASTSource(
        fn=gated_attention_kernel,
        signature=kernel_signature(request.dtype, request.gate_dtype),
        attrs=alignment_attrs(request.head_dim),
        constexprs={
            "THRESHOLD": float(request.threshold),
            "SCALE": float(scale),
            "BLOCK_N": rows,
            "BLOCK_T": block_t(request.t),
            "BLOCK_D": block_d(request.head_dim),
            "HEADS": group,
        },
    )
    options: dict[str, Any] = {
        "num_warps": warps,
        "num_stages": pipeline_stages(block_t(request.t), block_d(request.head_dim), group),
    }
    if request.ptx_version is not None:
        options["ptx_version"] = request.ptx_version
    return triton.compile(src, target=GPUTarget("cuda", request.arch, 32), options=options)


def compile_ptx(request: CompileRequest) -> tuple[str, str, LaunchMetadata]:
    """``(ptx, kernel_name, metadata)`` for one :class:`CompileRequest`.

    The PTX is exactly what TensorRT launches: the scratch-pointer parameters Triton appends
    after ``o`` are removed (the masked-softmax kernel's helper, which refuses a kernel that
    reads them or needs scratch memory).
    """
    from maskattn_deploy.plugins.masked_softmax_triton import strip_scratch_params

    compiled = compile_kernel(request)
    meta = compiled.metadata
    n_args = len(kernel_signature(request.dtype, request.gate_dtype))
    ptx = strip_scratch_params(compiled.asm["ptx"], meta.name, n_args, meta)
    rows, _, group = request.tiling
    launch = LaunchMetadata(
        num_warps=meta.num_warps,
        shared_mem=meta.shared,
        block_n=rows,
        block_t=block_t(request.t),
        block_d=block_d(request.head_dim),
        heads_per_program=group,
        threshold=float(request.threshold),
        scale=float(request.head_dim**-0.5 if request.scale is None else request.scale),
        arch=request.arch,
        dtype=request.dtype,
    )
    logger.debug("compiled %s for sm_%d (%s, %s)", meta.name, request.arch, request.dtype, launch)
    return ptx, meta.name, launch
