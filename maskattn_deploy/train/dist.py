"""The process context of a training run: one process, or many under ``accelerate launch``.

Hugging Face Accelerate (imported lazily) sets up the device and the process group, so the same
``maskattn-deploy train`` works on a laptop and under ``accelerate launch --num_processes 8``.
The gates are not a submodule of the UNet (the processors call them), so instead of wrapping a
module in DistributedDataParallel the trainer averages the gate gradients itself with one
all-reduce per optimizer step: the gates are small (tens of thousands to a few million values)
and this keeps the frozen 2.6 B-parameter UNet out of DDP's bookkeeping.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from maskattn_deploy._lazy import available, require

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Device, rank and world size, with the few collectives the trainer needs."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    accelerator: Any = None
    launcher_precision: str = "no"  # mixed precision requested through accelerate launch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place across processes (one flat all-reduce)."""
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Copy ``src``'s values of ``tensors`` to every process (identical starting gates)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=src)

    def mean(self, value: float) -> float:
        """Average a Python float across processes (for logging)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.all_reduce_mean_([tensor])
        return float(tensor.item())

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_runtime(cpu: bool = False) -> Runtime:
    """The runtime for this process: Accelerate when installed (required for >1 process)."""
    if not available("accelerate"):
        if _launched_world() > 1:
            require("accelerate", "multi-process training")
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        return Runtime(device=device)
    accelerate = require("accelerate", "training")
    accelerator = accelerate.Accelerator(cpu=cpu)
    state = accelerator.state
    precision = str(getattr(accelerator, "mixed_precision", "no") or "no")
    runtime = Runtime(
        device=accelerator.device,
        rank=state.process_index,
        world=state.num_processes,
        local_rank=state.local_process_index,
        accelerator=accelerator,
        launcher_precision=precision,
    )
    if runtime.distributed:
        logger.info("process %d of %d on %s", runtime.rank, runtime.world, runtime.device)
    return runtime


def resolve_precision(requested: str, runtime: Runtime) -> tuple[str, torch.dtype]:
    """(precision name, dtype of the frozen backbone) for this device.

    ``auto``: whatever ``accelerate launch --mixed_precision`` asked for, else bf16 on CUDA
    with bf16 support, fp16 on other CUDA GPUs, fp32 on the CPU. Half precision on the CPU is
    refused (fp32 there) because CPU half kernels are slow and not what production uses.
    """
    if runtime.device.type != "cuda":
        if requested in ("fp16", "bf16"):
            logger.warning(
                "mixed_precision=%s ignored on %s: training in fp32", requested, runtime.device
            )
        return "no", torch.float32
    if requested == "auto":
        if runtime.launcher_precision in ("fp16", "bf16"):
            requested = runtime.launcher_precision
        else:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested]
    return requested, dtype
