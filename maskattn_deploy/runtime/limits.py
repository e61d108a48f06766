"""What one generation request may ask for, and failures that depend on its size.

:func:`check_request` refuses values that cannot mean anything (no steps, a NaN guidance, a
seed torch cannot take, sizes no UNet runs at), naming the parameter and its range;
:class:`~maskattn_deploy.runtime.pipeline.GenerateConfig` runs it, so the single, the batched
and the served path all do. ``Pipeline.resolve`` adds the model's own limits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from maskattn_deploy.checks import check_float, check_int
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import LATENT_FACTOR

if TYPE_CHECKING:
    from maskattn_deploy.runtime.pipeline import GenerateConfig

# What one request may ask for (docs/robustness.md). Pipeline.resolve() adds the model's own
# limits: sizes in the export's range and multiples of the UNet's downsampling, steps up to the
# scheduler's training timesteps.
MAX_STEPS = 1000  # SDXL's schedulers are trained on 1000 timesteps
MAX_GUIDANCE = 100.0  # far past any useful scale; larger values overflow into NaN images
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_IMAGES = 64
MAX_SIZE = 4096  # pixels per side: 4x SDXL's 1024


def check_request(
    steps: int | None,
    guidance: float,
    seed: int,
    num_images: int,
    height: int | None = None,
    width: int | None = None,
) -> None:
    """Refuse values a generation cannot mean, naming the parameter and its range (None: the
    model's default). GenerateConfig runs it, so every path (single, batched, served) does."""
    if steps is not None:
        check_int("steps", steps, 1, MAX_STEPS)
    check_float("guidance", guidance, 0.0, MAX_GUIDANCE, hint=" (values <= 1 turn it off)")
    check_int("seed", seed, 0, MAX_SEED)
    check_int("num_images", num_images, 1, MAX_IMAGES)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_int(name, value, LATENT_FACTOR, MAX_SIZE)
            check_size(name, value, None)


def check_size(name: str, value: int, allowed: tuple[int, int] | None) -> None:
    """Refuse sizes that are not positive multiples of 8 or lie outside the exported range."""
    if value <= 0 or value % LATENT_FACTOR:
        raise UserError(
            f"{name} {value} must be a positive multiple of {LATENT_FACTOR}", params=(name,)
        )
    if allowed and not allowed[0] <= value <= allowed[1]:
        raise UserError(
            f"{name} {value} is outside the exported range {allowed[0]}..{allowed[1]} px; "
            "choose a size in range or re-export with a recipe that covers it",
            params=(name,),
        )


@contextlib.contextmanager
def out_of_memory_as_error(configs: Sequence[GenerateConfig], device: Any) -> Iterator[None]:
    """An allocation that fails mid-run (torch on CPU or CUDA, ONNX Runtime) becomes one line
    naming the parameters that set the memory needed."""
    try:
        yield
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        first = configs[0]
        images = sum(c.num_images for c in configs)
        raise UserError(
            f"out of memory generating {images} image(s) of {first.height}x{first.width} px on "
            f"{device}: lower height and width, or num_images",
            params=("height", "width", "num_images"),
        ) from exc


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    library = type(exc).__module__.startswith(("torch", "onnxruntime")) or isinstance(
        exc, RuntimeError
    )
    text = str(exc).lower()
    marks = ("out of memory", "can't allocate memory", "bad allocation", "failed to allocate")
    return library and any(mark in text for mark in marks)
