"""A small TensorRT runner: the ``tensorrt`` backend of the runtime.

Lifecycle as in Polygraphy: ``TrtRunner(path).activate()``, ``run(feed) -> outputs`` any number
of times, ``deactivate()``. Device buffers are torch CUDA tensors (torch is a hard dependency,
so no second CUDA binding is needed); they are allocated once per input-shape set and reused.
One CUDA stream; ``execute_async_v3``. With ``cuda_graph=True`` and unchanged shapes, the
second call captures the enqueue into a CUDA graph and later calls replay it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import UserError

logger = logging.getLogger(__name__)

# TensorRT DataType attribute name -> torch dtype attribute name.
_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int32": "int32",
    "int64": "int64",
    "int8": "int8",
    "bool": "bool",
}


class TrtRunner:
    """Runs one engine; inputs/outputs are dicts keyed by the export's tensor names."""

    def __init__(
        self,
        engine_path: str | Path,
        export_dir: str | Path | None = None,
        profile_index: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.export_dir = export_dir
        self.profile_index = profile_index
        self.cuda_graph = cuda_graph
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._buffers: dict[str, Any] = {}
        self._shape_key: tuple | None = None
        self._graph: Any = None
        self._runs_at_shape = 0

    @property
    def active(self) -> bool:
        return self._context is not None

    def activate(self) -> TrtRunner:
        """Load the (checked) engine, create the execution context and the stream."""
        import tensorrt as trt
        import torch

        from maskattn_deploy.engine.builder import load_engine_checked

        self._engine = load_engine_checked(self.engine_path, self.export_dir)
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        if self.profile_index:
            self._context.set_optimization_profile_async(
                self.profile_index, self._stream.cuda_stream
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self._outputs = [n for n in names if n not in self._inputs]
        return self

    def deactivate(self) -> None:
        """Release the context, buffers and graph (the engine file is untouched)."""
        self._graph = None
        self._buffers = {}
        self._shape_key = None
        self._context = None
        self._engine = None
        self._stream = None

    def __enter__(self) -> TrtRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def _torch_dtype(self, name: str) -> Any:
        import tensorrt as trt
        import torch

        trt_dtype = self._engine.get_tensor_dtype(name)
        for trt_name, torch_name in _DTYPES.items():
            if hasattr(trt, trt_name) and trt_dtype == getattr(trt, trt_name):
                return getattr(torch, torch_name)
        raise UserError(
            f"tensor {name} has TensorRT dtype {trt_dtype} that the runner does not support"
        )

    def _prepare(self, feed: dict[str, Any]) -> None:
        """(Re)bind input shapes and allocate buffers when the input shapes change."""
        import torch

        missing = [n for n in self._inputs if n not in feed]
        if missing:
            raise UserError(
                f"missing engine inputs: {', '.join(missing)} (expected {', '.join(self._inputs)})"
            )
        key = tuple(tuple(feed[n].shape) for n in self._inputs)
        if key == self._shape_key:
            return
        self._graph = None
        self._runs_at_shape = 0
        buffers = {}
        for name, shape in zip(self._inputs, key, strict=True):
            if not self._context.set_input_shape(name, shape):
                raise UserError(
                    f"input {name} shape {list(shape)} is outside the engine's profiles; rebuild for it"
                )
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name, tensor in buffers.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._buffers = buffers
        self._shape_key = key

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Copy ``feed`` (numpy arrays or torch tensors) in, execute, return output tensors (copies)."""
        import torch

        if not self.active:
            raise UserError("TrtRunner.run called before activate()")
        self._prepare(feed)
        with torch.cuda.stream(self._stream):
            for name in self._inputs:
                value = feed[name]
                src = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
                self._buffers[name].copy_(src, non_blocking=True)
            self._enqueue()
            outputs = {name: self._buffers[name].clone() for name in self._outputs}
        self._stream.synchronize()
        return outputs

    def _enqueue(self) -> None:
        import torch

        if self._graph is not None:
            self._graph.replay()
            return
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise UserError(f"TensorRT failed to execute {self.engine_path.name}")
        self._runs_at_shape += 1
        if self.cuda_graph and self._runs_at_shape == 1:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._context.execute_async_v3(self._stream.cuda_stream)
            self._graph = graph
