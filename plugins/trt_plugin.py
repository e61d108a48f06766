"""The masked softmax as a TensorRT Python plugin (``tensorrt.plugin``, TensorRT >= 10.9).

The exported ONNX node ``op_type=MaskedSoftmax`` with ``plugin_namespace=maskattn`` (see
:mod:`maskattn_deploy.ops.contract`) resolves to this plugin. It defines:

* ``register``: shape/type inference, output ``P`` like ``S``; attribute ``threshold``.
* ``autotune``: fp32 S with fp32 G, fp16 S with fp32 G, fp16 S with fp16 G, all LINEAR.
* ``aot_impl``: compiles the Triton kernel of :mod:`masked_softmax_triton` to PTX for the GPU
  the engine is built on and returns it with the launch parameters. TensorRT embeds the PTX in
  the engine, so the engine runs in any TensorRT runtime (C++ included) without Python.

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
validates the decorated functions' annotations as live objects.
"""

import logging
import threading

from maskattn_deploy.ops.contract import PLUGIN_ID, PLUGIN_VERSION

logger = logging.getLogger(__name__)

# tensorrt.plugin registers Python plugins with version "1"; the contract must agree.
QDP_PLUGIN_VERSION = "1"
# Padded row length compiled in when the text length is not a build-time constant.
DYNAMIC_T_BLOCK = 256

_lock = threading.Lock()
_registered = False

# (io type string, S dtype, G dtype) combinations the kernel implements.
TYPE_COMBINATIONS = (
    ("FP32, FP32, FP32", "fp32", "fp32"),
    ("FP16, FP32, FP16", "fp16", "fp32"),
    ("FP16, FP16, FP16", "fp16", "fp16"),
)


def ptx_version_for_driver(driver_version: tuple[int, int]) -> int | None:
    """Highest PTX ISA the installed driver can JIT (None: let Triton choose its default)."""
    if driver_version == (0, 0):
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{driver_version[0]}.{driver_version[1]}")


def register_plugin() -> bool:
    """Define the plugin in TensorRT's registry once per process; True when registered.

    Call after :func:`maskattn_deploy.engine.cuda_check.require_tensorrt_and_gpu` and before
    parsing an ONNX file that contains the custom node.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        if PLUGIN_VERSION != QDP_PLUGIN_VERSION:
            raise RuntimeError(
                f"contract PLUGIN_VERSION {PLUGIN_VERSION!r} differs from the version "
                f"tensorrt.plugin registers ({QDP_PLUGIN_VERSION!r})"
            )
        import tensorrt as trt
        import tensorrt.plugin as trtp

        _define(trt, trtp)
        _registered = True
        logger.info("registered TensorRT plugin %s (version %s)", PLUGIN_ID, QDP_PLUGIN_VERSION)
        return True


def _define(trt, trtp) -> None:
    """Attach register/autotune/aot_impl for PLUGIN_ID to the given TensorRT modules."""

    @trtp.register(PLUGIN_ID)
    def _desc(s: trtp.TensorDesc, g: trtp.TensorDesc, threshold: float) -> trtp.TensorDesc:
        return s.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(s, g, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR") for types, _, _ in TYPE_COMBINATIONS]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        s: trtp.TensorDesc, g: trtp.TensorDesc, threshold: float, outputs, tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _aot_launch(trt, trtp, s, g, float(threshold))


def _dtype_name(trt, dtype) -> str:
    if dtype == trt.float16:
        return "fp16"
    if dtype == trt.float32:
        return "fp32"
    raise TypeError(f"{PLUGIN_ID} supports fp16/fp32 tensors, got {dtype}")


def _static_t(dim) -> int | None:
    """The text length when it is a build-time constant, else None."""
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        return None
    return int(dim.constant_value())


def _aot_launch(trt, trtp, s, g, threshold: float):
    """PTX, kernel name, launch parameters and symbolic scalar args for one type combination."""
    from maskattn_deploy.plugins.masked_softmax_triton import compile_ptx, padded_t

    from maskattn_deploy.engine.cuda_check import probe_cuda

    cuda = probe_cuda()
    b, h, n, t = s.shape_expr[0], s.shape_expr[1], s.shape_expr[2], s.shape_expr[3]
    t_const = _static_t(t)
    block_t = padded_t(t_const) if t_const is not None else DYNAMIC_T_BLOCK
    if t_const is None:
        logger.warning(
            "%s: text length is dynamic; kernel compiled for t <= %d", PLUGIN_ID, block_t
        )
    ptx, name, meta = compile_ptx(
        _dtype_name(trt, s.dtype),
        cuda.sm,
        block_t,
        threshold=threshold,
        gate_dtype=_dtype_name(trt, g.dtype),
        ptx_version=ptx_version_for_driver(cuda.driver_version),
    )
    n_rows = b * h * n
    params = trtp.KernelLaunchParams()
    # One program per ROWS token rows of HEADS heads of one batch (LaunchMetadata.grid_x).
    groups = trtp.cdiv(h, meta.heads_per_program)
    params.grid_x = b * groups * trtp.cdiv(n, meta.rows_per_program)
    params.block_x = meta.block_x
    params.shared_mem = meta.shared_mem
    # Scalar kernel arguments in kernel order (after S and G, before P): n_rows, heads, n, t.
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (n_rows, h, n, t)])
    return name, ptx, params, extra
