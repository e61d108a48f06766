"""Several generation requests through one UNet call per step.

Requests can share a UNet call when they agree on everything that fixes the call's shape and
the timestep sequence: image size, step count, sampler and whether guidance is on
(:func:`batch_key`). Everything else stays per request: prompt, negative prompt, seed, guidance
scale, number of images. Each request keeps its own seeded generator and its own scheduler, so
the noise it starts from and the sampler's random draws never depend on its neighbours.

Row layout of a batched UNet call (the single-request layout of diffusers, generalised)::

    [uncond rows of request 0, uncond rows of request 2, ...,   # requests with guidance on
     cond rows of request 0, cond rows of request 1, ...]       # every request

Only the UNet (and the VAE) see several requests at once. Their CPU/GPU kernels may pick a
different blocking for another batch size, so a request's image is equal to its single-request
image within a floating-point tolerance (see docs/serving.md), not always bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maskattn_deploy.errors import UserError

# (height, width, steps, scheduler, guidance on): requests with equal keys share UNet calls.
BatchKey = tuple[int, int, int, str, bool]


def batch_key(config) -> BatchKey:
    """The key of a resolved :class:`~maskattn_deploy.runtime.pipeline.GenerateConfig`."""
    return (int(config.height), int(config.width), config.steps, config.scheduler, config.do_cfg)


def unet_rows(config) -> int:
    """UNet rows a request needs: its images, twice with guidance."""
    return config.num_images * (2 if config.do_cfg else 1)


def plan_batches(configs: Sequence, max_rows: int | None) -> list[list[int]]:
    """Indices of ``configs`` grouped into batches that can run together.

    Groups keep arrival order (the first request of each key opens its group) and are cut
    so that no batch needs more than ``max_rows`` UNet rows (None: no limit).
    """
    groups: dict[BatchKey, list[list[int]]] = {}
    for index, config in enumerate(configs):
        rows = unet_rows(config)
        if max_rows is not None and rows > max_rows:
            raise UserError(
                f"a request needs UNet batch {rows}, more than the {max_rows} rows allowed here"
            )
        chunks = groups.setdefault(batch_key(config), [[]])
        used = sum(unet_rows(configs[i]) for i in chunks[-1])
        if max_rows is not None and used + rows > max_rows:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]


@dataclass
class RowLayout:
    """Where each request's rows sit in the batched UNet input (see the module docstring)."""

    uncond: list[slice | None]  # per request: its unconditional rows (None without guidance)
    cond: list[slice]  # per request: its conditional rows

    @classmethod
    def of(cls, images: Sequence[int], cfg: Sequence[bool]) -> RowLayout:
        uncond: list[slice | None] = []
        offset = 0
        for n, on in zip(images, cfg, strict=True):
            uncond.append(slice(offset, offset + n) if on else None)
            offset += n if on else 0
        cond = []
        for n in images:
            cond.append(slice(offset, offset + n))
            offset += n
        return cls(uncond, cond)

    @property
    def rows(self) -> int:
        return self.cond[-1].stop if self.cond else 0

    @property
    def cond_rows(self) -> int:
        """Conditional rows in total (they are the last rows of the batch)."""
        return sum(s.stop - s.start for s in self.cond)

    def cond_slices_from_end(self) -> list[slice]:
        """Each request's conditional rows counted within the conditional block."""
        first = self.cond[0].start if self.cond else 0
        return [slice(s.start - first, s.stop - first) for s in self.cond]

    def assemble(
        self, uncond_parts: Sequence[torch.Tensor | None], cond_parts: Sequence
    ) -> torch.Tensor:
        """Concatenate per-request tensors into the batched layout."""
        parts = [u for u in uncond_parts if u is not None] + list(cond_parts)
        return torch.cat(parts)


def check_same_key(configs: Sequence) -> BatchKey:
    """The shared key of resolved ``configs``, or a one-line error naming what differs."""
    keys = {batch_key(config) for config in configs}
    if len(keys) != 1:
        raise UserError(
            "requests in one batch must share height, width, steps, scheduler and whether "
            f"guidance is on; got {len(keys)} different combinations (group them with "
            "maskattn_deploy.runtime.batching.plan_batches)"
        )
    return keys.pop()
