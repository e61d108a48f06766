"""User errors of ``maskattn-deploy export``: one clear line, exit code 2, no partial folder.

Each case runs the real console entry point (``main``) and fails before any graph is traced.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from maskattn_deploy.cli.main import main


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["maskattn-deploy", "export", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code), capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> None:
    """One ``error:`` line, last, no traceback (library import chatter may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert not any(line.startswith("Traceback") for line in lines), err
    for needle in needles:
        assert needle in errors[0], errors[0]


def leftovers(parent: Path, name: str) -> list[str]:
    """The output folder or any temp folder made for it."""
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_existing_output_is_refused_without_overwrite(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--out", str(out)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "onnx") == ["onnx"]


def test_unwritable_output_path(tmp_path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(["--out", str(blocker / "onnx")], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "cannot write", "writable --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_unknown_model_id_offline(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "onnx"
    args = ["--model", "nobody-here/no-such-sdxl", "--no-gates", "--out", str(out)]
    code, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "nobody-here/no-such-sdxl", "HF_HUB_OFFLINE")
    assert leftovers(tmp_path, "onnx") == []


def test_gates_for_another_model(tmp_path, monkeypatch, capsys) -> None:
    from maskattn_deploy.gating import GateConfig, GateSet, select_layers
    from maskattn_deploy.gating.checkpoint import checkpoint_from_gates, write_checkpoint
    from maskattn_deploy.models.tiny import build_tiny_sd15_unet

    other = build_tiny_sd15_unet()
    torch.manual_seed(0)
    gates = GateSet(GateConfig(), select_layers(other, GateConfig()))
    ckpt_dir = write_checkpoint(checkpoint_from_gates(gates, other), tmp_path / "sd15-gates")
    out = tmp_path / "onnx"
    code, err = run_cli(["--gates", str(ckpt_dir), "--out", str(out)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "trained for UNet", "use gates trained for this model")
    assert leftovers(tmp_path, "onnx") == []


def test_other_models_need_gates_or_no_gates(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "onnx"
    code, err = run_cli(["--model", "owner/sdxl", "--out", str(out)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "--gates", "--no-gates")
    assert leftovers(tmp_path, "onnx") == []


def test_vae_fp16_needs_fp16(tmp_path, monkeypatch, capsys) -> None:
    code, err = run_cli(["--vae-fp16", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "--vae-fp16 needs --fp16")


def test_bad_recipe_range_is_refused(tmp_path, monkeypatch, capsys) -> None:
    recipe = tmp_path / "odd.toml"
    recipe.write_text('name = "odd"\nopset = 18\n[shapes]\nbatch = [1, 1, 2]\n'
                      "height = [100, 128, 256]\nwidth = [128, 128, 256]\n")  # fmt: skip
    code, err = run_cli(
        ["--recipe", str(recipe), "--out", str(tmp_path / "o")], monkeypatch, capsys
    )
    assert code == 2
    assert_one_line_error(err, "multiples of 64")


def test_missing_gate_checkpoint_fails_before_loading(tmp_path, monkeypatch, capsys) -> None:
    args = ["--gates", str(tmp_path / "nope"), "--out", str(tmp_path / "onnx")]
    code, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "does not exist")
    assert leftovers(tmp_path, "onnx") == []
