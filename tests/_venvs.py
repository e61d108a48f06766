"""Side virtual environments for tests that need packages which cannot join the main install.

Some checks must run against software that conflicts with the project's own dependencies: an
older Triton than the one installed, Optimum's pinned transformers, and so on. A test asks for
such an environment with :func:`side_venv`; it is built once from the package registry, cached
under ``<repo>/.cache/venvs/<name>-<key>`` (``key`` hashes the requirements and the Python
version, so changing a pin builds a new one) and reused by later runs and by parallel test
processes (a file lock serialises the build).

A build is complete only when its marker file exists (written last), so an interrupted build is
removed and redone on the next call. When pip fails because the registry cannot be reached the
test is skipped with that reason; any other failure fails the test with pip's output.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "venvs"
_MARKER = ".complete"
# Substrings of pip's output that mean the registry was unreachable (not a bad requirement).
_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ProxyError",
)


def venv_key(requirements: Sequence[str], pip_args: Sequence[str] = ()) -> str:
    """Cache key of an environment: requirements, pip arguments and the running Python."""
    text = "\n".join([sys.version, *requirements, "--", *pip_args])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def side_venv(
    name: str,
    requirements: Sequence[str],
    pip_args: Sequence[str] = (),
    timeout_s: float = 1800,
) -> Path:
    """Path of the Python interpreter of a cached venv holding ``requirements``.

    ``requirements`` are pip requirement strings, installed in one ``pip install`` call
    (``torch==2.13.0`` takes this machine's CPU build, as in the main install).
    """
    folder = CACHE / f"{name}-{venv_key(requirements, pip_args)}"
    python = folder / "bin" / "python"
    if (folder / _MARKER).is_file():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / _MARKER).is_file():  # built by another process while we waited
            return python
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier build
        _build(folder, requirements, pip_args, timeout_s)
        (folder / _MARKER).write_text("\n".join(requirements) + "\n")
    return python


def _build(
    folder: Path, requirements: Sequence[str], pip_args: Sequence[str], timeout_s: float
) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    cmd = [
        str(folder / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [*cmd, *pip_args, *requirements],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    shutil.rmtree(folder, ignore_errors=True)
    if any(sign in output for sign in _OFFLINE_SIGNS):
        pytest.skip(f"package registry unreachable while building the {folder.name} venv")
    pytest.fail(f"pip could not build the {folder.name} venv:\n{output[-4000:]}")
