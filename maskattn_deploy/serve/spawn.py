"""Run ``maskattn-deploy serve`` as a child process: for scripts, benchmarks and tests.

:func:`spawn_serve` starts the command with free ports (``--http-port 0`` ...), waits for its
"serving ..." line and returns the endpoints it printed; :meth:`Spawned.stop` sends SIGTERM
(the command drains and exits 0) and kills the whole process tree only if it hangs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.server import alive, process_tree

_SERVING = re.compile(r"HTTP (?P<http>\S+), gRPC (?P<grpc>\S+), metrics (?P<metrics>\S+) \(SIGTERM")


@dataclass
class Spawned:
    """A running ``maskattn-deploy serve`` child."""

    process: subprocess.Popen
    log: Path
    http: str
    grpc: str
    metrics: str

    def tree(self) -> list[int]:
        """The command, its tritonserver and the Python-backend stubs (pids)."""
        return process_tree(self.process.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 180) -> int:
        """SIGTERM and wait for the exit code; SIGKILL the tree if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.tree()):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(30)
            raise UserError(f"serve did not stop within {timeout_s:.0f} s; killed it") from None


def spawn_serve(args: Sequence[str], log: Path, timeout_s: float = 900) -> Spawned:
    """Start ``maskattn-deploy serve ARGS`` on free ports; return once it is serving."""
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
    with Path(log).open("w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = Path(log).read_text(errors="replace")
        match = _SERVING.search(text)
        if match:
            return Spawned(process, Path(log), match["http"], match["grpc"], match["metrics"])
        if process.poll() is not None:
            raise UserError(f"serve exited with code {process.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    raise UserError(f"serve was not ready after {timeout_s:.0f} s; see {log}")


def survivors(pids: Sequence[int], timeout_s: float = 30) -> list[int]:
    """The pids still alive after ``timeout_s`` (empty: nothing outlived its parent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]
