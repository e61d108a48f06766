"""``maskattn-deploy train`` through click: a short run writes gates that load_gates loads."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from maskattn_deploy.cli.main import cli
from maskattn_deploy.errors import UserError


def test_train_cli_max_steps_writes_loadable_gates(tmp_path):
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline

    out = tmp_path / "run"
    args = ["train", "--recipe", "tiny-synthetic", "--out", str(out), "--max-steps", "3"]
    result = CliRunner().invoke(
        cli, [*args, "log.progress=false", "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    assert "steps/s" in result.output and str(out / "gates") in result.output
    assert "3/150 (stopped at step 3" in result.output

    unet = load_pipeline("tiny").unet
    gates = load_gates(out / "gates", unet)
    saved = load_file(str(out / "gates" / "gates.safetensors"))
    for name, value in gates.state_dict().items():
        assert torch.equal(value, saved[name])
    sidecar = json.loads((out / "gates" / "gates.json").read_text())
    assert sidecar["step"] == 3 and sidecar["metadata"]["complete"] is False
    assert (out / "checkpoints" / "step-0000003" / "train_state.pt").is_file()
    assert json.loads((tmp_path / "s.json").read_text())["step"] == 3


def test_train_cli_rejects_unknown_override(tmp_path):
    args = ["train", "--recipe", "tiny-synthetic", "--out", str(tmp_path / "r"), "nope=1"]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, UserError)
    assert "unknown training setting 'nope'" in str(result.exception)
    assert "train.steps" in str(result.exception)  # the valid keys are listed
    assert not (tmp_path / "r").exists()
