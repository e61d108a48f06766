"""Malformed gate checkpoints through every command that reads one.

A field of ``gates.json`` or of a reference ``gate_final.pt`` that is missing, null, of the
wrong type or out of range must end every command with exit code 2 and one ``error:`` line that
names the file and the field: no traceback, nothing written (output, cache or temp files).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _hostile import refused

from maskattn_deploy.models.tiny import build_tiny_unet, cache_root, tiny_default_gates_dir

PROMPT = "a red cube"


def _ours(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    """A copy of the seeded tiny gates whose gates.json went through ``edit``."""

    def make(root: Path) -> Path:
        folder = root / "gates"
        shutil.copytree(tiny_default_gates_dir(), folder)
        sidecar = json.loads((folder / "gates.json").read_text())
        edit(sidecar)
        (folder / "gates.json").write_text(json.dumps(sidecar))
        return folder

    return make


def _reference(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    """A reference-format gate_final.pt for the tiny UNet that went through ``edit``."""

    def make(root: Path) -> Path:
        from test_checkpoint import write_reference_checkpoint

        path = root / "gate_final.pt"
        write_reference_checkpoint(path, build_tiny_unet())
        raw = torch.load(path, weights_only=True)
        edit(raw)
        torch.save(raw, path)
        return path

    return make


# name -> (checkpoint maker, file the message names, field the message names)
BROKEN = {
    "gates.json without config": (_ours(lambda d: d.pop("config")), "gates.json", "'config'"),
    "config.hidden_dim not a number": (
        _ours(lambda d: d["config"].update(hidden_dim="abc")),
        "gates.json",
        "'config.hidden_dim'",
    ),
    "config.stage unknown": (
        _ours(lambda d: d["config"].update(stage="diagonal")),
        "gates.json",
        "'config.stage'",
    ),
    "layers null": (_ours(lambda d: d.update(layers=None)), "gates.json", "'layers'"),
    "step negative": (_ours(lambda d: d.update(step=-3)), "gates.json", "'step'"),
    "reference without tensors": (
        _reference(lambda d: d.pop("gate_state_dict")),
        "gate_final.pt",
        "'gate_state_dict'",
    ),
    "reference placement unknown": (
        _reference(lambda d: d["maskattn_config"].update(placement="diagonal")),
        "gate_final.pt",
        "'maskattn_config.placement'",
    ),
    "reference without layers": (
        _reference(lambda d: d.pop("selected_layers")),
        "gate_final.pt",
        "'selected_layers'",
    ),
}

# Every command that takes a gate checkpoint ({ck}); {out} is where it would write.
COMMANDS = {
    "gates info": ["gates", "info", "{ck}"],
    "export": ["export", "--gates", "{ck}", "--out", "{out}"],
    "generate (onnxruntime, cached tiny export)": ["generate", PROMPT, "--gates", "{ck}", "--out", "{out}"],
    "generate (torch)": ["generate", PROMPT, "--backend", "torch", "--gates", "{ck}", "--out", "{out}"],
    "generate (export folder)": [
        "generate", PROMPT, "--export-dir", "{exp}", "--gates", "{ck}", "--out", "{out}",
    ],
    "train (gates.init)": ["train", "--recipe", "tiny-synthetic", "--out", "{out}", "gates.init={ck}"],
    "parity": ["parity", "{exp}", "--gates", "{ck}", "--json", "{out}"],
    "bench": ["bench", "--gates", "{ck}", "--json", "{out}", "--repeats", "1"],
}  # fmt: skip
REFERENCE_ONLY = {
    "gates import": ["gates", "import", "{ck}", "--out", "{out}"],
    "gates import --model": ["gates", "import", "{ck}", "--out", "{out}", "--model", "tiny"],
}


def _cases() -> list:
    cases = []
    for broken in BROKEN:
        commands = dict(COMMANDS)
        if broken.startswith("reference"):
            commands |= REFERENCE_ONLY
        cases += [pytest.param(broken, command, id=f"{command}: {broken}") for command in commands]
    return cases


@pytest.mark.parametrize(("broken", "command"), _cases())
def test_malformed_gate_checkpoint_is_one_line_naming_file_and_field(
    broken: str, command: str, tiny_export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    make, filename, field = BROKEN[broken]
    ckpt = make(tmp_path)
    args = [
        part.format(ck=ckpt, out=tmp_path / "out", exp=tiny_export)
        for part in (COMMANDS | REFERENCE_ONLY)[command]
    ]
    monkeypatch.chdir(tmp_path)
    watch = [tmp_path, cache_root() / "exports"]
    line = refused(args, monkeypatch, capsys, watch, filename, field)
    assert str(ckpt) in line
