"""Graceful shutdown: stop taking new work, finish what was accepted, then stop the server.

Triton's own SIGTERM handling first waits for open HTTP connections to close, and clients that
keep connections alive (every load balancer, every pooled client) hold it there until the exit
timeout runs out; requests still executing then are cut off. ``serve`` therefore drains before
it signals the server, through a small file protocol in a control folder:

1. ``serve`` creates ``draining``;
2. every model instance answers each new request at once with UNAVAILABLE ("shutting down;
   retry on another replica"), lets the batch it is running finish, then writes
   ``idle-<pid>``;
3. when every instance is idle and Triton's queue is empty, every accepted request has had its
   answer, and ``serve`` stops the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DRAINING = "draining"
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
_PENDING = re.compile(
    r'^nv_inference_pending_request_count\{model="(?P<model>[^"]+)".*\}\s+(?P<n>\S+)$'
)


class DrainWatch:
    """Inside a model instance: knows when to refuse work and reports when it is idle."""

    def __init__(self, folder: Path, poll_s: float = 0.1) -> None:
        self.folder = Path(folder)
        self.poll_s = poll_s
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="maskattn-drain", daemon=True)
        self._thread.start()

    def draining(self) -> bool:
        return (self.folder / DRAINING).exists()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def _watch(self) -> None:
        marker = self.folder / f"idle-{os.getpid()}"
        while True:
            time.sleep(self.poll_s)
            if not self.draining():
                continue
            with self._lock:
                idle = self._busy == 0
            if idle:
                marker.touch()
                return


def pending_requests(metrics_url: str, model: str) -> int | None:
    """Requests waiting in Triton's queue for ``model`` (None when metrics are unreachable)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    for line in text.splitlines():
        match = _PENDING.match(line)
        if match and match["model"] == model:
            return int(float(match["n"]))
    return 0


def drain(folder: Path, instances: int, metrics_url: str, model: str, timeout_s: float) -> bool:
    """Start draining and wait until every instance is idle and the queue is empty."""
    folder = Path(folder)
    (folder / DRAINING).touch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        idle = len(list(folder.glob("idle-*")))
        if idle >= instances and pending_requests(metrics_url, model) == 0:
            return True
        time.sleep(0.1)
    return False
