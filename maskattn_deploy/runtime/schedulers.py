"""Sampler names -> diffusers schedulers, built ``from_config`` of the model's own scheduler.

Re-using diffusers' schedulers (never re-implementing them) keeps every backend on the same
sampling maths as ``StableDiffusionXLPipeline``. The model's config supplies the training
noise schedule (betas, timestep spacing, prediction type); the name only picks the solver.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from maskattn_deploy.errors import UserError

# name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler ``name`` configured from the model's scheduler ``config``."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    cls = getattr(importlib.import_module("diffusers"), class_name)
    return cls.from_config(dict(config), **overrides)
