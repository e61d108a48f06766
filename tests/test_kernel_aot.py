"""Ahead-of-time compilation of the Triton kernel to PTX for sm_80/86/89/90, without a GPU.

This is what the TensorRT plugin's ``aot_impl`` returns to TensorRT; the parameter list must
follow the AOT calling convention (input pointers, int32 scalars, output pointer) and nothing
else: Triton's trailing scratch-pointer parameters are removed.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault(
    "TRITON_DEFAULT_FP_FUSION", "1"
)  # silence Triton 3.9's default-change warning
if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip(
        "AOT compilation needs the compiled (not interpreted) kernel", allow_module_level=True
    )

mst = pytest.importorskip("maskattn_deploy.plugins.masked_softmax_triton")

# The kernel's own arguments: S, G (pointers), n_rows, heads, n_tokens, t (u32), P (pointer).
USER_PARAMS = ["u64", "u64", "u32", "u32", "u32", "u32", "u64"]


def _params(ptx: str, name: str) -> list[str]:
    entry = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S)
    assert entry, "kernel entry missing"
    return re.findall(r"\.param \.(\w+)", entry.group(1))


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_ptx_for_each_arch(arch: int, dtype: str) -> None:
    ptx, name, meta = mst.compile_ptx(dtype, arch, block_t=128)
    assert name == mst.KERNEL_NAME
    assert f".entry {name}(" in ptx
    assert re.search(rf"^\.target sm_{arch}a?\b", ptx, re.M), f"no .target sm_{arch}"
    # Exactly the arguments TensorRT passes: no scratch pointers after P.
    assert _params(ptx, name) == USER_PARAMS
    # fp16 logits are widened to fp32 for the max/exp/sum, fp32 ones need no conversion.
    assert ("cvt.f32.f16" in ptx) == (dtype == "fp16")
    rows, warps, heads = mst.launch_config(128)
    assert (meta.block_x, meta.block_t, meta.rows_per_program) == (warps * 32, 128, rows)
    assert meta.heads_per_program == heads == 1
    # S [2, 3, 30, t]: 2 batches x 3 head groups x ceil(30 / rows) token blocks.
    assert meta.grid_x(2, 3, 30) == 2 * 3 * -(-30 // rows)


def test_threshold_is_baked_into_the_ptx() -> None:
    ptx0, _, _ = mst.compile_ptx("fp32", 90, block_t=128, threshold=0.0)
    ptx1, _, _ = mst.compile_ptx("fp32", 90, block_t=128, threshold=0.25)
    assert ptx0 != ptx1
    assert "0f3E800000" in ptx1  # 0.25 as a PTX float literal


def test_ptx_version_can_be_capped_for_older_drivers() -> None:
    ptx, _, _ = mst.compile_ptx("fp16", 80, block_t=256, ptx_version=84)
    assert re.search(r"^\.version 8\.4$", ptx, re.M)


def test_invalid_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        mst.compile_ptx("fp16", 90, block_t=96)
    with pytest.raises(ValueError, match="dtype"):
        mst.compile_ptx("bf16", 90, block_t=128)
    with pytest.raises(ValueError, match="sm_75"):
        mst.compile_ptx("fp16", 70, block_t=128)


@pytest.mark.parametrize(
    ("t", "block_t", "rows"), [(1, 2, 256), (77, 128, 4), (154, 256, 2), (231, 256, 2)]
)
def test_padding_and_default_tiling(t: int, block_t: int, rows: int) -> None:
    # One warp per program up to BLOCK_T 256, about 16 elements per thread.
    assert mst.padded_t(t) == block_t
    assert mst.launch_config(block_t) == (rows, 1, 1)


def test_tiling_is_passed_explicitly_and_leaves_no_state() -> None:
    _, _, meta = mst.compile_ptx("fp16", 90, block_t=128, tiling=mst.Tiling(16, 4, 5))
    assert meta.tiling == (16, 4, 5)
    # 20 heads in groups of 5 -> 4 groups; 1024 tokens in blocks of 16 -> 64 blocks.
    assert meta.grid_x(2, 20, 1024) == 2 * 4 * 64
    # The next compile without a tiling gets the default again.
    _, _, meta = mst.compile_ptx("fp16", 90, block_t=128)
    assert meta.tiling == mst.launch_config(128) == (4, 1, 1)
    assert not hasattr(mst, "use_launch_config")
    with pytest.raises(ValueError, match="power of two"):
        mst.check_tiling((3, 1, 1))
    with pytest.raises(ValueError, match="heads per program"):
        mst.check_tiling((4, 1, 0))


def test_rows_are_split_without_64_bit_division() -> None:
    # The program id is split with 32-bit scalar divisions; per-row 64-bit division (the
    # first version's cost on the GPU) must not come back.
    ptx, _, _ = mst.compile_ptx("fp16", 90, block_t=128)
    assert "div.s64" not in ptx and "rem.s64" not in ptx
    assert "bar.sync" not in ptx  # one warp per row: reductions never go through shared memory


@pytest.mark.parametrize("tiling", mst.TUNING_CANDIDATES)
def test_every_candidate_tiling_compiles_for_sm90(tiling: tuple[int, int, int]) -> None:
    rows, warps, heads = tiling
    ptx, name, meta = mst.compile_ptx("fp16", 90, block_t=128, tiling=mst.Tiling(*tiling))
    assert f".entry {name}(" in ptx
    assert meta.tiling == tiling
    # Each head of the group stores its own probabilities: HEADS times the stores of one head.
    one, _, _ = mst.compile_ptx("fp16", 90, block_t=128, tiling=mst.Tiling(rows, warps, 1))
    assert ptx.count("st.global") == heads * one.count("st.global")


# A hand-written entry in the layout Triton emits: n_rows (param_2) is never read, two scratch
# pointers follow P.
_ENTRY = """.version 8.7
.target sm_80
.address_size 64

