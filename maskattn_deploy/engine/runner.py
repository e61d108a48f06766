"""A small TensorRT runner: the ``tensorrt`` backend of the runtime.

Lifecycle as in Polygraphy: ``TrtRunner(path).activate()``, ``run(feed, profile) -> outputs``
any number of times, ``deactivate()``. The engine is deserialized once; each optimization
profile used gets its own execution context (TensorRT lets one context use one profile at a
time), with device buffers allocated once per input-shape set and reused. Device buffers are
torch CUDA tensors (torch is a hard dependency, so no second CUDA binding is needed).

Streams: the runner enqueues on its own stream. Before it copies the inputs it waits on the
caller's current stream (where the inputs were produced), and before returning it makes the
caller's stream wait on its own, so outputs are safe to use on the caller's stream without a
host synchronization; ``record_stream`` keeps the caching allocator from reusing the memory of
inputs or outputs while the other stream still uses it. With ``cuda_graph=True`` and unchanged
shapes, the second call captures the enqueue into a CUDA graph and later calls replay it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskattn_deploy.errors import UserError

if TYPE_CHECKING:
    from maskattn_deploy.engine.manifest import EngineManifest

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


@dataclass
class _ProfileState:
    """One execution context (bound to one optimization profile) and its buffers."""

    context: Any
    buffers: dict[str, Any] = field(default_factory=dict)
    shape_key: tuple | None = None
    graph: Any = None  # the enqueue as a cuda_graphs.CapturedGraph, once captured
    runs_at_shape: int = 0


class TrtRunner:
    """Runs one engine; inputs/outputs are dicts keyed by the export's tensor names."""

    def __init__(
        self,
        engine_path: str | Path,
        export_dir: str | Path | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.export_dir = export_dir
        self.cuda_graph = cuda_graph
        self._loaded: Any = None
        self._stream: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._profiles: dict[int, _ProfileState] = {}

    @property
    def active(self) -> bool:
        return self._loaded is not None

    @property
    def manifest(self) -> EngineManifest | None:
        """The engine manifest (profiles, plugin kernel, ...); None before :meth:`activate`."""
        return self._loaded.manifest if self._loaded is not None else None

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def activate(self) -> TrtRunner:
        """Load the (checked) engine once and create the runner's stream."""
        import tensorrt as trt
        import torch

        from maskattn_deploy.engine.builder import load_engine_checked

        self._loaded = load_engine_checked(self.engine_path, self.export_dir)
        self._stream = torch.cuda.Stream()
        engine = self._loaded.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        return self

    def deactivate(self) -> None:
        """Release contexts, buffers and graphs, then the engine and its runtime."""
        if self._stream is not None:
            self._stream.synchronize()
        self._profiles = {}
        if self._loaded is not None:
            self._loaded.release()
        self._loaded = None
        self._stream = None

    def __enter__(self) -> TrtRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def _profile(self, index: int) -> _ProfileState:
        """The execution context of optimization profile ``index`` (created on first use)."""
        if index in self._profiles:
            return self._profiles[index]
        engine = self._loaded.engine
        if not 0 <= index < engine.num_optimization_profiles:
            raise UserError(
                f"{self.engine_path.name} has {engine.num_optimization_profiles} profiles, "
                f"not profile {index}"
            )
        context = engine.create_execution_context()
        if index and not context.set_optimization_profile_async(index, self._stream.cuda_stream):
            raise UserError(f"TensorRT could not select profile {index} of {self.engine_path.name}")
        self._profiles[index] = _ProfileState(context)
        return self._profiles[index]

    def _torch_dtype(self, name: str) -> Any:
        import tensorrt as trt
        import torch

        engine = self._loaded.engine
        trt_dtype = engine.get_tensor_dtype(name)
        for trt_name, torch_name in _DTYPES.items():
            if hasattr(trt, trt_name) and trt_dtype == getattr(trt, trt_name):
                return getattr(torch, torch_name)
        raise UserError(
            f"tensor {name} has TensorRT dtype {trt_dtype} that the runner does not support"
        )

    def _prepare(self, state: _ProfileState, feed: dict[str, Any]) -> None:
        """(Re)bind input shapes and allocate buffers when the input shapes change."""
        import torch

        missing = [n for n in self._inputs if n not in feed]
        if missing:
            raise UserError(
                f"missing engine inputs: {', '.join(missing)} (expected {', '.join(self._inputs)})"
            )
        key = tuple(tuple(feed[n].shape) for n in self._inputs)
        if key == state.shape_key:
            return
        state.graph = None
        state.runs_at_shape = 0
        context = state.context
        buffers = {}
        for name, shape in zip(self._inputs, key, strict=True):
            if not context.set_input_shape(name, shape):
                raise UserError(
                    f"input {name} shape {list(shape)} is outside the engine's profiles; rebuild for it"
                )
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        state.buffers = buffers
        state.shape_key = key

    def run(self, feed: dict[str, Any], profile: int = 0) -> dict[str, Any]:
        """Copy ``feed`` (numpy arrays or torch tensors) in, execute with optimization profile
        ``profile``, return the outputs (fresh tensors, ready on the caller's current stream)."""
        import torch

        if not self.active:
            raise UserError("TrtRunner.run called before activate()")
        state = self._profile(profile)
        self._prepare(state, feed)
        caller = torch.cuda.current_stream()
        self._stream.wait_stream(caller)  # the inputs are complete on the caller's stream
        with torch.cuda.stream(self._stream):
            for name in self._inputs:
                value = feed[name]
                src = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
                if src.is_cuda:
                    src.record_stream(self._stream)
                state.buffers[name].copy_(src, non_blocking=True)
            self._enqueue(state)
            outputs = {name: state.buffers[name].clone() for name in self._outputs}
        caller.wait_stream(self._stream)  # the caller's later work sees the outputs
        for out in outputs.values():
            out.record_stream(caller)
        return outputs

    def _enqueue(self, state: _ProfileState) -> None:
        from maskattn_deploy.cuda_graphs import capture

        if state.graph is not None:
            state.graph.replay()
            return
        context = state.context
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise UserError(f"TensorRT failed to execute {self.engine_path.name}")
        state.runs_at_shape += 1
        if self.cuda_graph and state.runs_at_shape == 1:  # the run above was the warm-up
            stream = self._stream.cuda_stream
            state.graph = capture(lambda: context.execute_async_v3(stream), stream=self._stream)
