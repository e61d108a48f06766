"""Who may write an output, and cleaning up after writers that were killed.

Two runs writing one destination (two ``export --out X``, two ``train --out X``, several
``generate`` exporting the tiny model into the same cache folder) must not silently replace
each other's files. :func:`output_lock` takes an exclusive ``flock`` on ``.<name>.lock`` beside
the destination for as long as it is written; a second writer is refused with the owner's pid,
or waits when the caller asks it to. The kernel drops the lock when its process dies, so a
killed writer never blocks the next run. The lock file is removed on release (after checking,
on acquire, that the file locked is still the one on disk).

Temporary files and folders of an atomic write are named
``.<name>.<pid>-<random>.tmp`` / ``.partial`` (:func:`temp_prefix`), so a later run can tell
ours from anything else and remove them when their process is gone
(:func:`remove_stale_temps`). A process that is alive, or a name we did not make, is never
touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from maskattn_deploy.errors import OutputBusyError, UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, writes stay atomic
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".partial")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]+\.(?:tmp|partial)$")
_HELD: dict[tuple[int, str], int] = {}  # (thread, lock path) -> depth, for re-entry
_POLL_S = 0.2


def temp_prefix(target: Path) -> str:
    """Prefix of our temp names for ``target``: hidden, with the target's name and our pid."""
    return f".{target.name}.{os.getpid()}-"


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead child nobody waited for)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[0] != "Z"


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove our temp files/folders in ``folder`` whose writer process is gone.

    ``name`` limits it to the temps of one target. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        log.info("removed %s, left by process %d that no longer runs", entry, pid)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def output_lock(
    target: str | Path,
    wait_s: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive write lock of ``target`` (re-entrant within one thread).

    ``wait_s`` = 0 refuses at once when another process holds it (:class:`OutputBusyError`
    with its pid); otherwise it waits up to ``wait_s`` seconds, telling ``on_wait`` once.
    """
    target = Path(target)
    path = lock_path(target)
    key = (threading.get_ident(), str(path.absolute()))
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd = _acquire(path, target, wait_s, on_wait)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a waiter then finds it gone and re-creates it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(path: Path, target: Path, wait_s: float, on_wait: Callable[[str], None] | None) -> int:
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            message = f"{target} is being written by another process ({owner})"
            if time.monotonic() >= deadline:
                hint = " and still was after waiting" if wait_s else ""
                raise OutputBusyError(
                    f"{message}{hint}; wait for it to finish or choose another output path"
                ) from None
            if on_wait is not None and not told:
                on_wait(f"{message}; waiting for it to finish")
                told = True
            time.sleep(_POLL_S)
            continue
        if _still_linked(fd, path):
            _write_owner(fd)
            return fd
        os.close(fd)  # the previous holder removed the file after we opened it: retry


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise UserError(
            f"cannot write to {path.parent}: {exc.strerror or exc}; choose a writable output path"
        ) from exc


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_owner(fd: int) -> None:
    with contextlib.suppress(OSError):  # the pid is only for messages; a full disk is fine
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
