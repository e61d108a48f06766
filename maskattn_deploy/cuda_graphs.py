"""CUDA-graph capture, in one place for the whole package.

A graph replays a recorded sequence of kernel launches with one call, so Python and launch
overhead drop out: the GPU check times a UNet step or a burst of short kernels this way, and
the TensorRT runner replays an engine's enqueue. PyTorch's rules for capture apply: allocations,
lazy initialisation (cuBLAS handles, Triton compilation, autotuning) must happen before it, so
``warmup`` calls run first on a side stream; the captured call's output tensors are static
buffers that every replay overwrites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class CapturedGraph(Generic[T]):
    """A captured call: :meth:`replay` reruns it and returns the (overwritten) output."""

    graph: Any  # torch.cuda.CUDAGraph
    output: T

    def replay(self) -> T:
        self.graph.replay()
        return self.output


def capture(
    fn: Callable[[], T], *, warmup: int = 0, device: Any = None, stream: Any = None
) -> CapturedGraph[T]:
    """Capture one call of ``fn`` as a CUDA graph on ``device`` (default: the current one).

    ``warmup`` untimed calls run first on a side stream that then joins the current stream.
    The capture runs on ``stream`` (default: a private stream that torch provides); pass the
    stream the work is normally enqueued on when ``fn`` launches onto a specific stream.
    Raises whatever capture raises (an operation that is not capturable, a host sync inside).
    """
    import torch

    if warmup:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        output = fn()
    return CapturedGraph(graph, output)
