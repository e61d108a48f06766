"""The gates' optimizer: AdamW, a warm-up + decay learning-rate schedule, the fp16 grad scaler."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from maskattn_deploy.train.config import OptimSection


def lr_factor(
    step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` (so the first step already learns), then cosine or
    linear decay from 1 to ``min_ratio`` at ``total``, or constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


@dataclass
class Optimization:
    """Optimizer, LR schedule and grad scaler of a run (their state dicts are checkpointed)."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def build_optimization(
    params: list[torch.nn.Parameter],
    o: OptimSection,
    total_steps: int,
    device_type: str,
    fp16: bool,
) -> Optimization:
    """AdamW over ``params`` with the schedule of :func:`lr_factor`; a scaler only for fp16."""
    optimizer = torch.optim.AdamW(
        params,
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    factor = functools.partial(
        lr_factor,
        warmup=o.warmup_steps,
        total=total_steps,
        schedule=o.schedule,
        min_ratio=o.min_lr_ratio,
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return Optimization(optimizer, lr_scheduler, torch.amp.GradScaler(device_type, enabled=fp16))
