"""``maskattn-deploy loadtest``: throughput, latency percentiles and batch sizes of a server."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give numbers like 8 or 1,8") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("concurrency levels must be at least 1")
    return levels


@click.command("loadtest")
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="Server host:port.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option(
    "--metrics-url",
    default=None,
    help="Prometheus endpoint for the batch counters (default: http://HOST:8002/metrics).",
)
@click.option(
    "--concurrency",
    default="1,8",
    show_default=True,
    help="Clients sending back to back; several levels run in turn, e.g. 1,8.",
)
@click.option(
    "--requests", type=click.IntRange(1), default=32, show_default=True, help="Per level."
)
@click.option("--prompt", default="a red square left of a green circle", show_default=True)
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Request k uses seed + k.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write JSON here.")
def command(
    url: str,
    protocol: str,
    metrics_url: str | None,
    concurrency: str,
    requests: int,
    prompt: str,
    steps: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
    seed: int,
    as_json: bool,
    out: Path | None,
) -> None:
    """Load-test a served pipeline: each level runs --requests requests with that many clients."""
    from maskattn_deploy.runtime.outputs import write_json
    from maskattn_deploy.serve.loadtest import LoadOptions, run_loadtest

    options = LoadOptions(
        url=url,
        protocol=protocol,
        metrics_url=metrics_url,
        concurrency=_levels(concurrency),
        requests=requests,
        prompt=prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=seed,
    )
    report = run_loadtest(options)
    click.echo(json.dumps(report.as_json(), indent=2) if as_json else report.table())
    if out is not None:
        write_json(out, report.as_json())
