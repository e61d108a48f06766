"""``maskattn-deploy serve``: the gated pipeline behind a real Triton Inference Server.

A thin layer: flags -> :class:`~maskattn_deploy.serve.run.ServeOptions` ->
:func:`~maskattn_deploy.serve.run.run_serve`. The batching and instance flags are shared with
``export-triton`` (:func:`serving_options`), which writes the same model repository.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from maskattn_deploy.cli.options import ort_provider_option


def serving_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Flags that shape the served model (its config.pbtxt), shared by serve and export-triton."""
    options = [
        click.option(
            "--backend",
            type=click.Choice(["onnxruntime", "torch", "tensorrt"]),
            default=None,
            help="Runtime inside the served pipeline (default: tensorrt when the export has "
            "engines and the command is export-triton, else onnxruntime).",
        ),
        click.option(
            "--max-batch",
            type=click.IntRange(1, 256),
            default=4,
            show_default=True,
            help="Requests per dynamic batch (UNet calls are split to fit the export's batch).",
        ),
        click.option(
            "--max-queue-delay-ms",
            type=click.FloatRange(0, 10_000),
            default=10.0,
            show_default=True,
            help="How long the batcher waits for more requests to fill a batch.",
        ),
        click.option(
            "--max-queue",
            type=click.IntRange(1, 100_000),
            default=64,
            show_default=True,
            help="Queued requests beyond this are refused at once (HTTP 503, 'overloaded').",
        ),
        click.option(
            "--instances",
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="Model instances (each loads the pipeline; run concurrently).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(0, 256),
            default=0,
            show_default=True,
            help="CPU threads per instance (0: cores / instances).",
        ),
        click.option(
            "--max-steps",
            type=int,
            default=150,
            show_default=True,
            help="Largest STEPS a request may ask for (at most the library's limit, 1000).",
        ),
        ort_provider_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def serve_config(**flags: Any) -> Any:
    """A :class:`~maskattn_deploy.serve.repository.ServeConfig` from the shared flags."""
    from maskattn_deploy.checks import check_int
    from maskattn_deploy.runtime.limits import MAX_STEPS
    from maskattn_deploy.serve.repository import ServeConfig

    check_int("max_steps", flags["max_steps"], 1, MAX_STEPS)

    return ServeConfig(
        backend=flags["backend"] or "onnxruntime",
        max_batch=flags["max_batch"],
        max_queue_delay_ms=flags["max_queue_delay_ms"],
        max_queue=flags["max_queue"],
        instances=flags["instances"],
        threads=flags["threads"],
        max_steps=flags["max_steps"],
        ort_provider=flags["ort_provider"],
    )


@click.command("serve")
@click.argument("export_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--model",
    default=None,
    help="'tiny' (default without EXPORT_DIR; exported once into the cache), or for --backend "
    "torch a diffusers folder / hub id.",
)
@click.option("--gates", type=click.Path(path_type=Path), help="Gate checkpoint (torch backend).")
@click.option("--no-gates", is_flag=True, help="Serve the plain model (torch backend / tiny).")
@click.option("--device", default=None, help="torch backend device (cpu / cuda).")
@serving_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=8002,
    show_default=True,
    help="Prometheus metrics (port 0 anywhere: pick a free port and print it).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="On SIGTERM, how long accepted requests may take to finish.",
)
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up generation at load.")
@click.option("--quiet", is_flag=True, help="Do not echo the server's log.")
def command(
    export_dir: Path | None,
    model: str | None,
    gates: Path | None,
    no_gates: bool,
    device: str | None,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    drain_timeout: float,
    no_warmup: bool,
    quiet: bool,
    **flags: Any,
) -> None:
    """Serve EXPORT_DIR (default: the built-in tiny model) on a Triton Inference Server.

    Requests that arrive together are batched (one UNet call per step for all of them). Health
    (/v2/health/ready), statistics and Prometheus metrics are Triton's own. SIGTERM or Ctrl-C
    finishes accepted requests, refuses new ones and exits 0. Needs the serve extra:
    pip install 'maskattn-deploy[serve]'.
    """
    from maskattn_deploy.serve.run import ServeOptions, run_serve
    from maskattn_deploy.serve.server import Endpoints

    config = serve_config(**flags)
    config.gates = str(gates) if gates else None
    config.no_gates = no_gates
    config.device = device
    config.warmup = not no_warmup
    options = ServeOptions(
        export_dir=export_dir,
        model=model,
        endpoints=Endpoints(host, http_port, grpc_port, metrics_port),
        config=config,
        drain_timeout_s=drain_timeout,
        log_server=not quiet,
    )
    code = run_serve(options, say=lambda line: click.echo(line, err=True))
    raise SystemExit(code)
