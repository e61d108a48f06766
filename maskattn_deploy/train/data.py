"""Training data: one interface over COCO captions, manifests, image folders and synthetic shapes.

A data source is chosen by a spec string (``--data`` on the command line, ``data.spec`` in a
recipe)::

    synthetic:N[:SEED]                  N procedurally drawn multi-object images (no files)
    coco:ANNOTATIONS.json:IMAGE_DIR     COCO captions (captions_train2014/2017.json layout)
    manifest:FILE.jsonl | FILE.csv      rows with an image path and a caption
    folder:DIR                          images with same-named .txt captions (recursive)
    PATH                                a bare path: .jsonl/.csv -> manifest, directory -> folder

The first ``:`` after the kind separates fields; the last ``:`` of a ``coco`` spec separates the
annotation file from the image folder. Relative image paths in a manifest are relative to the
manifest's folder. Manifest columns: ``image`` (or ``image_path``, ``file_name``, ``path``) and
``caption`` (or ``text``).

Every source serves items by index; :func:`prepare_image` resizes (shorter side to the target)
and centre-crops with SDXL micro-conditioning. Bad records never stop a run: empty captions are
dropped when the index is built, missing or unreadable images when first loaded; each is counted
once per reason in a :class:`SkipReport` that the run reports at the end and in its metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskattn_deploy.errors import UserError
from maskattn_deploy.train.captions import filter_multi_object, object_counter
from maskattn_deploy.train.synthetic import SyntheticSource

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "file_name", "path", "file")
CAPTION_KEYS = ("caption", "text", "prompt")

# Skip reasons (the keys of SkipReport.counts()).
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"


class SkipSample(Exception):
    """An item cannot be used; ``reason`` is one of the skip reasons above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Source(Protocol):
    """What the training loop needs from a data source: indexed captions and images."""

    description: str

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def image_id(self, index: int) -> str: ...

    def caption(self, index: int) -> str: ...

    def image(self, index: int) -> Image.Image: ...


@dataclass
class SkipReport:
    """Skipped records, counted once per (reason, record) however often a record is revisited."""

    records: dict[str, set[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, reason: str, key: str, detail: str = "") -> None:
        with self._lock:
            seen = self.records.setdefault(reason, set())
            if key in seen:
                return
            seen.add(key)
            self.details.setdefault(reason, detail or key)
        logger.warning("skipping %s (%s): %s", key, reason, detail or reason)

    def counts(self) -> dict[str, int]:
        return {reason: len(keys) for reason, keys in sorted(self.records.items())}

    @property
    def total(self) -> int:
        return sum(len(keys) for keys in self.records.values())

    def merge(self, other: SkipReport) -> None:
        for reason, keys in other.records.items():
            self.records.setdefault(reason, set()).update(keys)
        for reason, detail in other.details.items():
            self.details.setdefault(reason, detail)

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.counts().items())
        return f"{self.total} records skipped ({parts})"

    def state_dict(self) -> dict[str, list[str]]:
        return {reason: sorted(keys) for reason, keys in self.records.items()}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.records = {reason: set(keys) for reason, keys in state.items()}


@dataclass(frozen=True)
class Record:
    """An image file and its caption."""

    image: Path
    caption: str


class FileSource:
    """Records backed by image files on disk."""

    def __init__(self, records: Sequence[Record], description: str) -> None:
        self.records = list(records)
        self.description = description

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        return f"{self.records[index].image}#{index}"

    def image_id(self, index: int) -> str:
        return str(self.records[index].image)

    def caption(self, index: int) -> str:
        return self.records[index].caption

    def image(self, index: int) -> Image.Image:
        return load_image(self.records[index].image)


