"""``maskattn-deploy serve``: a Triton Inference Server on this machine, until SIGTERM/Ctrl-C.

It writes a model repository for the export (or the built-in tiny model) into a work folder,
starts the bundled ``tritonserver`` on it (:mod:`maskattn_deploy.serve.server`), prints the
endpoints and waits. SIGTERM or SIGINT drains (:mod:`maskattn_deploy.serve.drain`: new requests
are answered "shutting down", accepted ones finish), stops the server and exits 0; a server
that dies by itself makes the command exit 1 with the end of its log.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.protocol import MODEL_NAME
from maskattn_deploy.serve.repository import ServeConfig, write_repository
from maskattn_deploy.serve.server import Endpoints, TritonServer

log = logging.getLogger(__name__)

Say = Callable[[str], None]
SERVER_EXIT_TIMEOUT_S = 10  # Triton's own shutdown, after serve has drained the work


@dataclass
class ServeOptions:
    """Everything ``maskattn-deploy serve`` accepts (see the CLI help)."""

    export_dir: Path | None = None
    model: str | None = None
    endpoints: Endpoints = field(default_factory=Endpoints)
    config: ServeConfig = field(default_factory=ServeConfig)
    drain_timeout_s: float = 60.0
    ready_timeout_s: float = 900.0
    log_server: bool = True  # echo the server's log lines to stderr


def resolve_export(options: ServeOptions, say: Say) -> Path | None:
    """The export folder to serve: the given one, or the tiny model's cached export."""
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.models.choice import ModelChoice
    from maskattn_deploy.runtime.api import TINY, ensure_tiny_export

    config = options.config
    if options.export_dir is not None:
        ExportFolder.open(options.export_dir)
        return Path(options.export_dir)
    if config.backend == "torch":
        return None
    model = options.model or TINY
    if model != TINY:
        raise UserError(
            f"the {config.backend} backend serves an export folder: run maskattn-deploy export "
            f"--model {model} --out DIR, then maskattn-deploy serve DIR"
        )
    if config.backend == "tensorrt":
        raise UserError(
            "the tensorrt backend serves engines: maskattn-deploy export --model tiny --out DIR, "
            "maskattn-deploy build DIR, then maskattn-deploy serve DIR --backend tensorrt"
        )
    choice = ModelChoice(TINY, Path(config.gates) if config.gates else None, config.no_gates)
    export_dir, _ = ensure_tiny_export(choice.gate_checkpoint(), say)
    return export_dir


def run_serve(options: ServeOptions, say: Say = print) -> int:
    """Serve until a signal arrives; the process exit code (0 after a clean drain)."""
    from maskattn_deploy.serve.server import BundledServer, python_lib_dir

    BundledServer.locate()  # fail before any work when the server is missing
    python_lib_dir()
    export_dir = resolve_export(options, say)
    if options.model and options.config.backend == "torch":
        options.config.model = options.model
    workdir = Path(tempfile.mkdtemp(prefix="maskattn-serve-"))
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        control = workdir / "control"
        control.mkdir()
        options.config.control_dir = str(control)
        repo = write_repository(workdir / "repo", export_dir, options.config, False, say)
        echo = (lambda line: say(f"[tritonserver] {line}")) if options.log_server else None
        server = TritonServer(repo, options.endpoints, workdir, SERVER_EXIT_TIMEOUT_S, echo)
        return _serve(server, options, stop, say, control)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def _serve(
    server: TritonServer, options: ServeOptions, stop: threading.Event, say: Say, control: Path
) -> int:
    from maskattn_deploy.serve.drain import drain

    server.start()
    try:
        ready = _wait_ready(server, options, stop)
    except BaseException:
        server.stop()
        raise
    if not ready:  # a signal while the models were loading: nothing was accepted yet
        server.stop()
        say("stopped before the server was ready")
        return 0
    e = server.endpoints
    say(
        f"serving {MODEL_NAME} on Triton: HTTP {e.http_url}, gRPC {e.grpc_url}, "
        f"metrics {e.metrics_url} (SIGTERM or Ctrl-C stops)"
    )
    while not stop.is_set():
        if server.process.poll() is not None:
            say(
                f"error: tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}"
            )
            return 1
        stop.wait(0.5)
    say("stopping: new requests are refused, accepted ones finish")
    drained = drain(
        control,
        options.config.instances,
        server.endpoints.metrics_url,
        MODEL_NAME,
        options.drain_timeout_s,
    )
    code = server.stop()
    if not drained:
        say(
            f"error: requests were still running after {options.drain_timeout_s:.0f} s; stopped anyway"
        )
        return 1
    say(f"stopped (tritonserver exit code {code})")
    return 0


def _wait_ready(server: TritonServer, options: ServeOptions, stop: threading.Event) -> bool:
    """Wait for readiness in short slices so a signal during loading is honoured (False)."""
    import time

    from maskattn_deploy.serve.server import ServerError

    deadline = time.monotonic() + options.ready_timeout_s
    while not stop.is_set():
        try:
            server.wait_ready(timeout_s=1.0)
            return True
        except ServerError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise
    return False
