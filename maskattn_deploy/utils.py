"""Small shared helpers: atomic writes, hashing, JSON."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temp name carries our pid (:func:`maskattn_deploy.locks.temp_prefix`), so a file left
    by a killed process is recognised and removed by a later run.
    """
    from maskattn_deploy.errors import UserError
    from maskattn_deploy.locks import temp_prefix

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise_if_disk_error(exc, target)
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except Exception as exc:  # libraries wrap OS errors (tokenizers: "os error 28")
            raise_if_disk_error(exc, target)
            raise
        if tmp_path.exists():
            tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; it becomes ``target`` only if the block succeeds.

    Without ``overwrite`` an existing ``target`` is refused before any work is done. The
    destination's write lock is held throughout (a second writer is refused, see
    :mod:`maskattn_deploy.locks`), and temp folders of earlier writers that were killed are
    removed first. A write that fails because the disk is full or the folder is not writable
    ends in one line naming the folder.
    """
    from maskattn_deploy.errors import UserError
    from maskattn_deploy.locks import output_lock, remove_stale_temps, temp_prefix

    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(
            f"{target} already exists; pass overwrite to replace it", params=("overwrite",)
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot write to {target.parent}: {exc.strerror}; choose a writable out",
            params=("out",),
        ) from exc
    with output_lock(target):
        remove_stale_temps(target.parent, target.name)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # a swap interrupted by a kill; we hold the lock
        if target.exists() and not overwrite:  # made while we waited for the lock
            raise UserError(f"{target} already exists; pass --overwrite to replace it")
        try:
            tmp = Path(
                tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".partial", dir=target.parent)
            )
        except OSError as exc:
            raise UserError(
                f"cannot write to {target.parent}: {exc.strerror}; choose a writable --out"
            ) from exc
        try:
            try:
                yield tmp
            except Exception as exc:  # libraries wrap OS errors (tokenizers: "os error 28")
                raise_if_disk_error(exc, target)
                raise
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; use the usual mode
            if target.exists():
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


BUILD_WAIT_S = 3600.0  # how long a cache user waits for another process building the entry


def build_once(
    target: str | Path,
    is_done: Callable[[Path], bool],
    build: Callable[[], Any],
    say: Callable[[str], None] | None = None,
) -> bool:
    """Build a cache entry at ``target`` unless ``is_done(target)``; True when built here.

    Processes that need the same entry at once (several ``generate`` on a cold cache) do not
    race: one builds it under the entry's write lock, the others wait for it and reuse it.
    ``build`` must write ``target`` itself (e.g. through :func:`atomic_dir`).
    """
    from maskattn_deploy.locks import output_lock

    target = Path(target)
    if is_done(target):
        return False
    with output_lock(target, wait_s=BUILD_WAIT_S, on_wait=say):
        if is_done(target):
            return False
        build()
    return True


_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def raise_if_disk_error(exc: BaseException, target: Path) -> None:
    """Turn a failed write (disk full, quota, read-only...) into one line naming ``target``.

    Libraries in other languages report the OS error in their text (tokenizers raises a plain
    ``Exception("No space left on device (os error 28)")``), so the errno is read from there
    too. Other exceptions are left alone.
    """
    from maskattn_deploy.errors import UserError

    code = getattr(exc, "errno", None)
    if code is None and (found := _OS_ERROR.search(str(exc))):
        code = int(found.group(1))
    if code in _DISK_ERRNOS:
        raise UserError(
            f"writing {target} failed: {os.strerror(code)}; free space (or choose another "
            "output path) and run again (nothing was kept)"
        ) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_weights_only(path: str | Path, error: type[Exception], what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line ``error`` that names the cause.

    A file that holds code or arbitrary objects is refused for safety and the message says
    what was found (e.g. ``posix.system``) instead of torch's advice to turn safe loading off.
    """
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes from the safe unpickler
            return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        detail = f"it references {found.group(1)}" if found else _unpickler_detail(str(exc))
        raise error(
            f"{path} is refused for safety: it holds code or Python objects, not only tensors "
            f"({detail}); {what} must contain tensors and plain containers only"
        ) from exc
    except Exception as exc:  # truncated zip, wrong file type...: all mean "unusable"
        raise error(f"{path} is corrupt or not {what}: {first_sentence(exc)}") from exc


def _unpickler_detail(message: str) -> str:
    """The line of torch's weights-only error that says what was refused."""
    lines = [line.strip() for line in message.splitlines()]
    for line in lines:
        if line.startswith("Unsupported"):
            return line
    for line in lines:
        rest = line.partition("WeightsUnpickler error:")[2].strip()
        if rest:
            return rest
    return "unsupported pickle content"


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's message (library errors run to paragraphs)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".")


def check_output_folder(path: str | Path, param: str = "out") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created/written
    (the error names the parameter ``param``; the CLI shows its flag)."""
    from maskattn_deploy.errors import UserError

    path = Path(path)
    where = (param,)
    if path.exists() and not path.is_dir():
        raise UserError(f"{param} {path} is a file; pass a folder", params=where)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{param} {path}: {existing} is a file, so the folder cannot be created", params=where
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{param} {path}: {existing} is not writable; choose a writable folder", params=where
        )
