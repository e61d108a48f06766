"""Masked softmax in one pass: a Triton kernel for the MaskAttn cross-attention.

The problem
-----------
Every gated cross-attention layer turns logits ``S [b, h, n, t]`` (fp16 or fp32) into
probabilities ``P`` of the same shape, restricted to the tokens that the gate logits
``G [b, 1, n, t]`` open (``g > threshold``; a row with no open token opens its argmax, lowest
index on ties; see docs/design.md section 3 and :mod:`maskattn_deploy.ops.reference`). ``t`` is the text
length: 77 in SDXL, 154 or 231 for long prompts, so a whole row fits in registers.

The naive PyTorch version (the reference) makes six full passes over ``[b, h, n, t]``
tensors: cast S to fp32, ``masked_fill``, ``softmax`` (read + write), ``masked_fill``, cast
back, plus the mask itself. The kernel below reads each logit once, reads each gate row, and
writes each probability once; everything else happens in registers.

Bytes per call (fp16 S, fp32 G)
-------------------------------
A realistic count reads G from DRAM once per call: G has no head axis, the ``h`` programs
that share a G row run close together in time and a batch's G (1.3 MB at the first SDXL
shape) stays in the H100's 50 MB L2 between them.

======================  ==========  ===========  ==========  ===========  =================
shape ``[b,h,n,t]``     read S      read G       write P     total        floor @ 3.0 TB/s
======================  ==========  ===========  ==========  ===========  =================
``[2,10,4096,77]``      12.62 MB    2.52 MB      12.62 MB    27.75 MB     9.25 us
``[2,20,1024,77]``      6.31 MB     0.63 MB      6.31 MB     13.25 MB     4.42 us
======================  ==========  ===========  ==========  ===========  =================

(MB = 1e6 bytes; ``S = b*h*n*t*2``, ``G = b*n*t*4``, ``P = S``.) The floor divides the total
by the ~3.0 TB/s that a device-to-device copy reaches on an H100 counting read + write bytes.
If G were re-read from DRAM by every head it would add ``(h-1) * G`` (another 22.7 MB and
11.4 MB): the kernel would then be twice the floor, which is why the L2 matters. Both floors
are of the order of a kernel launch (a few microseconds), so inside a TensorRT engine the
plugin costs about one launch per gated layer; the GPU validation script measures the kernel
against a copy of the same bytes.

The kernel
----------
One program handles ``ROWS`` consecutive token rows of ``HEADS`` consecutive heads of one
batch, with ``t`` padded to the power of two ``BLOCK_T`` and masked. It loads the gate rows
once, forms the open set with the argmax fallback once, then for each of its heads loads S,
takes the max and the sum of ``exp`` over the open set in fp32, and stores ``exp * (1 / sum)``
where open and an exact ``0`` elsewhere, so the output buffer's old contents never leak. A
non-finite logit only touches its own row. Programs are numbered head-group fastest
(``pid = ((batch * blocks) + block) * groups + group``), so programs that read the same gate
rows run next to each other and G comes from the L2 after the first of them. Each program
splits its id with scalar integer divisions; rows need only multiplies (a 64-bit division of
every row index costs more than the memory traffic).

The tiling (``ROWS``, ``num_warps``, ``HEADS``: a :class:`Tiling`) is a launch parameter passed
explicitly: :func:`launch_config` gives the default, and the GPU check
(``maskattn-deploy selftest --gpu``) times the candidates in :data:`TUNING_CANDIDATES` and
passes the fastest to its later launches. With ``BLOCK_T >= 32 * num_warps`` Triton
spreads a row over several warps and every row reduction goes through shared memory, so one
warp per program is the default for the text lengths of SDXL. ``HEADS > 1`` shares the gate
work between heads and gives each warp several independent S loads in flight; it is not the
default until a GPU run has measured it.

The kernel's runtime arguments follow the calling convention of TensorRT's AOT Python
plugins: input pointers, then int32 scalars, then output pointers
(``S, G, n_rows, heads, n_tokens, t, P``). ``THRESHOLD``, ``BLOCK_T``, ``ROWS`` and ``HEADS``
are compile-time constants; TensorRT does not serialize plugin attributes for AOT kernels, so the
threshold is baked into the PTX. The grid is ``b * cdiv(h, HEADS) * cdiv(n, ROWS)`` programs
(:meth:`LaunchMetadata.grid_x`). :func:`compile_ptx` returns the PTX exactly as TensorRT
receives it: the scratch-pointer parameters that Triton appends to every kernel are removed
(TensorRT's AOT launch passes only the seven arguments above).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# Elements per thread the default tiling aims at (ROWS * BLOCK_T / (32 * num_warps)): 16 gives
# ROWS = 4 at t = 77, the fastest tiling on an H200 (benchmarks/2026-11-27-nvidia-h200-run2:
# 24.1 us geomean against 37.8 us for ROWS = 8 and 85.9 us for ROWS = 64 at 4 warps).
ELEMENTS_PER_THREAD = 16
# Largest padded row the single-pass kernel handles (t <= 1024 keeps a row in registers).
MAX_BLOCK_T = 1024
KERNEL_NAME = "masked_softmax_kernel"
# Architectures compiled in CI; any sm_75+ target Triton knows is accepted.
SUPPORTED_ARCHS = (80, 86, 89, 90)
MIN_ARCH = 75
# (ROWS, num_warps, HEADS) tilings the GPU check times at BLOCK_T = 128 (t = 77): the best
# ones of the 2026-11-27 H200 sweep ((16, 1), (32, 1), (32, 2), (16, 4) and (64, 4) were
# slower), then head groups, not measured yet.
TUNING_CANDIDATES = (
    (4, 1, 1), (2, 1, 1), (8, 2, 1), (8, 1, 1),
    (4, 1, 2), (2, 1, 4), (4, 1, 5), (2, 1, 10),
)  # fmt: skip


@triton.jit
def masked_softmax_kernel(
    s_ptr,  # *fp16|fp32  logits [b, h, n, t], contiguous
    g_ptr,  # *fp32|fp16  gate logits [b, 1, n, t], contiguous
    n_rows,  # i32  b * h * n (kept for the calling convention; the grid covers it)
    heads,  # i32  h
    n_tokens,  # i32  n
    t,  # i32  text tokens (row length)
    p_ptr,  # *same as S  probabilities [b, h, n, t]
    THRESHOLD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROWS: tl.constexpr,
    HEADS: tl.constexpr = 1,
):
    # Program id -> (batch, block of token rows, group of HEADS heads), group fastest; scalar
    # divisions only.
    pid = tl.program_id(0)
    blocks = tl.cdiv(n_tokens, ROWS)
    groups = tl.cdiv(heads, HEADS)
    group = pid % groups
    rest = pid // groups
    block = rest % blocks
    batch = rest // blocks
    tokens = block * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    ok = (tokens < n_tokens)[:, None] & (cols < t)[None, :]  # [ROWS, BLOCK_T]

    # The open set of these token rows, once for all heads (G has no head axis).
    g_rows = batch.to(tl.int64) * n_tokens + tokens  # 64-bit: b*h*n*t may exceed 2**31
    g = tl.load(g_ptr + (g_rows[:, None] * t + cols[None, :]), mask=ok, other=float("-inf"))
    g = g.to(tl.float32)
    is_open = (g > THRESHOLD) & ok
    any_open = tl.max(is_open.to(tl.int32), axis=1) > 0  # [ROWS]
    # Fallback: the first column holding the row maximum of g (lowest index on ties).
    g_max = tl.max(g, axis=1)
    first_max = tl.min(tl.where((g == g_max[:, None]) & ok, cols[None, :], BLOCK_T), axis=1)
    fallback = cols[None, :] == first_max[:, None]
    keep = tl.where(any_open[:, None], is_open, fallback) & ok

    for i in tl.static_range(HEADS):  # unrolled: the heads' S loads are independent
        head = group * HEADS + i
        live = ok & ((tokens * 0 + head) < heads)[:, None]  # a tensor mask (last group)
        s_rows = (batch.to(tl.int64) * heads + head) * n_tokens + tokens
        s_offs = s_rows[:, None] * t + cols[None, :]
        s = tl.load(s_ptr + s_offs, mask=live, other=0.0).to(tl.float32)
        s = tl.where(keep, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        e = tl.where(keep, tl.exp(s - s_max[:, None]), 0.0)
        inv = 1.0 / tl.sum(e, axis=1)
        p = tl.where(keep, e * inv[:, None], 0.0)
        tl.store(p_ptr + s_offs, p.to(p_ptr.dtype.element_ty), mask=live)


def padded_t(t: int) -> int:
    """``BLOCK_T`` for rows of length ``t``: the next power of two (at least 2)."""
    if t < 1:
        raise ValueError(f"masked_softmax needs at least one text token, got t={t}")
    block_t = max(2, triton.next_power_of_2(t))
    if block_t > MAX_BLOCK_T:
        raise ValueError(f"masked_softmax kernel supports t <= {MAX_BLOCK_T}, got t={t}")
    return block_t


class Tiling(NamedTuple):
    """How the kernel splits the work: token rows and heads per program, warps per program."""

    rows: int
    num_warps: int
    heads: int = 1


MAX_HEADS_PER_PROGRAM = 32


def launch_config(block_t: int) -> Tiling:
    """The default tiling for padded rows of ``block_t`` (a pure function of ``block_t``).

    One warp per program up to ``BLOCK_T = 256`` (a row's reductions stay inside the warp),
    four above; ``ROWS`` gives each thread about :data:`ELEMENTS_PER_THREAD` elements; one
    head per program. Another tiling (a tuning result) is passed explicitly to
    :func:`masked_softmax_triton` and :func:`compile_ptx`.
    """
    num_warps = 1 if block_t <= 256 else 4
    return Tiling(max(1, ELEMENTS_PER_THREAD * 32 * num_warps // block_t), num_warps, 1)


def check_tiling(tiling: Tiling | tuple[int, ...]) -> Tiling:
    """``tiling`` as a :class:`Tiling` after checking it; ValueError names the bad field."""
    tiling = Tiling(*tiling)
    rows, num_warps, heads = tiling
    if rows < 1 or rows & (rows - 1) or num_warps not in (1, 2, 4, 8):
        raise ValueError(
            f"rows must be a power of two and num_warps 1/2/4/8, got {rows}/{num_warps}"
        )
    if not 1 <= heads <= MAX_HEADS_PER_PROGRAM:
        raise ValueError(f"heads per program must be 1..{MAX_HEADS_PER_PROGRAM}, got {heads}")
    return tiling


def grid_programs(batch: int, heads: int, n_tokens: int, rows: int, heads_per_program: int) -> int:
    """Programs for S ``[batch, heads, n_tokens, t]``: the kernel's split of its program id."""
    return batch * triton.cdiv(heads, heads_per_program) * triton.cdiv(n_tokens, rows)


def masked_softmax_triton(
    S: Any,
    G: Any,
    threshold: float = 0.0,
    out: Any = None,
    tiling: Tiling | None = None,
) -> Any:
    """Launch the kernel on torch tensors ``S [b,h,n,t]``, ``G [b,1,n,t]``; returns ``P``.

    Works on CUDA tensors (a normal Triton launch) and on CPU tensors under
    ``TRITON_INTERPRET=1``. ``out`` may be a preallocated (possibly dirty) buffer like ``S``.
    ``tiling`` is a :class:`Tiling` ``(ROWS, num_warps, HEADS)``; by default :func:`launch_config`.
    """
    from maskattn_deploy.ops.reference import check_shapes

    check_shapes(S, G)
    b, h, n, t = S.shape
    if G.shape[1] != 1:
        raise ValueError(
            "the Triton masked_softmax kernel takes gate logits shared over heads [b,1,n,t]"
        )
    S = S.contiguous()
    G = G.contiguous()
    if out is None:
        out = S.new_empty(S.shape)
    elif out.shape != S.shape or out.dtype != S.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor with the shape and dtype of S")
    n_rows = b * h * n
    if n_rows == 0:
        return out
    block_t = padded_t(t)
    rows, num_warps, heads = check_tiling(tiling) if tiling is not None else launch_config(block_t)
    grid = (grid_programs(b, h, n, rows, heads),)
    masked_softmax_kernel[grid](
        S, G, n_rows, h, n, t, out,
        THRESHOLD=float(threshold), BLOCK_T=block_t, ROWS=rows, HEADS=heads,
        num_warps=num_warps,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class LaunchMetadata:
    """What a launcher needs besides the PTX: block size, shared memory and the tiling."""

    num_warps: int
    shared_mem: int
    block_t: int
    rows_per_program: int
    heads_per_program: int
    threshold: float
    arch: int
    dtype: str
    ptx_version: int = 0  # the PTX ISA the entry declares (84 for 8.4)

    @property
    def block_x(self) -> int:
        return self.num_warps * 32

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.rows_per_program, self.num_warps, self.heads_per_program)

    def grid_x(self, batch: int, heads: int, n_tokens: int) -> int:
        """Programs for S ``[batch, heads, n_tokens, t]``."""
        return grid_programs(batch, heads, n_tokens, self.rows_per_program, self.heads_per_program)


_PTR_TYPES = ("fp16", "fp32")
# Compiled-kernel metadata fields that size the buffers behind Triton's scratch parameters.
_SCRATCH_SIZES = ("global_scratch_size", "profile_scratch_size")


def kernel_signature(dtype: str, gate_dtype: str | None = None) -> dict[str, str]:
    """Triton signature of the runtime arguments: logits of ``dtype``, gates of ``gate_dtype``.

    Both are 'fp16' or 'fp32'; the gate logits default to fp32 (the export's fp32 gate island).
    """
    gate_dtype = gate_dtype or "fp32"
    for what, value in (("dtype", dtype), ("gate_dtype", gate_dtype)):
        if value not in _PTR_TYPES:
            raise ValueError(f"{what} must be 'fp16' or 'fp32', got {value!r}")
    return {
        "s_ptr": f"*{dtype}",
        "g_ptr": f"*{gate_dtype}",
        "n_rows": "i32",
        "heads": "i32",
        "n_tokens": "i32",
        "t": "i32",
        "p_ptr": f"*{dtype}",
    }


def bundled_ptxas_isa(arch: int) -> int:
    """PTX ISA (87 for 8.7) of the ptxas that Triton uses for ``sm_<arch>``, asked of Triton.

    Triton emits PTX of this ISA by default and assembles it with that ptxas, so PTX meant for
    an older driver can declare at most ``min(driver ISA, this)``.
    """
    from types import SimpleNamespace

    from triton.backends.nvidia import compiler as nvidia

    return int(nvidia.get_ptx_version_from_options(SimpleNamespace(ptx_version=None), arch))


def driver_isa(driver_version: tuple[int, int]) -> int:
    """Highest PTX ISA a CUDA driver ``(major, minor)`` can JIT (Triton's table: 12.9 -> 88)."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return int(ptx_get_version(f"{driver_version[0]}.{driver_version[1]}"))


_ENTRY = r"\.entry\s+{name}\s*\((?P<params>[^)]*)\)"
_PARAM = re.compile(r"\.param\s+\.(?P<kind>\w+)[^,]*?\s(?P<name>\w+)\s*(?:,|$)")


def _entry(ptx: str, name: str) -> re.Match[str]:
    match = re.search(_ENTRY.format(name=re.escape(name)), ptx)
    if match is None:
        raise ValueError(f"the PTX has no .entry {name}")
    return match


def entry_params(ptx: str, name: str) -> list[tuple[str, str]]:
    """``(type, name)`` of each ``.param`` of ``.entry name`` in order, e.g. ``("u64", ...)``."""
    return [(m["kind"], m["name"]) for m in _PARAM.finditer(_entry(ptx, name)["params"])]


def strip_scratch_params(ptx: str, name: str, n_args: int, metadata: Any) -> str:
    """Remove the scratch-pointer parameters Triton appended after the ``n_args`` arguments.

    Only parameters after the kernel's own arguments are candidates, and only when the body
    never reads them and the compiled metadata asks for no scratch memory (its global and
    profile scratch sizes are 0); anything else raises, since TensorRT launches the kernel
    without such buffers. Unread parameters among the kernel's own arguments (``n_rows``) stay:
    they are part of the calling convention.
    """
    match = _entry(ptx, name)
    params = entry_params(ptx, name)
    extra = params[n_args:]
    if not extra:
        return ptx
    sizes = {field: getattr(metadata, field, None) for field in _SCRATCH_SIZES}
    if any(size != 0 for size in sizes.values()):
        raise ValueError(f"{name} needs scratch memory ({sizes}); TensorRT cannot provide it")
    rest = ptx[match.end() :]
    read = [p for _, p in extra if re.search(rf"\b{re.escape(p)}\b", rest)]
    if read or any(kind != "u64" for kind, _ in extra):
        raise ValueError(f"{name}: the parameters after its arguments are not unused pointers")
    declarations = match["params"]
    keep_end = [m.end() for m in _PARAM.finditer(declarations)][n_args - 1]
    kept = declarations[:keep_end].rstrip().rstrip(",") + "\n"
    start = match.start("params")
    return ptx[:start] + kept + ptx[match.end("params") :]


def compile_ptx(
    dtype: str,
    arch: int,
    block_t: int,
    threshold: float = 0.0,
    tiling: Tiling | None = None,
    gate_dtype: str | None = None,
    ptx_version: int | None = None,
) -> tuple[str, str, LaunchMetadata]:
    """Compile the kernel ahead of time to PTX for ``sm_<arch>``; no GPU needed.

    Returns ``(ptx, kernel_name, metadata)``; the PTX is exactly what TensorRT receives (its
    entry takes the seven arguments of the calling convention, see :func:`strip_scratch_params`).
    ``block_t`` must be a power of two >= t; ``tiling`` defaults to :func:`launch_config`.
    ``ptx_version`` (84 for PTX ISA 8.4) caps the ISA for an older driver that will JIT the PTX
    (TensorRT does); it must not exceed :func:`bundled_ptxas_isa`, the default.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch < MIN_ARCH:
        raise ValueError(
            f"arch must be sm_{MIN_ARCH} or newer (tested: {SUPPORTED_ARCHS}), got {arch}"
        )
    if block_t < 2 or block_t & (block_t - 1) or block_t > MAX_BLOCK_T:
        raise ValueError(f"block_t must be a power of two in [2, {MAX_BLOCK_T}], got {block_t}")
    rows, num_warps, heads = check_tiling(tiling) if tiling is not None else launch_config(block_t)
    signature = kernel_signature(dtype, gate_dtype)
    src = ASTSource(
        fn=masked_softmax_kernel,
        signature=signature,
        constexprs={
            "THRESHOLD": float(threshold),
            "BLOCK_T": block_t,
            "ROWS": rows,
            "HEADS": heads,
        },
    )
    options: dict[str, Any] = {"num_warps": num_warps}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    ptx = strip_scratch_params(compiled.asm["ptx"], meta.name, len(signature), meta)
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    logger.debug("compiled %s for sm_%d (%s, BLOCK_T=%d)", meta.name, arch, dtype, block_t)
    launch = LaunchMetadata(
        num_warps=meta.num_warps,
        shared_mem=meta.shared,
        block_t=block_t,
        rows_per_program=rows,
        heads_per_program=heads,
        threshold=float(threshold),
        arch=arch,
        dtype=dtype,
        ptx_version=int(version[1]) * 10 + int(version[2]) if version else 0,
    )
    return ptx, meta.name, launch
