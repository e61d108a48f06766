"""The fused gated attention as a TensorRT Python plugin (``tensorrt.plugin``, TensorRT >= 10.9).

An export with ``--attention-node fused`` writes each gated layer as one ONNX node
``op_type=MaskedCrossAttention`` with ``plugin_namespace=maskattn`` (see
:mod:`maskattn_deploy.ops.contract` and :mod:`maskattn_deploy.export.onnx_op`); it resolves to
this plugin, which defines:

* ``register``: output ``o`` like ``q``; attributes ``threshold`` and ``scale``, one-element
  float32 arrays like the masked-softmax plugin's threshold (see :mod:`trt_plugin`).
* ``autotune``: fp32 or fp16 q/k/v/o with fp32 or fp16 gate logits, all LINEAR.
* ``aot_impl``: compiles the fused kernel of :mod:`gated_attention_triton` to PTX for the GPU
  the engine is built on (the PTX exactly as TensorRT launches it: scratch parameters removed,
  ISA capped for the driver, both with the masked-softmax plugin's helpers) and returns it
  with the launch parameters and the 15 int32 scalar arguments (sizes and the strides of
  contiguous ``[b,h,*,d]`` tensors).

The text length and the head dim must be build-time constants (``BLOCK_T`` and ``BLOCK_D`` are
compiled in); the batch and the latent tokens may be dynamic. The tiling is the one given to
:func:`register_attention_plugin`, else the kernel's default rows with one head per program
(the head-group default needs the batch and token counts, which a dynamic profile does not
fix).

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
validates the decorated functions' annotations as live objects.
"""

import numpy as np
import numpy.typing as npt
from maskattn_deploy.plugins.trt_common import (
    PluginRegistration,
    dtype_name,
    launch,
    scalar_attribute,
    static_dim,
)

from maskattn_deploy.errors import UserError
from maskattn_deploy.ops.contract import ATTENTION_PLUGIN_ID

# (io type string q, k, v, G, o; q dtype; G dtype): the combinations the plugin offers.
TYPE_COMBINATIONS = (
    ("FP32, FP32, FP32, FP32, FP32", "fp32", "fp32"),
    ("FP32, FP32, FP32, FP16, FP32", "fp32", "fp16"),
    ("FP16, FP16, FP16, FP32, FP16", "fp16", "fp32"),
    ("FP16, FP16, FP16, FP16, FP16", "fp16", "fp16"),
)

_registration = PluginRegistration(ATTENTION_PLUGIN_ID)


def register_attention_plugin(tiling=None) -> bool:
    """Define the plugin in TensorRT's registry once per process; True when registered.

    ``tiling`` is ``(BLOCK_N, num_warps, HEADS)`` with ``HEADS >= 1`` (None: the kernel's
    default rows, one head per program). A later call with another tiling raises, since
    TensorRT cannot redefine a Python plugin. Call before parsing an ONNX file that contains
    the fused node.
    """
    from maskattn_deploy.plugins.gated_attention_triton import check_tiling

    wanted = None if tiling is None else tuple(int(x) for x in tiling)
    try:
        if wanted is not None:
            check_tiling(wanted)
            if wanted[2] < 1:
                raise ValueError(
                    "HEADS must be >= 1 in an engine (the head count is a runtime value)"
                )
    except (TypeError, ValueError) as exc:
        raise UserError(f"attention kernel tiling {tiling}: {exc}") from None
    return _registration.ensure(wanted, define_attention_plugin)


def define_attention_plugin(trt, trtp, tiling=None) -> None:
    """Attach register/autotune/aot_impl for ATTENTION_PLUGIN_ID to the given TensorRT modules."""

    @trtp.register(ATTENTION_PLUGIN_ID)
    def _desc(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        g: trtp.TensorDesc,
        threshold: npt.NDArray[np.float32],
        scale: npt.NDArray[np.float32],
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(ATTENTION_PLUGIN_ID)
    def _autotune(q, k, v, g, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR") for types, _, _ in TYPE_COMBINATIONS]

    @trtp.aot_impl(ATTENTION_PLUGIN_ID)
    def _aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        g: trtp.TensorDesc,
        threshold: npt.NDArray[np.float32],
        scale: npt.NDArray[np.float32],
        outputs,
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _aot_launch(trt, trtp, (q, k, g), _scalar(threshold), _scalar(scale), tiling)


def _scalar(value) -> float:
    """A float attribute (a one-element array, as the ONNX parser hands it over) as a float."""
    return scalar_attribute(value, ATTENTION_PLUGIN_ID, "attributes")


def _static(dim, what: str) -> int:
    """A build-time constant dimension, else a one-line error naming it."""
    return static_dim(
        dim,
        f"{ATTENTION_PLUGIN_ID} needs the {what} fixed at build time (it is compiled into "
        "the kernel); export with static text length and head dim",
    )


def launch_scalars(b, h, n, t, d) -> tuple:
    """The kernel's 15 int32 scalars after q, k, v, G for contiguous tensors, in kernel order:
    heads, n, t, d, the strides of q ``[b,h,n,d]``, of k and v ``[b,h,t,d]``, of G ``[b,n,t]``
    and of o ``[b,h,n,d]`` (``gated_attention_triton.SCALAR_ARGS``)."""
    return (h, n, t, d, h * n * d, n * d, d, h * t * d, t * d, d, n * t, t, h * n * d, n * d, d)


def _aot_launch(trt, trtp, descs, threshold: float, scale: float, tiling):
    """Kernel name, PTX, launch parameters and symbolic scalar args for one type combination."""
    from maskattn_deploy.plugins.gated_attention_triton import (
        CompileRequest,
        block_t,
        compile_ptx,
        default_rows,
    )
    from maskattn_deploy.plugins.trt_plugin import ptx_version_for_driver

    from maskattn_deploy.engine.cuda_check import probe_cuda

    q, k, g = descs
    cuda = probe_cuda()
    b, h, n, d = (q.shape_expr[i] for i in range(4))
    t = k.shape_expr[2]
    t_const, d_const = _static(t, "text length"), _static(d, "head dim")
    if tiling is None:
        tiling = (*default_rows(block_t(t_const)), 1)
    ptx, name, meta = compile_ptx(
        CompileRequest(
            dtype_name(trt, q.dtype, ATTENTION_PLUGIN_ID),
            cuda.sm,
            t=t_const,
            head_dim=d_const,
            threshold=threshold,
            scale=scale,
            tiling=tiling,
            gate_dtype=dtype_name(trt, g.dtype, ATTENTION_PLUGIN_ID),
            ptx_version=ptx_version_for_driver(cuda.driver_version, cuda.sm),
        )
    )
    # One program per BLOCK_N query rows of HEADS heads of one batch (LaunchMetadata.grid_x).
    grid_x = b * trtp.cdiv(h, meta.heads_per_program) * trtp.cdiv(n, meta.block_n)
    params, extra = launch(trtp, grid_x, meta, launch_scalars(b, h, n, t, d))
    return name, ptx, params, extra
