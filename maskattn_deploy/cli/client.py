"""``maskattn-deploy client``: one prompt to a served pipeline, PNGs like ``generate`` writes.

Each PNG carries the settings the server used (the same metadata keys as ``generate``);
``--return-masks`` also writes one mask grid per gated stage.
"""

from __future__ import annotations

from pathlib import Path

import click

from maskattn_deploy.cli.options import json_option


@click.command("client")
@click.argument("prompt")
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="Server host:port.")
@click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default="http",
    show_default=True,
    help="grpc: point --url at the gRPC port (8001).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("out/served"), show_default=True
)
@click.option("--negative-prompt", default=None)
@click.option("--seed", type=int, default=None, help="Default: the server's (0).")
@click.option("--steps", type=int, default=None, help="Default: the server's.")
@click.option("--guidance", type=float, default=None, help="Default: the server's (5.0).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--scheduler", default=None)
@click.option("--return-masks", is_flag=True, help="Also write the gate mask grid per stage.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds.")
@json_option
def command(
    prompt: str,
    url: str,
    protocol: str,
    out: Path,
    negative_prompt: str | None,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
    scheduler: str | None,
    return_masks: bool,
    timeout: float,
    json_path: Path | None,
) -> None:
    """Ask the server at --url for an image of PROMPT and write it into --out."""
    from maskattn_deploy.serve.client import Request, connect, generate
    from maskattn_deploy.serve.writing import write_served

    request = Request(
        prompt, negative_prompt, seed, steps, guidance, height, width, scheduler, return_masks
    )
    client = connect(url, protocol, timeout)
    try:
        served = generate(client, request)
    finally:
        client.close()
    for warning in served.warnings:
        click.echo(f"warning: {warning}", err=True)
    written = write_served(served, out, json_path)
    for path in written:
        click.echo(f"wrote {path}")
    timings = served.timings
    click.echo(
        f"{served.latency_s * 1e3:.0f} ms round trip; server: {timings.get('total_s', 0) * 1e3:.0f} ms "
        f"in a batch of {timings.get('batch_size', 1)}"
    )
