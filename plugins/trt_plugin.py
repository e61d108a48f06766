"""The masked softmax as a TensorRT Python plugin (``tensorrt.plugin``, TensorRT >= 10.9).

The exported ONNX node ``op_type=MaskedSoftmax`` with ``plugin_namespace=maskattn`` (see
:mod:`maskattn_deploy.ops.contract`) resolves to this plugin. It defines:

* ``register``: shape/type inference, output ``P`` like ``S``; attribute ``threshold``, a
  one-element float32 array (the ONNX parser hands a FLOAT attribute over as a float32 field
  of length 1; TensorRT 10.x converts a field to a ``float`` attribute with ``float(array)``,
  which NumPy 2.4 refuses for arrays, while array attributes work on every release).
* ``autotune``: fp32 or fp16 S with fp32 or fp16 G (P like S), all LINEAR.
* ``aot_impl``: compiles the Triton kernel of :mod:`masked_softmax_triton` to PTX for the GPU
  the engine is built on and returns it with the launch parameters. TensorRT embeds the PTX in
  the engine, so the engine runs in any TensorRT runtime (C++ included) without Python, and
  loading an engine needs neither this module nor Triton.

The PTX declares the ISA ``min(driver ISA, ISA of Triton's bundled ptxas)``: the driver JITs
it when the engine loads, and Triton's ptxas must assemble it at compile time. The text length
must be a build-time constant (it sets the padded row ``BLOCK_T``); the tiling is the one given
to :func:`register_plugin`, else the kernel's default.

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
validates the decorated functions' annotations as live objects.
"""

import numpy as np
import numpy.typing as npt
from maskattn_deploy.plugins.trt_common import QDP_PLUGIN_VERSION as QDP_PLUGIN_VERSION
from maskattn_deploy.plugins.trt_common import (
    PluginRegistration,
    dtype_name,
    launch,
    scalar_attribute,
    static_dim,
)

from maskattn_deploy.errors import UserError
from maskattn_deploy.ops.contract import PLUGIN_ID

# (io type string S, G, P; S dtype; G dtype): the combinations the kernel implements, the
# same set the ONNX schema of the custom node admits.
TYPE_COMBINATIONS = (
    ("FP32, FP32, FP32", "fp32", "fp32"),
    ("FP32, FP16, FP32", "fp32", "fp16"),
    ("FP16, FP32, FP16", "fp16", "fp32"),
    ("FP16, FP16, FP16", "fp16", "fp16"),
)

_registration = PluginRegistration(PLUGIN_ID)
# The tiling of this process's definition (see PluginRegistration).
_registered = _registration.state


def ptx_version_for_driver(driver_version: tuple[int, int], arch: int) -> int | None:
    """PTX ISA for a kernel the driver ``(major, minor)`` will JIT on ``sm_<arch>``.

    ``min(driver ISA, bundled ptxas ISA)``: the driver cannot JIT a newer ISA, and Triton's
    ptxas cannot assemble one newer than it knows. None (Triton's default) when the driver
    version is unknown.
    """
    if driver_version == (0, 0):
        return None
    from maskattn_deploy.plugins.masked_softmax_triton import bundled_ptxas_isa, driver_isa

    return min(driver_isa(driver_version), bundled_ptxas_isa(arch))


def register_plugin(tiling=None) -> bool:
    """Define the plugin in TensorRT's registry once per process; True when registered.

    ``tiling`` (a ``Tiling`` or ``(rows, num_warps, heads)``) is compiled into every kernel of
    the engines this process builds; None uses the kernel's default for the text length. A
    later call with another tiling raises, since TensorRT cannot redefine a Python plugin.
    Call after :func:`maskattn_deploy.engine.cuda_check.require_tensorrt_and_gpu` and before
    parsing an ONNX file that contains the custom node.
    """
    from maskattn_deploy.plugins.masked_softmax_triton import check_tiling

    try:
        wanted = check_tiling(tiling) if tiling is not None else None
    except (TypeError, ValueError) as exc:
        raise UserError(f"kernel tiling {tiling}: {exc}") from None
    return _registration.ensure(wanted, define_plugin)


def define_plugin(trt, trtp, tiling=None) -> None:
    """Attach register/autotune/aot_impl for PLUGIN_ID to the given TensorRT modules."""

    @trtp.register(PLUGIN_ID)
    def _desc(
        s: trtp.TensorDesc, g: trtp.TensorDesc, threshold: npt.NDArray[np.float32]
    ) -> trtp.TensorDesc:
        return s.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(s, g, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR") for types, _, _ in TYPE_COMBINATIONS]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        s: trtp.TensorDesc,
        g: trtp.TensorDesc,
        threshold: npt.NDArray[np.float32],
        outputs,
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _aot_launch(trt, trtp, s, g, scalar_threshold(threshold), tiling)


def scalar_threshold(value) -> float:
    """The threshold attribute (a one-element array) as a float."""
    return scalar_attribute(value, PLUGIN_ID, "threshold")


def static_text_length(dim) -> int:
    """The text length ``t`` (last axis of S); it must be a build-time constant.

    The padded row ``BLOCK_T`` is compiled into the kernel, and a kernel compiled for one
    length would leave longer rows' columns unwritten, so a dynamic length is refused.
    """
    return static_dim(
        dim,
        f"{PLUGIN_ID} needs a text length fixed at build time (the last axis of its logits "
        "is dynamic); export with a static text length, e.g. 77 tokens",
    )


def _aot_launch(trt, trtp, s, g, threshold: float, tiling):
    """Kernel name, PTX, launch parameters and symbolic scalar args for one type combination."""
    from maskattn_deploy.plugins.masked_softmax_triton import compile_ptx, padded_t

    from maskattn_deploy.engine.cuda_check import probe_cuda

    cuda = probe_cuda()
    b, h, n, t = s.shape_expr[0], s.shape_expr[1], s.shape_expr[2], s.shape_expr[3]
    ptx, name, meta = compile_ptx(
        dtype_name(trt, s.dtype, PLUGIN_ID),
        cuda.sm,
        padded_t(static_text_length(t)),
        threshold=threshold,
        tiling=tiling,
        gate_dtype=dtype_name(trt, g.dtype, PLUGIN_ID),
        ptx_version=ptx_version_for_driver(cuda.driver_version, cuda.sm),
    )
    # One program per ROWS token rows of HEADS heads of one batch (LaunchMetadata.grid_x).
    groups = trtp.cdiv(h, meta.heads_per_program)
    grid_x = b * groups * trtp.cdiv(n, meta.rows_per_program)
    # Scalar kernel arguments in kernel order (after S and G, before P): n_rows, heads, n, t.
    params, extra = launch(trtp, grid_x, meta, (b * h * n, h, n, t))
    return name, ptx, params, extra
