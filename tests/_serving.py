"""Helpers for tests that start real Triton servers: the serve command as a subprocess.

Ports are chosen free at run time by the command itself (``--http-port 0`` ...) and read back
from its "serving ..." line; every test stops the servers it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from maskattn_deploy.serve.server import alive, process_tree

_SERVING = re.compile(r"HTTP (?P<http>\S+), gRPC (?P<grpc>\S+), metrics (?P<metrics>\S+) \(SIGTERM")


def require_server() -> None:
    """Skip when the serve extra is missing (it is part of the dev install CI uses)."""
    from maskattn_deploy.serve.server import BundledServer, ServerError, python_lib_dir

    try:
        BundledServer.locate()
        python_lib_dir()
    except ServerError as exc:
        pytest.skip(f"no Triton server here: {exc}")


@dataclass
class Served:
    """A running ``maskattn-deploy serve`` process."""

    process: subprocess.Popen
    log: Path
    http: str
    grpc: str
    metrics: str

    def tree(self) -> list[int]:
        return process_tree(self.process.pid)

    def stop(self, timeout_s: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.tree()):
                os.kill(pid, signal.SIGKILL)
            self.process.wait(30)
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_serve(log: Path, *args: str, timeout_s: float = 900) -> Served:
    """Run ``maskattn-deploy serve`` with free ports and wait until it says it is serving."""
    command = [
        sys.executable,
        "-m",
        "maskattn_deploy.cli.main",
        "serve",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        *args,
    ]
    handle = log.open("w")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = _SERVING.search(log.read_text(errors="replace"))
        if match:
            return Served(process, log, match["http"], match["grpc"], match["metrics"])
        if process.poll() is not None:
            raise AssertionError(
                f"serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"serve was not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def no_survivors(pids: list[int], timeout_s: float = 30) -> list[int]:
    """The pids still alive after ``timeout_s`` (an empty list means no orphan)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]
