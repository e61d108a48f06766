"""Start and stop a real Triton Inference Server on a model repository.

The server binary is the ``tritonserver`` that PyPI's ``nvidia-pytriton`` wheel bundles (the
``serve`` extra), with its Python backend. PyTriton's Python API is not used: the repository is
an ordinary one, the same that NVIDIA's container loads (docs/serving.md).

Two facts about the bundled server are handled here so users never meet them:

- its Python-backend stub (one per Python minor version) is linked against a system
  ``libpython3.X.so.1.0``; when the running interpreter is another build of that minor version
  (pyenv, conda, uv) the stub would mix that library with this interpreter's standard library
  and fail (``'_thread.RLock' object has no attribute '_recursion_count'``). The server gets
  ``LD_LIBRARY_PATH`` starting with the running interpreter's own lib folder (``sysconfig``);
- the embedded interpreter finds its environment by searching ``python3`` on ``PATH``, so
  ``PATH`` starts with this environment's ``bin`` folder and the stub imports the same packages
  as the command that started it. The stub imports from its working directory first (a
  source checkout there would shadow the installed package), so the server runs in its work
  folder and ``PYTHONPATH`` starts with the folder this process imported ``maskattn_deploy``
  from: the stub runs exactly the code of the command that started it.

Each server gets its own shared-memory prefix, so several servers (or test runs) on one
machine never share the Python backend's regions. The server process dies with its parent
(``PR_SET_PDEATHSIG``); stopping sends SIGTERM, which makes Triton stop taking requests, finish
the ones in flight (up to ``exit_timeout_s``), unload the models and exit 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from maskattn_deploy.errors import UserError

log = logging.getLogger(__name__)

STUB = "triton_python_backend_stub"
_ERROR_LINE = re.compile(r"^E\d{4} ")  # Triton's error log lines (E<mmdd> <time> ...)


class ServerError(UserError):
    """The Triton server could not start, became unready, or is not installed."""


@dataclass(frozen=True)
class BundledServer:
    """Where the ``nvidia-pytriton`` wheel keeps the server, its libraries and the stubs."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # the stub for the running Python version
    libs: Path  # the wheel's bundled shared libraries

    @classmethod
    def locate(cls) -> BundledServer:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServerError(
                "the Triton server is not installed: pip install 'maskattn-deploy[serve]' "
                "(it bundles tritonserver with its Python backend)"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        server = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / STUB,
            libs=root.parent.parent / "nvidia_pytriton.libs",
        )
        if not server.stub.is_file():
            raise ServerError(
                f"the bundled Triton server has no Python-backend stub for Python {version}; "
                "use Python 3.8-3.13"
            )
        if not server.binary.is_file():
            raise ServerError(
                f"{server.binary} is missing; reinstall with pip install 'maskattn-deploy[serve]'"
            )
        return server


def package_root() -> Path:
    """The folder this process imported ``maskattn_deploy`` from (site-packages or a checkout)."""
    import maskattn_deploy

    return Path(maskattn_deploy.__file__).resolve().parents[1]


def python_lib_dir() -> Path:
    """The running interpreter's folder of ``libpython3.X.so`` (the stub must link this one)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / name).exists():
        raise ServerError(
            f"this Python ({sys.executable}) has no shared libpython, which Triton's Python "
            "backend loads; use a Python built with --enable-shared (the system python3, a "
            "python.org or uv build; pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )
    return libdir


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Endpoints:
    """Where the server listens; port 0 means "pick a free one"."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def resolved(self) -> Endpoints:
        pick = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        ports = [p or free_port(pick) for p in (self.http_port, self.grpc_port, self.metrics_port)]
        return Endpoints(self.host, *ports)

    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host()}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host()}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host()}:{self.metrics_port}/metrics"


@dataclass
class TritonServer:
    """One ``tritonserver`` process on ``repository`` (use as a context manager or start/stop)."""

    repository: Path
    endpoints: Endpoints = field(default_factory=Endpoints)
    workdir: Path | None = None
    exit_timeout_s: int = 30
    echo: Callable[[str], None] | None = None  # called with every server log line
    process: subprocess.Popen | None = None

    def command(self, server: BundledServer, backends: Path) -> list[str]:
        e = self.endpoints
        prefix = f"maskattn{os.getpid()}x{secrets.token_hex(3)}"
        return [
            str(server.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={e.host}",
            f"--http-port={e.http_port}",
            f"--grpc-address={e.host}",
            f"--grpc-port={e.grpc_port}",
            f"--metrics-address={e.host}",
            f"--metrics-port={e.metrics_port}",
            "--allow-metrics=true",
            f"--allow-gpu-metrics={str(_has_gpu()).lower()}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name={prefix}",
        ]

    def environment(self, server: BundledServer) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(python_lib_dir()), str(server.libs)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(
            [str(package_root())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> TritonServer:
        server = BundledServer.locate()
        self.endpoints = self.endpoints.resolved()
        if self.workdir is None:
            raise ServerError("TritonServer needs a work folder")
        workdir = Path(self.workdir).resolve()
        backends = _prepare_backends(server, workdir)
        self.log_path = workdir / "tritonserver.log"
        log_file = self.log_path.open("w", buffering=1)
        self.process = subprocess.Popen(
            self.command(server, backends),
            env=self.environment(server),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,  # the stub imports from its working directory first (see above)
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(
            target=_pump, args=(self.process.stdout, log_file, self.echo), daemon=True
        )
        self._reader.start()
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the server and every model are ready, or raise with the log's tail."""
        url = f"http://{self.endpoints.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(
                    f"tritonserver exited with code {code} while loading:\n{self.log_tail()}"
                )
            if _http_ok(url):
                return
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        """The server's error lines (model load failures name the cause) and its last lines."""
        path = getattr(self, "log_path", None)
        if path is None or not Path(path).is_file():
            return "(no server log)"
        text = Path(path).read_text(errors="replace").splitlines()
        errors = [
            line for line in text if _ERROR_LINE.match(line) and "CudaDriverHelper" not in line
        ]
        return "\n".join(errors[-lines:] + ["..."] + text[-lines:])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float | None = None) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> int:
        """SIGTERM, wait for Triton's graceful exit, SIGKILL if it hangs; the exit code."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(self.exit_timeout_s + 30)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in time; killing it")
            self.process.kill()
            return self.wait(30)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _prepare_backends(server: BundledServer, workdir: Path) -> Path:
    """A backend folder holding the Python backend and the stub for this Python version."""
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in server.python_backend.iterdir():
        target = python / item.name
        if not target.exists():
            target.symlink_to(item)
    stub = python / STUB
    if not stub.exists():
        shutil.copy2(server.stub, stub)
    return python.parent


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent process dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _pump(stream: IO[str], sink: IO[str], echo: Callable[[str], None] | None) -> None:
    with contextlib.suppress(ValueError, OSError), sink:
        for line in stream:
            sink.write(line)
            if echo is not None:
                echo(line.rstrip("\n"))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc), for orphan checks."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
