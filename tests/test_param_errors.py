"""Library errors name Python parameters; the CLI shows the same error with its flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maskattn_deploy.cli.main import main
from maskattn_deploy.errors import UserError


def cli_error(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["maskattn-deploy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0].removeprefix("error: ")


def test_export_option_conflict(tmp_path: Path, monkeypatch, capsys) -> None:
    from maskattn_deploy.export import export_pipeline

    with pytest.raises(UserError) as info:
        export_pipeline("tiny", None, tmp_path / "o", vae_fp16=True)
    wanted = "needs {} (the fp32 export keeps every component fp32)"
    assert str(info.value) == "vae_fp16 " + wanted.format("fp16")
    shown = cli_error(monkeypatch, capsys, "export", "--vae-fp16", "--out", str(tmp_path / "o"))
    assert shown == "--vae-fp16 " + wanted.format("--fp16")
    assert not (tmp_path / "o").exists()


def test_generate_size_and_gate_choice(monkeypatch, capsys) -> None:
    from maskattn_deploy.models.choice import ModelChoice
    from maskattn_deploy.runtime.pipeline import check_size

    with pytest.raises(UserError) as info:
        check_size("height", 100, None)
    assert str(info.value) == "height 100 must be a positive multiple of 8"
    assert cli_error(monkeypatch, capsys, "generate", "x", "--height", "100") == (
        "--height 100 must be a positive multiple of 8"
    )
    with pytest.raises(UserError) as info:
        ModelChoice("tiny", Path("g"), no_gates=True)
    assert str(info.value) == "pass either gates or no_gates, not both"
    shown = cli_error(monkeypatch, capsys, "generate", "x", "--gates", "g", "--no-gates")
    assert shown == "pass either --gates or --no-gates, not both"


def test_only_named_parameters_are_mapped() -> None:
    error = UserError("pass steps (or a recipe with steps_max)", params=("steps",))
    flags = {"steps": "--steps", "recipe": "--recipe"}.get
    assert error.message_for(flags) == "pass --steps (or a recipe with steps_max)"
    assert UserError("plain", params=("out",)).message_for(lambda _: None) == "plain"


def test_names_inside_paths_and_words_are_kept() -> None:
    error = UserError("model /data/model/sdxl has no unet; pass model", params=("model",))
    assert error.message_for({"model": "--model"}.get) == (
        "--model /data/model/sdxl has no unet; pass --model"
    )
