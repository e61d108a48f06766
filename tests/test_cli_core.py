"""CLI basics: --help lists every command, env reports backends, gates info/import, cheap import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from maskattn_deploy.cli.main import COMMANDS, cli


def test_help_lists_every_command_with_one_line() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name, (_, help_line) in COMMANDS.items():
        assert f"{name}  " in result.output and help_line[:30] in result.output


def test_every_command_module_has_help() -> None:
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_env_reports_versions_and_backends() -> None:
    result = CliRunner().invoke(cli, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["versions"]["torch"] == torch.__version__
    assert info["cuda"]["cuda_available"] == torch.cuda.is_available()
    assert set(info["backends"]) >= {"torch", "onnxruntime", "tensorrt"}
    if not info["versions"]["tensorrt"]:
        assert "pip install 'maskattn-deploy[trt]'" in info["backends"]["tensorrt"]


def test_import_does_not_pull_heavy_stacks() -> None:
    code = (
        "import sys, maskattn_deploy, maskattn_deploy.cli.main;"
        "print(sorted(m for m in ('tensorrt','onnxruntime','triton','torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gates_import_and_info(tmp_path: Path) -> None:
    from test_checkpoint import write_reference_checkpoint

    from maskattn_deploy.models.tiny import build_tiny_unet

    write_reference_checkpoint(tmp_path / "gate_final.pt", build_tiny_unet())
    runner = CliRunner()
    res = runner.invoke(
        cli, ["gates", "import", str(tmp_path / "gate_final.pt"), "--out", str(tmp_path / "ours")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["gates", "info", str(tmp_path / "ours"), "--json"])
    info = json.loads(res.output)
    assert (
        info["source_format"] == "maskattn-sdxl-gates-v1"
        and info["layers"] == 10
        and info["heads"] == 1
    )
    latent_mlp = 2 * 128 + (128 * 128 + 128) * 2  # LayerNorm(128) + two Linear(128, 128)
    text_mlp = (
        2 * 64 + (64 * 128 + 128) + (128 * 128 + 128)
    )  # LayerNorm(64) + Linear(64,128) + Linear(128,128)
    assert info["parameters"] == latent_mlp + text_mlp + 1  # + the scalar bias


def test_user_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskattn_deploy.cli.main",
            "gates",
            "info",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