.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u64 .ptr .global .align 1 k_param_1,
\t.param .u32 k_param_2,
\t.param .u32 k_param_3,
\t.param .u64 .ptr .global .align 1 k_param_4,
\t.param .u64 .ptr .global .align 1 k_param_5,
\t.param .u64 .ptr .global .align 1 k_param_6
)
.reqntid 32
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b64 \t%rd2, [k_param_1];
\tld.param.b32 \t%r1, [k_param_3];
\tld.param.b64 \t%rd3, [k_param_4];
\tret;
}
"""


class _Meta:
    def __init__(self, global_scratch: int = 0, profile_scratch: int = 0) -> None:
        self.global_scratch_size = global_scratch
        self.profile_scratch_size = profile_scratch


def test_strip_removes_exactly_the_trailing_unused_scratch_pointers() -> None:
    out = mst.strip_scratch_params(_ENTRY, "k", 5, _Meta())
    assert [p for _, p in mst.entry_params(out, "k")] == [f"k_param_{i}" for i in range(5)]
    assert "k_param_5" not in out and "k_param_6" not in out
    assert "k_param_4\n)" in out  # the new last parameter has no trailing comma
    # The unused argument k_param_2 (n_rows in our kernel) is part of the contract and stays.
    assert ".param .u32 k_param_2," in out
    assert out.split("{", 1)[1] == _ENTRY.split("{", 1)[1]  # body untouched
    assert mst.strip_scratch_params(out, "k", 5, _Meta()) == out  # nothing more to strip


@pytest.mark.parametrize(
    ("ptx", "meta", "match"),
    [
        (_ENTRY, _Meta(global_scratch=256), "scratch memory"),
        (_ENTRY, _Meta(profile_scratch=64), "scratch memory"),
        (_ENTRY.replace("\tret;", "\tld.param.b64 %rd4, [k_param_6];\n\tret;"), _Meta(), "unused"),
    ],
)
def test_strip_refuses_scratch_the_kernel_needs(ptx: str, meta: _Meta, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mst.strip_scratch_params(ptx, "k", 5, meta)
