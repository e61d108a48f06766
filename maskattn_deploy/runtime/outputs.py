"""Writing results: PNGs that carry their settings, mask grids, and the JSON report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from maskattn_deploy.errors import UserError
from maskattn_deploy.locks import remove_stale_temps, temp_prefix
from maskattn_deploy.utils import atomic_path, raise_if_disk_error

METADATA_KEY = "maskattn-deploy"  # PNG text chunk holding all settings as JSON
_INDEX = re.compile(r"^(\d{5})-")


def png_info(settings: Mapping[str, Any]) -> PngInfo:
    """One PNG text chunk per setting, plus all of them as JSON under :data:`METADATA_KEY`."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text(METADATA_KEY, json.dumps(dict(settings), sort_keys=True, default=str))
    return info


def save_png(
    image: Image.Image, path: str | Path, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write ``image`` atomically as PNG with ``settings`` in its text metadata."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings) if settings else None)
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The settings written by :func:`save_png` (empty when the PNG has none)."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
    raw = text.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def next_index(out_dir: Path) -> int:
    """The next free run number in ``out_dir`` (files are named ``NNNNN-...``)."""
    taken = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := _INDEX.match(p.name))]
    return max(taken, default=-1) + 1


def save_run_pngs(
    images: Sequence[Image.Image],
    out_dir: str | Path,
    name: Callable[[int, int], str],
    settings: Callable[[int], Mapping[str, Any]],
) -> list[Path]:
    """Write one run's images as ``out_dir / name(run, i)`` under the lowest free run number.

    Every PNG is first written completely to a temp file, then hard-linked to its final name;
    a link never replaces an existing file, so runs writing into one folder at the same time
    cannot overwrite each other's images: the run that loses a name takes the next run number.
    A killed run leaves at most temp files, which the next run removes.
    """
    out = Path(out_dir)
    created = not out.exists()
    temps: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        return _save_run(images, out, name, settings, temps)
    except OSError as exc:
        _discard(temps, out if created else None)
        raise_if_disk_error(exc, out)
        raise UserError(f"cannot write images to {out}: {exc.strerror or exc}") from exc
    finally:
        _discard(temps, None)


def _discard(temps: list[Path], folder: Path | None) -> None:
    """Remove our temp files (and ``folder`` when we made it and it is empty again)."""
    for tmp in temps:
        tmp.unlink(missing_ok=True)
    if folder is not None:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _save_run(
    images: Sequence[Image.Image],
    out: Path,
    name: Callable[[int, int], str],
    settings: Callable[[int], Mapping[str, Any]],
    temps: list[Path],
) -> list[Path]:
    for index, image in enumerate(images):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out / "run.png"), suffix=".tmp", dir=out)
        os.close(fd)
        temps.append(Path(tmp))
        image.save(tmp, format="PNG", pnginfo=png_info(settings(index)))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
    run = next_index(out)
    while (claimed := _claim(temps, [out / name(run, i) for i in range(len(temps))])) is None:
        run = max(run + 1, next_index(out))
    return claimed


def _claim(temps: list[Path], targets: list[Path]) -> list[Path] | None:
    """Link every temp to its target, or none of them (None) when a target already exists."""
    done: list[Path] = []
    for tmp, target in zip(temps, targets, strict=True):
        if not _link_new(tmp, target):
            for path in done:
                path.unlink(missing_ok=True)
            return None
        done.append(target)
    return done


def _link_new(tmp: Path, target: Path) -> bool:
    """Give ``tmp`` the name ``target`` unless it exists; False when it does."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network/FAT file systems): reserve, then move
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(tmp, target)
        return True


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=str) + "\n")
    return path