class SubsetSource:
    """A view of ``base`` restricted to ``indices`` (caption filtering, limits)."""

    def __init__(self, base: Source, indices: Sequence[int], description: str) -> None:
        self.base, self.indices, self.description = base, list(indices), description

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return self.base.key(self.indices[index])

    def image_id(self, index: int) -> str:
        return self.base.image_id(self.indices[index])

    def caption(self, index: int) -> str:
        return self.base.caption(self.indices[index])

    def image(self, index: int) -> Image.Image:
        return self.base.image(self.indices[index])


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` to RGB, or raise :class:`SkipSample` saying why it cannot be used."""
    if not path.is_file():
        raise SkipSample(MISSING_IMAGE, str(path))
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SkipSample(UNREADABLE_IMAGE, f"{path}: {exc}") from exc


# --------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` string."""

    kind: str  # synthetic | coco | manifest | folder
    args: tuple[str, ...]

    def __str__(self) -> str:
        return ":".join((self.kind, *self.args))


SPEC_HELP = (
    "synthetic:N[:SEED], coco:ANNOTATIONS.json:IMAGE_DIR, manifest:FILE.jsonl|FILE.csv, "
    "folder:DIR, or a bare .jsonl/.csv file or directory"
)


def parse_data_spec(spec: str) -> DataSpec:
    """Parse a data spec string; a malformed one raises a UserError showing the grammar."""
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if kind == "synthetic" and sep:
        fields = rest.split(":")
        if not 1 <= len(fields) <= 2 or not all(f.isdigit() for f in fields) or int(fields[0]) < 1:
            raise UserError(f"bad data spec {spec!r}: expected synthetic:N[:SEED] with N >= 1")
        return DataSpec("synthetic", tuple(fields))
    if kind == "coco" and sep:
        annotations, sep2, images = rest.rpartition(":")
        if not sep2 or not annotations or not images:
            raise UserError(f"bad data spec {spec!r}: expected coco:ANNOTATIONS.json:IMAGE_DIR")
        return DataSpec("coco", (annotations, images))
    if kind in ("manifest", "folder") and sep and rest:
        return DataSpec(kind, (rest,))
    path = Path(spec)
    if spec and path.suffix.lower() in (".jsonl", ".csv"):
        return DataSpec("manifest", (spec,))
    if spec and path.is_dir():
        return DataSpec("folder", (spec,))
    raise UserError(f"bad data spec {spec!r}: use {SPEC_HELP}")


def _read_coco(annotations: Path, image_dir: Path) -> list[Record]:
    if not annotations.is_file():
        raise UserError(f"COCO annotations {annotations} not found (captions_train2017.json?)")
    if not image_dir.is_dir():
        raise UserError(f"COCO image folder {image_dir} not found (e.g. train2017/)")
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        rows = [(a["image_id"], a.get("caption", "")) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(
            f"{annotations} is not a COCO captions file (needs 'images' with id/file_name "
            f"and 'annotations' with image_id/caption): {exc}"
        ) from exc
    records = []
    for image_id, caption in rows:
        name = files.get(image_id)
        # An annotation whose image id is unknown points at no file: counted as a missing image.
        path = image_dir / name if name else image_dir / f"<unknown image id {image_id}>"
        records.append(Record(path, str(caption or "").strip()))
    return records


def _pick(row: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return ""


def _read_manifest(path: Path) -> list[Record]:
    if not path.is_file():
        raise UserError(f"manifest {path} not found")
    base = path.parent
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number} is not valid JSON: {exc}") from exc
    records = []
    for row in rows:
        image = _pick(row, IMAGE_KEYS)
        if not image:
            raise UserError(f"{path}: a row has no image column (one of {', '.join(IMAGE_KEYS)})")
        records.append(Record(base / image, _pick(row, CAPTION_KEYS).strip()))
    return records


def _read_folder(folder: Path) -> list[Record]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        text = image.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace") if text.is_file() else ""
        records.append(Record(image, caption.strip()))
    return records


@dataclass
class DataOptions:
    """Index-time options (see TrainConfig's ``[data]`` section)."""

    multi_object_only: bool = False
    min_objects: int = 2
    caption_filter: str = "auto"
    limit: int = 0  # keep the first N usable records (0 = all)
    synthetic_size: int = 256


def open_source(spec: str | DataSpec, options: DataOptions, report: SkipReport) -> Source:
    """Build the indexed source for ``spec``: drop empty captions, apply the caption filter."""
    parsed = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if parsed.kind == "synthetic":
        n = int(parsed.args[0])
        seed = int(parsed.args[1]) if len(parsed.args) > 1 else 0
        base: Source = SyntheticSource(n, seed, options.synthetic_size)
    elif parsed.kind == "coco":
        base = FileSource(_read_coco(Path(parsed.args[0]), Path(parsed.args[1])), str(parsed))
    elif parsed.kind == "manifest":
        base = FileSource(_read_manifest(Path(parsed.args[0])), str(parsed))
    else:
        base = FileSource(_read_folder(Path(parsed.args[0])), str(parsed))
    keep: list[int] = []
    captions: list[str] = []
    for index in range(len(base)):
        caption = base.caption(index).strip()
        if not caption:
            report.add(EMPTY_CAPTION, base.key(index), "empty caption")
            continue
        keep.append(index)
        captions.append(caption)
    description = base.description
    if options.multi_object_only:
        counter, _ = object_counter(options.caption_filter)
        flags = filter_multi_object(captions, options.min_objects, counter)
        before = len(keep)
        keep = [index for index, ok in zip(keep, flags, strict=True) if ok]
        description += f", multi-object >= {options.min_objects} ({counter}): {len(keep)}/{before}"
        logger.info("caption filter kept %d of %d captions", len(keep), before)
    if options.limit > 0:
        keep = keep[: options.limit]
    if not keep:
        raise UserError(f"no usable records in {parsed} ({report.summary()}); check the data spec")
    if len(keep) == len(base):
        return base
    return SubsetSource(base, keep, description)


# ----------------------------------------------------------------------------- transform


def resize_crop_geometry(
    height: int, width: int, target_h: int, target_w: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized size and centre-crop top-left for an image of ``height`` x ``width``.

    The image is scaled so it covers the target (for a square target: shorter side -> target),
    then centre-cropped; crop offsets are in resized pixels, as SDXL's ``crop_coords_top_left``.
    """
    scale = max(target_h / height, target_w / width)
    new_h = max(target_h, round(height * scale))
    new_w = max(target_w, round(width * scale))
    top = max(0, int(round((new_h - target_h) / 2.0)))
    left = max(0, int(round((new_w - target_w) / 2.0)))
    return (new_h, new_w), (top, left)


def prepare_image(
    image: Image.Image, target_h: int, target_w: int
) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize + centre-crop to the target; pixels in [-1, 1] ``[3, H, W]`` and SDXL time_ids.

    time_ids = (original_h, original_w, crop_top, crop_left, target_h, target_w), the order the
    SDXL UNet's ``add_time_ids`` expect (original size, crop top-left, target size).
    """
    width, height = image.size
    (new_h, new_w), (top, left) = resize_crop_geometry(height, width, target_h, target_w)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]
    return pixels, (height, width, top, left, target_h, target_w)


# ---------------------------------------------------------------------------- the stream


@dataclass
class Item:
    """One usable training example: either pixels or cached latents/text, plus time_ids."""

    key: str
    caption: str
    time_ids: torch.Tensor  # [6] fp32
    pixels: torch.Tensor | None = None  # [3, H, W] in [-1, 1]
    cached: dict[str, torch.Tensor] | None = None


class ItemLoader(Protocol):
    """Turns an index into an :class:`Item` or raises :class:`SkipSample`."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def load(self, index: int) -> Item: ...


class ImageItemLoader:
    """Loads source images and prepares them at the training resolution."""

    def __init__(self, source: Source, resolution: int) -> None:
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def key(self, index: int) -> str:
        return self.source.key(index)

    def load(self, index: int) -> Item:
        image = self.source.image(index)
        pixels, time_ids = prepare_image(image, self.resolution, self.resolution)
        return Item(
            key=self.source.key(index),
            caption=self.source.caption(index).strip(),
            time_ids=torch.tensor(time_ids, dtype=torch.float32),
            pixels=pixels,
        )


@dataclass
class Batch:
    """A collated micro-batch."""

    keys: list[str]
    captions: list[str]
    time_ids: torch.Tensor  # [B, 6]
    pixels: torch.Tensor | None = None  # [B, 3, H, W]
    cached: dict[str, torch.Tensor] | None = None  # name -> [B, ...]

    def __len__(self) -> int:
        return len(self.keys)


def collate(items: Sequence[Item]) -> Batch:
    cached = None
    if items[0].cached is not None:
        cached = {name: torch.stack([it.cached[name] for it in items]) for name in items[0].cached}  # type: ignore[index]
    return Batch(
        keys=[it.key for it in items],
        captions=[it.caption for it in items],
        time_ids=torch.stack([it.time_ids for it in items]),
        pixels=torch.stack([it.pixels for it in items]) if items[0].pixels is not None else None,  # type: ignore[misc]
        cached=cached,
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch``: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x6D61736B]).permutation(n)


class BatchStream:
    """Deterministic, resumable micro-batches for one process of a (possibly) distributed run.

    Epoch ``e`` visits ``epoch_order(n, seed, e)``; process ``rank`` of ``world`` takes every
    ``world``-th index of it. The state is (epoch, position in this rank's share), so a resumed
    run continues with exactly the items an uninterrupted run would have used. Items that fail
    to load are recorded in the skip report and replaced by the next index in order.
    """

    def __init__(
        self,
        loader: ItemLoader,
        seed: int,
        report: SkipReport,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ) -> None:
        if len(loader) < world:
            raise UserError(f"the data set has {len(loader)} records, fewer than {world} processes")
        self.loader, self.seed, self.report = loader, seed, report
        self.rank, self.world = rank, world
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None

    def _share(self) -> np.ndarray:
        if self._order is None:
            self._order = epoch_order(len(self.loader), self.seed, self.epoch)[
                self.rank :: self.world
            ]
        return self._order

    def _take(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            share = self._share()
            if self.position >= len(share):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
                continue
            indices.append(int(share[self.position]))
            self.position += 1
        return indices

    def _load(self, index: int) -> Item | None:
        try:
            return self.loader.load(index)
        except SkipSample as exc:
            self.report.add(exc.reason, self.loader.key(index), exc.detail)
            return None

    def next_batch(self, size: int) -> Batch:
        """The next ``size`` usable items of this rank's stream."""
        items: list[Item] = []
        failures = 0
        while len(items) < size:
            indices = self._take(size - len(items))
            loaded = self._pool.map(self._load, indices) if self._pool else map(self._load, indices)
            for item in loaded:
                if item is None:
                    failures += 1
                else:
                    items.append(item)
                    failures = 0
            if failures > len(self._share()) + size:
                raise UserError(f"no loadable training records ({self.report.summary()})")
        return collate(items)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
