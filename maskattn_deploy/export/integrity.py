"""Check an export folder's files against the SHA-256s its manifest records.

An export folder is a set of large files that get copied between machines, and a flipped
block in ``unet/model.onnx`` still loads: ONNX Runtime runs it and the images come out wrong.
So every open checks each recorded file:

* the size, always (a ``stat``; catches truncated and partly copied files at no cost), when
  the manifest records sizes;
* the full SHA-256, once per file version: the result is remembered in the user's cache keyed
  by the file's size, modification time, change time and inode, so later opens of an unchanged
  file cost a ``stat``. Editing a file in place changes its change time (which user programs
  cannot set back), so an edited file is hashed again even when its size and modification time
  were restored.

The remembered results live in ``<cache>/verified/`` (:func:`~maskattn_deploy.models.tiny.
cache_root`), never in the export folder, which may be read-only. When the cache cannot be
written, every open hashes in full (see docs/robustness.md for the measured cost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from maskattn_deploy.errors import UserError
from maskattn_deploy.utils import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CACHE_DIR = "verified"
_CHUNK = 1 << 22  # 4 MiB reads: hashing runs at memory/disk speed


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _cache_path(root: Path) -> Path | None:
    try:
        from maskattn_deploy.models.tiny import cache_root

        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
        return cache_root() / CACHE_DIR / f"{key}.json"
    except OSError:
        return None


def _load_cache(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path | None, entries: dict[str, list]) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError, UserError):  # a read-only cache only costs speed
        write_json_atomic(path, entries)


def remember_files(files: Mapping[str, str], folder: Path, root: str | Path) -> None:
    """Record that ``folder``'s files have the SHA-256s in ``files``, for the folder that will
    be at ``root`` (an export calls it on its temp folder just before renaming it into place:
    a rename of the folder keeps its files' size, times and inodes)."""
    cache_path = _cache_path(Path(root))
    cache = _load_cache(cache_path)
    for name, digest in files.items():
        with contextlib.suppress(OSError):
            cache[name] = [*_stamp((folder / name).stat()), digest]
    _save_cache(cache_path, cache)


def verify_files(
    root: str | Path,
    files: Mapping[str, str],
    sizes: Mapping[str, int] | None = None,
    error: type[UserError] = UserError,
    hint: str = "re-run maskattn-deploy export (or copy the folder again)",
) -> int:
    """Raise ``error`` naming the first file that is missing, has the wrong size or the wrong
    SHA-256; returns how many files were hashed (0 when every result was remembered)."""
    root = Path(root)
    cache_path = _cache_path(root)
    cache = _load_cache(cache_path)
    hashed = 0
    for name, digest in files.items():
        if not isinstance(name, str) or not isinstance(digest, str) or ".." in Path(name).parts:
            raise error(f"{root}: the manifest's 'files' entry {name!r} is malformed; {hint}")
        path = root / name
        try:
            stat = path.stat()
        except OSError:
            raise error(f"{path} is missing (listed in the manifest); {hint}") from None
        expected = (sizes or {}).get(name)
        if expected is not None and stat.st_size != expected:
            raise error(
                f"{path} has {stat.st_size} bytes, the manifest records {expected}: it is "
                f"truncated or was changed; {hint}"
            )
        stamp = _stamp(stat)
        if cache.get(name) == [*stamp, digest]:
            continue
        hashed += 1
        if sha256_file(path, _CHUNK) != digest:
            cache.pop(name, None)
            _save_cache(cache_path, cache)
            raise error(
                f"{path} is corrupt: its SHA-256 differs from the one in the manifest; {hint}"
            )
        cache[name] = [*stamp, digest]
    if hashed:
        _save_cache(cache_path, cache)
        log.info("verified %d file(s) of %s by SHA-256", hashed, root)
    return hashed
