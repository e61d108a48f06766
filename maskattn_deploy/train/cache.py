"""Disk cache of VAE latents and text embeddings, so a long run encodes each input once.

``data.cache`` = ``latents`` | ``text`` | ``all`` (``off`` by default). The cache lives in
``data.cache_dir`` (default ``OUT/cache``) and is keyed by model, resolution, data and caption
filter: a cache built for something else is refused rather than silently reused.

Layout (safetensors shards, each written atomically, so an interrupted build resumes)::

    manifest.json                 format, key, counts, shard size, skipped records
    index.safetensors             record_image [N] int64: record -> image slot
    latents-00000.safetensors     mean/std [S, 4, h, w] fp32, time_ids [S, 6], valid [S] uint8
    text-00000.safetensors        prompt_embeds [S, 77, E], pooled [S, P] (encoder dtype)

Latents are stored as the VAE posterior (mean, std), not a sample, so a cached run draws a fresh
latent sample every step exactly like an uncached run. Images are deduplicated (COCO has five
captions per image). Under ``accelerate launch`` each process encodes every ``world``-th shard.

Sizes: SDXL at 512 px stores 2 x 4x64x64 fp32 = 128 KiB per image; fp16 text embeddings are
77 x 2048 x 2 B = 308 KiB per caption (COCO train2017: ~18 GB images + ~180 GB captions; cache
``latents`` only when disk is short).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import LATENT_FACTOR
from maskattn_deploy.train.data import (
    UNREADABLE_IMAGE,
    Item,
    SkipSample,
    Source,
    prepare_image,
)
from maskattn_deploy.utils import atomic_path, sha256_json, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = "maskattn-deploy-train-cache/1"
SHARD_SIZE = 1024


@dataclass
class CachePlan:
    """What to cache and where."""

    folder: Path
    latents: bool
    text: bool
    key: str
    shard_size: int = SHARD_SIZE


def cache_key(model: str, resolution: int, source: Source, extra: dict[str, Any]) -> str:
    """A hash of everything that changes cached values."""
    n = len(source)
    probe = [source.key(i) for i in sorted({0, n // 2, n - 1})]
    return sha256_json(
        {"format": CACHE_FORMAT, "model": model, "resolution": resolution,
         "data": source.description, "records": n, "probe": probe, **extra}
    )[:24]  # fmt: skip


def image_slots(source: Source) -> tuple[list[int], list[int]]:
    """(record -> image slot, slot -> first record): one slot per distinct image."""
    slot_of: dict[str, int] = {}
    record_slot, first_record = [], []
    for index in range(len(source)):
        image_id = source.image_id(index)
        if image_id not in slot_of:
            slot_of[image_id] = len(first_record)
            first_record.append(index)
        record_slot.append(slot_of[image_id])
    return record_slot, first_record


def _shard_path(plan: CachePlan, kind: str, shard: int) -> Path:
    return plan.folder / f"{kind}-{shard:05d}.safetensors"


def _shard_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key") == key
    except Exception:  # a foreign or damaged file is rebuilt
        return False


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)


def _encode_latent_shard(
    plan: CachePlan,
    shard: int,
    source: Source,
    slots: list[int],
    resolution: int,
    encode_pixels: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch: int,
) -> None:
    means, stds, time_ids, valid, skipped = [], [], [], [], {}
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            mean, std = encode_pixels(torch.stack([p for p, _ in pending]))
            for row, (_, tid) in enumerate(pending):
                means.append(mean[row].cpu())
                stds.append(std[row].cpu())
                time_ids.append(tid)
            pending.clear()

    for row, record in enumerate(slots):
        try:
            pixels, tid = prepare_image(source.image(record), resolution, resolution)
            pending.append((pixels, torch.tensor(tid, dtype=torch.float32)))
            valid.append(1)
            if len(pending) >= batch:
                flush()
        except SkipSample as exc:
            flush()
            skipped[str(row)] = [exc.reason, exc.detail]
            valid.append(0)
            means.append(None)
            stds.append(None)
            time_ids.append(torch.zeros(6))
    flush()
    shape = next((m.shape for m in means if m is not None), None)
    if shape is None:  # every image of the shard failed
        latent = resolution // LATENT_FACTOR
        shape = torch.Size((4, latent, latent))
    zeros = torch.zeros(shape)
    tensors = {
        "mean": torch.stack([m if m is not None else zeros for m in means]),
        "std": torch.stack([s if s is not None else zeros for s in stds]),
        "time_ids": torch.stack(time_ids),
        "valid": torch.tensor(valid, dtype=torch.uint8),
    }
    _save_shard(
        _shard_path(plan, "latents", shard),
        tensors,
        {"key": plan.key, "skipped": json.dumps(skipped)},
    )


def _encode_text_shard(
    plan: CachePlan,
    shard: int,
    captions: list[str],
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    batch: int,
) -> None:
    embeds, pooled = [], []
    for start in range(0, len(captions), batch):
        e, p = encode_text(captions[start : start + batch])
        embeds.append(e.cpu())
        pooled.append(p.cpu())
    tensors = {"prompt_embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}
    _save_shard(_shard_path(plan, "text", shard), tensors, {"key": plan.key})


def build_cache(
    plan: CachePlan,
    source: Source,
    resolution: int,
    runtime: Any,
    encode_pixels: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None,
    batch: int = 8,
    progress: bool = True,
) -> None:
    """Encode what is missing; every process builds its shards, the main one the manifest."""
    manifest_path = plan.folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != plan.key:
            raise UserError(
                f"the cache in {plan.folder} was built for another model, resolution or data set; "
                "delete it or set data.cache_dir to a new folder"
            )
        if (
            manifest.get("latents", False) >= plan.latents
            and manifest.get("text", False) >= plan.text
        ):
            return
    plan.folder.mkdir(parents=True, exist_ok=True)
    record_slot, first_record = image_slots(source)
    jobs: list[tuple[str, int]] = []
    if plan.latents:
        jobs += [("latents", s) for s in range(-(-len(first_record) // plan.shard_size))]
    if plan.text:
        jobs += [("text", s) for s in range(-(-len(source) // plan.shard_size))]
    mine = [job for n, job in enumerate(jobs) if n % runtime.world == runtime.rank]
    from tqdm.auto import tqdm

    bar = tqdm(mine, desc="caching", disable=not (progress and runtime.is_main), unit="shard")
    for kind, shard in bar:
        if _shard_done(_shard_path(plan, kind, shard), plan.key):
            continue
        lo, hi = shard * plan.shard_size, (shard + 1) * plan.shard_size
        if kind == "latents":
            assert encode_pixels is not None
            _encode_latent_shard(
                plan, shard, source, first_record[lo:hi], resolution, encode_pixels, batch
            )
        else:
            assert encode_text is not None
            captions = [source.caption(i).strip() for i in range(lo, min(hi, len(source)))]
            _encode_text_shard(plan, shard, captions, encode_text, batch)
    runtime.barrier()
    if runtime.is_main:
        _write_manifest(plan, source, record_slot, len(first_record))
    runtime.barrier()


def _write_manifest(plan: CachePlan, source: Source, record_slot: list[int], images: int) -> None:
    from safetensors.torch import save_file

    with atomic_path(plan.folder / "index.safetensors") as tmp:
        save_file({"record_image": torch.tensor(record_slot, dtype=torch.int64)}, str(tmp))
    write_json_atomic(
        plan.folder / "manifest.json",
        {"format": CACHE_FORMAT, "key": plan.key, "records": len(source), "images": images,
         "latents": plan.latents, "text": plan.text, "shard_size": plan.shard_size,
         "data": source.description},
    )  # fmt: skip


class CachedItemLoader:
    """Items served from the cache; what is not cached (images or captions) is loaded live."""

    def __init__(self, plan: CachePlan, source: Source, resolution: int) -> None:
        from safetensors.torch import load_file

        self.plan, self.source, self.resolution = plan, source, resolution
        self.record_image = load_file(str(plan.folder / "index.safetensors"))["record_image"]
        if len(self.record_image) != len(source):
            raise UserError(f"the cache in {plan.folder} does not match the data; delete it")
        self._handles: dict[tuple[str, int], Any] = {}
        self._valid: dict[int, torch.Tensor] = {}
        self._skipped: dict[int, dict[str, list[str]]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def key(self, index: int) -> str:
        return self.source.key(index)

    def _handle(self, kind: str, shard: int) -> Any:
        from safetensors import safe_open

        if (kind, shard) not in self._handles:
            path = _shard_path(self.plan, kind, shard)
            handle = safe_open(str(path), framework="pt")
            self._handles[(kind, shard)] = handle
            if kind == "latents":
                self._valid[shard] = handle.get_tensor("valid")
                self._skipped[shard] = json.loads((handle.metadata() or {}).get("skipped", "{}"))
        return self._handles[(kind, shard)]

    def _row(self, kind: str, position: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        shard, row = divmod(position, self.plan.shard_size)
        handle = self._handle(kind, shard)
        return {name: handle.get_slice(name)[row : row + 1][0] for name in names}

    def skipped_reason(self, index: int) -> tuple[str, str] | None:
        """Why the image of record ``index`` could not be cached, or None when it was."""
        shard, row = divmod(int(self.record_image[index]), self.plan.shard_size)
        self._handle("latents", shard)
        if int(self._valid[shard][row]):
            return None
        reason, detail = self._skipped[shard].get(str(row), [UNREADABLE_IMAGE, ""])
        return reason, detail

    def load(self, index: int) -> Item:
        cached: dict[str, torch.Tensor] = {}
        caption = self.source.caption(index).strip()
        if self.plan.latents:
            why = self.skipped_reason(index)
            if why is not None:
                raise SkipSample(*why)
            row = self._row("latents", int(self.record_image[index]), ("mean", "std", "time_ids"))
            time_ids = row.pop("time_ids")
            cached.update(row)
            pixels = None
        else:
            pixels, tid = prepare_image(self.source.image(index), self.resolution, self.resolution)
            time_ids = torch.tensor(tid, dtype=torch.float32)
        if self.plan.text:
            cached.update(self._row("text", index, ("prompt_embeds", "pooled")))
        return Item(self.source.key(index), caption, time_ids, pixels=pixels, cached=cached or None)
