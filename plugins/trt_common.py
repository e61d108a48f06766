"""What the two TensorRT AOT Python plugins share (``tensorrt.plugin``, TensorRT >= 10.9).

:mod:`trt_plugin` (the masked softmax) and :mod:`trt_attention_plugin` (the fused gated
attention) both define themselves once per process, read one-element float32 attributes,
accept fp16/fp32 tensors only, need some dimensions fixed at build time and hand TensorRT a
launch of the same form (a 1-D grid, the kernel's block and shared memory, int32 scalars).
TensorRT is never imported here; the callers pass its modules in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from maskattn_deploy.errors import UserError
from maskattn_deploy.ops.contract import PLUGIN_VERSION

logger = logging.getLogger(__name__)

# tensorrt.plugin registers Python plugins with version "1"; the contract must agree.
QDP_PLUGIN_VERSION = "1"


class PluginRegistration:
    """One plugin's definition in TensorRT's registry, made at most once per process.

    TensorRT's plugin registry is per process and a Python plugin cannot be redefined, so the
    tiling fixed at the first definition is remembered (``state["tiling"]``) to refuse a
    different one later.
    """

    def __init__(self, plugin_id: str) -> None:
        self.plugin_id = plugin_id
        self.lock = threading.Lock()
        self.state: dict[str, object] = {}

    def ensure(self, wanted: Sequence[int] | None, define: Callable[..., None]) -> bool:
        """Call ``define(trt, trtp, wanted)`` unless already done with ``wanted``; True.

        Raises UserError when the plugin was defined with another tiling.
        """
        with self.lock:
            if "tiling" in self.state:
                have = self.state["tiling"]
                if have != wanted:
                    raise UserError(
                        f"the {self.plugin_id} plugin is already defined in this process with "
                        f"tiling {_shown(have)}; build with tiling {_shown(wanted)} in a new "
                        "process"
                    )
                return True
            if PLUGIN_VERSION != QDP_PLUGIN_VERSION:
                raise RuntimeError(
                    f"contract PLUGIN_VERSION {PLUGIN_VERSION!r} differs from the version "
                    f"tensorrt.plugin registers ({QDP_PLUGIN_VERSION!r})"
                )
            import tensorrt as trt
            import tensorrt.plugin as trtp

            define(trt, trtp, wanted)
            self.state["tiling"] = wanted
            logger.info(
                "registered TensorRT plugin %s (version %s)", self.plugin_id, QDP_PLUGIN_VERSION
            )
            return True


def _shown(tiling: Any) -> object:
    return tuple(tiling) if tiling else "default"


def scalar_attribute(value: Any, plugin_id: str, what: str) -> float:
    """A float attribute (a one-element array, as the ONNX parser hands it over) as a float."""
    flat = np.asarray(value, dtype=np.float32).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"{plugin_id}: {what} must be one number, got {flat.size} values")
    return float(flat[0])


def dtype_name(trt: Any, dtype: Any, plugin_id: str) -> str:
    """``"fp16"`` or ``"fp32"`` for a TensorRT data type; TypeError for any other."""
    if dtype == trt.float16:
        return "fp16"
    if dtype == trt.float32:
        return "fp32"
    raise TypeError(f"{plugin_id} supports fp16/fp32 tensors, got {dtype}")


def static_dim(dim: Any, error: str) -> int:
    """The value of a build-time constant dimension; ValueError(``error``) when it is dynamic."""
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        raise ValueError(error)
    return int(dim.constant_value())


def launch(trtp: Any, grid_x: Any, meta: Any, scalars: Sequence[Any]) -> tuple[Any, Any]:
    """Launch parameters (1-D grid, ``meta``'s block and shared memory) and int32 scalars."""
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.block_x = meta.block_x
    params.shared_mem = meta.shared_mem
    return params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
