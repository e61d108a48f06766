"""``maskattn-deploy``: the command-line entry point.

The group is lazy: ``--help`` lists every command from the table below without importing
torch, onnxruntime or tensorrt; a command's module is imported only when it runs. Each command
module exposes a click command named ``command``; it builds a typed config and calls one
library function.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import click

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "maskattn_deploy.cli.demo",
        "Run the whole job on the built-in tiny model and write a report.",
    ),
    "train": (
        "maskattn_deploy.cli.train",
        "Train MaskAttn gate heads with the SDXL backbone frozen.",
    ),
    "export": (
        "maskattn_deploy.cli.export",
        "Export the gated pipeline to ONNX (optionally fp16, then engines).",
    ),
    "build": ("maskattn_deploy.cli.build", "Build TensorRT engines from an export folder."),
    "generate": (
        "maskattn_deploy.cli.generate",
        "Generate images via TensorRT, ONNX Runtime or PyTorch.",
    ),
    "serve": (
        "maskattn_deploy.cli.serve",
        "Serve the pipeline on a Triton Inference Server (dynamic batching, metrics).",
    ),
    "export-triton": (
        "maskattn_deploy.cli.export_triton",
        "Write a Triton model repository (Python-backend pipeline + TensorRT plans).",
    ),
    "client": ("maskattn_deploy.cli.client", "Send one prompt to a served pipeline, save PNGs."),
    "loadtest": (
        "maskattn_deploy.cli.loadtest",
        "Load-test a served pipeline: throughput, latency percentiles, batch sizes.",
    ),
    "parity": ("maskattn_deploy.cli.parity", "Compare backends against the PyTorch reference."),
    "bench": (
        "maskattn_deploy.cli.bench",
        "Benchmark UNet steps and the pipeline, masked vs unmasked.",
    ),
    "gates": ("maskattn_deploy.cli.gates", "Inspect and import gate checkpoints."),
    "selftest": (
        "maskattn_deploy.cli.selftest",
        "GPU validation run (kernel, full-size UNet); --dry-run on CPU.",
    ),
    "env": (
        "maskattn_deploy.cli.env",
        "Show versions, devices and which backends are usable here.",
    ),
}


def flag_lookup(command: click.Command | None) -> Callable[[str], str | None]:
    """Python parameter name -> how ``command`` spells it (``steps`` -> ``--steps``,
    ``export_dir`` -> ``EXPORT_DIR``); None for a parameter the command does not take."""
    table: dict[str, str] = {}
    for param in command.params if command is not None else ():
        if isinstance(param, click.Option):
            table[str(param.name)] = max(param.opts, key=len)
        elif isinstance(param, click.Argument):
            table[str(param.name)] = param.human_readable_name
    return table.get


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the sub-command; a library error's parameter names become its flags."""
        from maskattn_deploy.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as exc:
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            exc.args = (exc.message_for(flag_lookup(command)),)
            raise

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[cmd_name][0])
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskattn-deploy")
@click.option(
    "-v", "--verbose", count=True, help="More logging, library warnings too (-vv for debug)."
)
def cli(verbose: int) -> None:
    """MaskAttn-SDXL deployment toolkit: train gates, export ONNX, build TensorRT engines,
    generate images and prove parity between backends."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Library notes (optional backends, deprecations) would bury the command's own
        # progress; -v shows them again. Read when transformers/diffusers are first imported.
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
        for category in (FutureWarning, DeprecationWarning):  # for library developers
            warnings.simplefilter("ignore", category)


def main() -> None:
    """Console-script entry point; user errors exit 2 with one line, not a traceback."""
    from maskattn_deploy.errors import UserError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(1) from None
    except click.ClickException as exc:  # bad flags or values: one line, like every error
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
            exc.show()  # a bare group (`maskattn-deploy`, `maskattn-deploy gates`): its help
        else:
            click.echo(f"error: {_click_message(exc)}", err=True)
        raise SystemExit(exc.exit_code) from None
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None


def _click_message(exc: click.ClickException) -> str:
    """Click's message on one line, with the command's --help for usage errors."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


if __name__ == "__main__":
    main()
