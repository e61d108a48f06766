"""The PTX the TensorRT plugin hands TensorRT, loaded and launched the way TensorRT does it.

No TensorRT: the CUDA driver JIT-compiles the PTX (``cuModuleLoadData``) and ``cuLaunchKernel``
passes exactly the AOT calling convention (S, G, n_rows, heads, n_tokens, t, P; nothing else)
with the plugin's grid, block and shared memory. The probabilities must match the reference.
This settles, on any CUDA machine, whether the driver accepts the PTX ISA the plugin picks for
it and whether the kernel works without Triton's scratch parameters. Needs a CUDA GPU (marked
``gpu``; skipped with the reason elsewhere).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from maskattn_deploy.engine.cuda_check import probe_cuda

pytestmark = pytest.mark.gpu
CUDA = probe_cuda()
if not CUDA.usable or not torch.cuda.is_available():
    pytest.skip(f"needs a CUDA GPU: {CUDA.reason or 'torch sees none'}", allow_module_level=True)

mst = pytest.importorskip("maskattn_deploy.plugins.masked_softmax_triton")


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(text))
        pytest.fail(f"{what} failed: CUDA error {rc} ({(text.value or b'').decode()})")


def launch_like_tensorrt(ptx: str, name: str, meta, S, G, P) -> None:
    """cuModuleLoadData + cuLaunchKernel with the seven arguments TensorRT passes."""
    lib = ctypes.CDLL("libcuda.so.1")
    torch.cuda.current_stream().synchronize()
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib, lib.cuModuleLoadData(ctypes.byref(module), ptx.encode() + b"\0"), "JIT of the PTX")
    try:
        _check(lib, lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "entry")
        b, h, n, t = S.shape
        values = [ctypes.c_uint64(S.data_ptr()), ctypes.c_uint64(G.data_ptr()),
                  ctypes.c_int32(b * h * n), ctypes.c_int32(h), ctypes.c_int32(n),
                  ctypes.c_int32(t), ctypes.c_uint64(P.data_ptr())]  # fmt: skip
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        grid = meta.grid_x(b, h, n)
        rc = lib.cuLaunchKernel(function, grid, 1, 1, meta.block_x, 1, 1, meta.shared_mem,
                                ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                                params, None)  # fmt: skip
        _check(lib, rc, "launch")
        torch.cuda.current_stream().synchronize()
    finally:
        lib.cuModuleUnload(module)


@pytest.mark.parametrize(
    ("dtype", "gate_dtype"),
    [("fp32", "fp32"), ("fp16", "fp32"), ("fp16", "fp16"), ("fp32", "fp16")],
)
@pytest.mark.parametrize("tiling", [None, *mst.TUNING_CANDIDATES])
def test_driver_runs_the_plugin_ptx_with_seven_arguments(dtype, gate_dtype, tiling) -> None:
    from maskattn_deploy.plugins.trt_plugin import ptx_version_for_driver

    from maskattn_deploy.ops.reference import masked_softmax_reference

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}
    gen = torch.Generator().manual_seed(0)
    S = (torch.randn(2, 10, 1000, 77, generator=gen) * 3).to(torch_dtype[dtype])
    G = (torch.randn(2, 1, 1000, 77, generator=gen) - 0.5).to(torch_dtype[gate_dtype])
    G[:, :, :5] = -4.0  # all-closed rows take the argmax fallback
    ptx, name, meta = mst.compile_ptx(
        dtype, CUDA.sm, mst.padded_t(77), threshold=0.0, tiling=tiling, gate_dtype=gate_dtype,
        ptx_version=ptx_version_for_driver(CUDA.driver_version, CUDA.sm),
    )  # fmt: skip
    S_dev, G_dev = S.cuda(), G.cuda()
    P = torch.full_like(S_dev, float("nan"))  # every element must be written
    launch_like_tensorrt(ptx, name, meta, S_dev, G_dev, P)
    want = masked_softmax_reference(S, G)
    # Same tolerances as the interpreter tests: fp32 summation order, fp16 output rounding.
    atol = 1e-6 if dtype == "fp32" else 2e-3
    torch.testing.assert_close(P.cpu().float(), want.float(), atol=atol, rtol=0)
    assert torch.equal(P.cpu() == 0, want == 0)
