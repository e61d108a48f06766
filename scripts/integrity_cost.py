#!/usr/bin/env python
"""Cost of the export-folder integrity check (maskattn_deploy.export.integrity).

    python scripts/integrity_cost.py EXPORT_DIR            # a real export folder
    python scripts/integrity_cost.py --file-bytes 5140000000 [--dir DIR]
        # one file of that size (the full-size SDXL UNet's model.onnx.data is 5.14 GB in fp16),
        # random bytes, checked by the same code

For each case it times: the first open with the file's pages dropped from the page cache
(disk read + SHA-256), the first open with the file in the page cache (SHA-256 alone), and a
later open of the unchanged folder (remembered result: one stat per file). Prints one JSON
object. The remembered results go to a temporary cache (MASKATTN_DEPLOY_CACHE), not yours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 1 << 24


def drop_pages(path: Path) -> None:
    """Evict one file's pages from the page cache (this file only, nothing else)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_file(folder: Path, size: int) -> dict[str, str]:
    path = folder / "unet" / "model.onnx.data"
    path.parent.mkdir(parents=True)
    with path.open("wb") as handle:
        left = size
        while left:
            block = os.urandom(min(CHUNK, left))
            handle.write(block)
            left -= len(block)
    from maskattn_deploy.utils import sha256_file

    return {"unet/model.onnx.data": sha256_file(path)}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure(root: Path, files: dict[str, str]) -> dict[str, float | int]:
    from maskattn_deploy.export.integrity import _cache_path, verify_files

    sizes = {name: (root / name).stat().st_size for name in files}
    cache = _cache_path(root)
    result: dict[str, float | int] = {"files": len(files), "bytes": sum(sizes.values())}
    for name in files:
        drop_pages(root / name)
    result["first_open_cold_s"], hashed = timed(lambda: verify_files(root, files, sizes))
    assert hashed == len(files)
    if cache is not None:
        cache.unlink(missing_ok=True)
    result["first_open_warm_s"], _ = timed(lambda: verify_files(root, files, sizes))
    result["later_open_s"], hashed = timed(lambda: verify_files(root, files, sizes))
    assert hashed == 0
    result["gb_per_s_warm"] = round(result["bytes"] / result["first_open_warm_s"] / 1e9, 3)
    result["gb_per_s_cold"] = round(result["bytes"] / result["first_open_cold_s"] / 1e9, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", nargs="?", type=Path)
    parser.add_argument("--file-bytes", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None, help="where the test file goes")
    args = parser.parse_args()
    if (args.export_dir is None) == (args.file_bytes is None):
        parser.error("pass EXPORT_DIR or --file-bytes")
    cache = Path(tempfile.mkdtemp(prefix="integrity-cache-"))
    os.environ["MASKATTN_DEPLOY_CACHE"] = str(cache)
    work = None
    try:
        if args.export_dir is not None:
            root = args.export_dir
            files = json.loads((root / "manifest.json").read_text())["files"]
            case = f"export folder {root}"
        else:
            work = Path(tempfile.mkdtemp(prefix="integrity-file-", dir=args.dir))
            root = work
            files = make_file(work, args.file_bytes)
            case = f"one random file of {args.file_bytes} bytes"
        report = {
            "case": case,
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
            **measure(root, files),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
