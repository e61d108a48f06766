"""Ahead-of-time compilation of the Triton kernel to PTX for sm_80/86/89/90, without a GPU.

This is what the TensorRT plugin's ``aot_impl`` returns to TensorRT; the parameter list must
follow the AOT calling convention (input pointers, int32 scalars, output pointer).
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
    params = _params(ptx, name)
    # Triton appends its scratch pointers after the user arguments (unused by this kernel).
    assert params[: len(USER_PARAMS)] == USER_PARAMS
    assert all(p == "u64" for p in params[len(USER_PARAMS) :])
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


def test_launch_config_override_and_reset() -> None:
    mst.use_launch_config(16, 4, 5)  # for BLOCK_T 128 only
    try:
        assert mst.launch_config(128) == (16, 4, 5)
        assert mst.launch_config(256) == (2, 1, 1)
        _, _, meta = mst.compile_ptx("fp16", 90, block_t=128)
        assert (meta.rows_per_program, meta.num_warps, meta.heads_per_program) == (16, 4, 5)
        # 20 heads in groups of 5 -> 4 groups; 1024 tokens in blocks of 16 -> 64 blocks.
        assert meta.grid_x(2, 20, 1024) == 2 * 4 * 64
    finally:
        mst.use_launch_config(None)
    assert mst.launch_config(128) == (4, 1, 1)
    with pytest.raises(ValueError, match="power of two"):
        mst.use_launch_config(3, 1)
    with pytest.raises(ValueError, match="heads per program"):
        mst.use_launch_config(4, 1, 0)


def test_rows_are_split_without_64_bit_division() -> None:
    # The program id is split with 32-bit scalar divisions; per-row 64-bit division (the
    # first version's cost on the GPU) must not come back.
    ptx, _, _ = mst.compile_ptx("fp16", 90, block_t=128)
    assert "div.s64" not in ptx and "rem.s64" not in ptx
    assert "bar.sync" not in ptx  # one warp per row: reductions never go through shared memory


@pytest.mark.parametrize("tiling", mst.TUNING_CANDIDATES)
def test_every_candidate_tiling_compiles_for_sm90(tiling: tuple[int, int, int]) -> None:
    rows, warps, heads = tiling
    ptx, name, meta = mst.compile_ptx(
        "fp16", 90, block_t=128, rows_per_program=rows, num_warps=warps, heads_per_program=heads
    )
    assert f".entry {name}(" in ptx
    assert (meta.rows_per_program, meta.num_warps, meta.heads_per_program) == tiling
    # Each head of the group stores its own probabilities: HEADS times the stores of one head.
    one, _, _ = mst.compile_ptx("fp16", 90, block_t=128, rows_per_program=rows, num_warps=warps)
    assert ptx.count("st.global") == heads * one.count("st.global")
