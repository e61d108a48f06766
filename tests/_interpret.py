"""Helper for the Triton-interpreter tests: run a kernel script once in a child process.

``triton.jit`` picks between compiling and interpreting when a kernel module is imported, and
the AOT tests in this process need the compiled form, so each interpreter test file runs its
kernels in ONE child process with ``TRITON_INTERPRET=1`` and checks the saved results here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch


def run_interpreted(
    child: str, cases: dict, tiling_cases: Iterable[str], tmp: Path, timeout: int
) -> dict:
    """Results of ``python -c CHILD cases.pt out.pt TILING,CASES`` under the interpreter.

    The child runs in ``tmp`` (outside the checkout, so the installed package is imported, as
    users get it); a failing child fails the test with the end of its stderr.
    """
    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [str(tmp / "cases.pt"), str(tmp / "out.pt"), ",".join(tiling_cases)]
    proc = subprocess.run(
        [sys.executable, "-c", child, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")
