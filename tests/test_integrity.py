"""Export folders are checked against their manifest's SHA-256s when opened.

4 KiB flipped in the middle of a component's weights leaves the file's size unchanged and the
ONNX file loadable (ONNX Runtime then computes wrong images), so the check has to hash. Every
file of the tiny export gets that treatment, through every command that opens an export
folder; each must end with exit code 2 and one line naming the file, and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from _hostile import refused

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportFolder, ExportFolderError
from maskattn_deploy.export.integrity import verify_files

# One file per component (the ONNX weights), plus a tokenizer and the scheduler config: the
# pipeline reads them from the folder too.
FILES = [
    "text_encoder/model.onnx",
    "text_encoder_2/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "tokenizer/vocab.json",
    "scheduler/scheduler_config.json",
]
COMMANDS = {
    "generate": ["generate", "a red cube", "--export-dir", "{exp}", "--out", "{out}"],
    "generate (torch, checked against the export)": [
        "generate", "a red cube", "--backend", "torch", "--export-dir", "{exp}", "--out", "{out}",
    ],
    "parity": ["parity", "{exp}", "--json", "{out}"],
    "bench": ["bench", "{exp}", "--json", "{out}", "--repeats", "1"],
    "build": ["build", "{exp}"],
}  # fmt: skip


def _copy(tiny_export: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    return folder


def _flip_middle(path: Path, size: int = 4096) -> None:
    """Invert ``size`` bytes in the middle of ``path`` in place (its size stays the same)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    end = min(len(data), start + size)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", FILES)
def test_corrupted_file_is_refused_by_every_command(
    name: str, command: str, tiny_export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = _copy(tiny_export, tmp_path)
    _flip_middle(folder / name)
    args = [part.format(exp=folder, out=tmp_path / "out") for part in COMMANDS[command]]
    line = refused(args, monkeypatch, capsys, [tmp_path], str(folder / name), "corrupt")
    assert "SHA-256" in line


def test_truncated_and_missing_files_are_named(tiny_export: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_export, tmp_path)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    sizes = {name: (tiny_export / name).stat().st_size for name in files}
    unet = folder / "unet" / "model.onnx"
    size = unet.stat().st_size
    os.truncate(unet, size // 2)
    with pytest.raises(UserError, match=f"{size // 2} bytes, the manifest records {size}"):
        verify_files(folder, files, sizes)  # the size check, before any hashing
    # Opening runs the same size check first; an export older than the recorded sizes (a
    # developer's cache) is caught by its hash instead.
    recorded = json.loads((folder / "manifest.json").read_text()).get("file_sizes")
    caught = f"model.onnx has {size // 2} bytes" if recorded else "model.onnx is corrupt"
    with pytest.raises(ExportFolderError, match=caught):
        ExportFolder.open(folder)
    shutil.copy(tiny_export / "unet" / "model.onnx", unet)
    (folder / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(ExportFolderError, match="vocab.json is missing"):
        ExportFolder.open(folder)


def test_each_file_version_is_hashed_once(tiny_export: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_export, tmp_path)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert verify_files(folder, files) == len(files)  # a new copy: every file is hashed
    assert verify_files(folder, files) == 0  # unchanged: remembered
    vocab = folder / "tokenizer" / "vocab.json"
    stat = vocab.stat()
    _flip_middle(vocab, 16)
    os.utime(vocab, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime as before
    with pytest.raises(UserError, match="vocab.json is corrupt"):
        verify_files(folder, files)  # the change time still moved: hashed again, caught


@pytest.mark.slow
def test_a_fresh_export_is_remembered_and_not_hashed_again(tmp_path: Path) -> None:
    from maskattn_deploy.export import export_pipeline

    result = export_pipeline("tiny", None, tmp_path / "onnx", validate=False)
    assert result.manifest.file_sizes == {
        name: (tmp_path / "onnx" / name).stat().st_size for name in result.manifest.files
    }
    assert verify_files(tmp_path / "onnx", result.manifest.files) == 0
