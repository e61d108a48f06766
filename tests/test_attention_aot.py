"""Ahead-of-time compilation of the fused gated-attention kernel to PTX, without a GPU.

This is what the TensorRT plugin for ``MaskedCrossAttention`` returns to TensorRT: the entry's
parameters follow the AOT calling convention (input pointers, int32 scalars, output pointer).
"""

from __future__ import annotations

import os
import re
import struct

import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's default-change note
if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("AOT compilation needs the compiled kernel", allow_module_level=True)

gat = pytest.importorskip("maskattn_deploy.plugins.gated_attention_triton")

# q, k, v, g (pointers), 15 int32 scalars (sizes and strides), o (pointer).
USER_PARAMS = ["u64"] * 4 + ["u32"] * 15 + ["u64"]


def _params(ptx: str, name: str) -> list[str]:
    entry = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S)
    assert entry, "kernel entry missing"
    return re.findall(r"\.param \.(\w+)", entry.group(1))


def _ptx_float(x: float) -> str:
    return "0f" + struct.pack(">f", x).hex().upper()


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_fp16_ptx_for_each_arch(arch: int) -> None:
    ptx, name, meta = gat.compile_ptx(gat.CompileRequest("fp16", arch, t=77, head_dim=64))
    assert name == gat.KERNEL_NAME
    assert re.search(rf"^\.target sm_{arch}a?\b", ptx, re.M)
    # Exactly TensorRT's arguments: Triton's trailing scratch pointers are removed.
    assert _params(ptx, name) == USER_PARAMS
    # Both products on the tensor cores in fp16 with fp32 accumulation.
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert (meta.block_t, meta.block_d, meta.block_x) == (128, 64, 32 * meta.num_warps)


@pytest.mark.parametrize(
    ("dtype", "arch", "t", "d", "mma"),
    [
        ("bf16", 90, 154, 80, "f32.bf16.bf16.f32"),  # bf16 tensor-core products
        ("fp32", 80, 231, 128, None),  # IEEE fp32: FMA, no TF32 tensor cores
        ("fp16", 90, 2, 128, "f32.f16.f16.f32"),
    ],
)
def test_dtypes_and_head_dims(dtype: str, arch: int, t: int, d: int, mma: str | None) -> None:
    ptx, name, meta = gat.compile_ptx(gat.CompileRequest(dtype, arch, t=t, head_dim=d))
    assert _params(ptx, name) == USER_PARAMS
    if mma:
        assert f"mma.sync.aligned.m16n8k16.row.col.{mma}" in ptx
    else:
        assert "mma." not in ptx and "tf32" not in ptx
    assert meta.block_t == gat.block_t(t) and meta.block_d == gat.block_d(d)
    assert meta.scale == pytest.approx(d**-0.5)


def test_threshold_and_scale_are_baked_into_the_ptx() -> None:
    ptx, _, meta = gat.compile_ptx(
        gat.CompileRequest("fp16", 90, t=77, head_dim=64, threshold=0.25, scale=0.375)
    )
    assert _ptx_float(0.25) in ptx and _ptx_float(0.375) in ptx
    assert (meta.threshold, meta.scale) == (0.25, 0.375)
    # 20 heads in groups of 5 -> 4 groups; 1024 rows in blocks of 32 -> 32 blocks.
    _, _, grouped = gat.compile_ptx(
        gat.CompileRequest("fp16", 90, t=77, head_dim=64, tiling=(32, 4, 5))
    )
    assert grouped.grid_x(2, 20, 1024) == 2 * 4 * 32


def test_ptx_version_cap() -> None:
    ptx, _, _ = gat.compile_ptx(gat.CompileRequest("fp16", 80, t=77, head_dim=64, ptx_version=84))
    assert re.search(r"^\.version 8\.4$", ptx, re.M)


def test_invalid_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="sm_80"):
        gat.compile_ptx(gat.CompileRequest("fp16", 75, t=77, head_dim=64))
    with pytest.raises(ValueError, match="t <= 256"):
        gat.compile_ptx(gat.CompileRequest("fp16", 90, t=300, head_dim=64))
    with pytest.raises(ValueError, match="head dims"):
        gat.compile_ptx(gat.CompileRequest("fp16", 90, t=77, head_dim=512))
    with pytest.raises(ValueError, match="dtype"):
        gat.compile_ptx(gat.CompileRequest("fp8", 90, t=77, head_dim=64))
    with pytest.raises(ValueError, match="HEADS >= 1"):
        gat.compile_ptx(gat.CompileRequest("fp16", 90, t=77, head_dim=64, tiling=(32, 4, 0)))
    with pytest.raises(ValueError, match="BLOCK_N"):
        gat.check_tiling((24, 4, 1))


@pytest.mark.parametrize(
    ("t", "d", "bt", "bd"),
    [(1, 16, 16, 16), (2, 64, 16, 64), (77, 80, 128, 128), (231, 128, 256, 128)],
)
def test_padding(t: int, d: int, bt: int, bd: int) -> None:
    assert (gat.block_t(t), gat.block_d(d)) == (bt, bd)


@pytest.mark.parametrize(
    ("shape", "heads_per_program"),
    [
        ((2, 20, 1024), 2),  # SDXL mid stage: 64 row blocks, 10 head groups -> 640 programs
        ((2, 10, 4096), 5),  # SDXL high stage: 256 row blocks, 2 groups -> 512 programs
        ((2, 2, 64), 1),  # tiny: too few rows for any sharing
        ((64, 8, 4096), 8),  # big batch: all heads of a row in one program
    ],
)
def test_default_heads_per_program(shape: tuple[int, int, int], heads_per_program: int) -> None:
    b, h, n = shape
    rows, warps, group = gat.resolve_tiling(None, 77, b, h, n)
    assert (rows, warps, group) == (32, 4, heads_per_program)
    assert gat.grid_programs(b, h, n, rows, group) >= min(gat.TARGET_PROGRAMS, b * h * n // rows)
    assert gat.resolve_tiling((16, 1, 0), 77, b, h, n) == (16, 1, h)  # 0: all heads


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gated_attention_kernel' for 'sm_90a'
ptxas info    : Function properties for gated_attention_kernel
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_ptxas_log_is_parsed() -> None:
    from maskattn_deploy.plugins.kernel_resources import parse_ptxas_log

    assert parse_ptxas_log(PTXAS_LOG) == {
        "registers": 255, "spill_stores": 4, "spill_loads": 12, "stack_frame": 8,
    }  # fmt: skip
    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas_log("ptxas fatal: nothing")


def test_resource_report_of_the_default_tiling() -> None:
    from maskattn_deploy.plugins.kernel_resources import Resources, ptxas_report, resource_table

    ptx, _, meta = gat.compile_ptx(gat.CompileRequest("fp16", 90, t=77, head_dim=64))
    report = ptxas_report(ptx, 90)
    # Measured with Triton 3.9 / its ptxas: 128 registers, no spills (200 without the
    # alignment hints). The bound keeps 3 programs of 4 warps per SM.
    assert report["spill_stores"] == 0 and 0 < report["registers"] <= 168
    row = Resources("gated_attention", "default", 90, "fp16", meta.num_warps,
                    shared_mem=meta.shared_mem, **report)  # fmt: skip
    assert row.programs_per_sm >= 3
    assert "gated_attention" in resource_table([row])
