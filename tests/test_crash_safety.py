"""Failures late in a command: checked before anything is written, one line, nothing left.

* ``train`` checks its run folder, ``gates.init``, the model and the data before writing the
  run folder, so a corrected retry is not refused as "already holds a training run";
* a full disk while ``export`` copies tokenizers/configs after the networks (tokenizers raises
  a plain ``Exception("... (os error 28)")``), while ``generate`` writes its PNGs, or while a
  ``--json`` report is written, is one line naming the output, with nothing kept.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from _hostile import refused, run_cli

from maskattn_deploy.models.tiny import cache_root

PROMPT = "a red cube"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["gates.init=/nowhere/gates"], "/nowhere/gates"),
        (["--data", "folder:/nowhere/images"], "/nowhere/images"),
        (["--model", "/nowhere/sdxl-folder"], "/nowhere/sdxl-folder"),
        (["train.steps=0"], "steps"),
    ],
    ids=["gates.init missing", "data folder missing", "model missing", "steps 0"],
)
def test_refused_train_writes_nothing_and_the_corrected_retry_runs(
    args: list[str], needle: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    base = ["train", "--recipe", "tiny-synthetic", "--out", str(out)]
    refused([*base, *args], monkeypatch, capsys, [tmp_path], needle)
    assert not out.exists()


@pytest.mark.slow
def test_corrected_train_retry_is_not_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue's case: a run refused on gates.init, then the same --out without it."""
    out = tmp_path / "run"
    base = ["train", "--recipe", "tiny-synthetic", "--out", str(out), "train.steps=2"]
    refused([*base, "gates.init=/nowhere/gates"], monkeypatch, capsys, [tmp_path], "/nowhere")
    code, err = run_cli([*base, "log.eval_every=0", "log.tensorboard=false"], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "gates" / "gates.json").is_file() and (out / "config.json").is_file()


def _disk_full(*args, **kwargs):
    raise Exception("No space left on device (os error 28)")  # what tokenizers raises


def test_disk_full_while_export_copies_tokenizers(tmp_path: Path, monkeypatch, capsys) -> None:
    """The networks are stubbed out: what is checked is the failure after them."""
    from transformers import PreTrainedTokenizerBase

    import maskattn_deploy.export.pipeline as export_pipeline

    monkeypatch.setattr(export_pipeline, "_run_components", lambda *args, **kwargs: [])
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", _disk_full)
    out = tmp_path / "onnx"
    line = refused(
        ["export", "--out", str(out), "--no-validate"],
        monkeypatch,
        capsys,
        [tmp_path],
        str(out),
        "No space left on device",
    )
    assert "nothing was kept" in line


def test_disk_full_while_generate_writes_images(
    tiny_export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "images"
    args = ["generate", PROMPT, "--export-dir", str(tiny_export), "--out", str(out)]
    refused(
        [*args, "--steps", "1", "--no-progress"],
        monkeypatch,
        capsys,
        [tmp_path, cache_root() / "exports"],
        str(out),
        "No space left on device",
    )


def test_disk_full_while_a_json_report_is_written(
    tiny_export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    real_write = Path.write_text

    def full(self: Path, *args, **kwargs):
        if self.name.startswith(".parity.json."):  # the report's temp file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    report = tmp_path / "parity.json"
    args = ["parity", str(tiny_export), "--backends", "onnxruntime", "--no-e2e"]
    code, err = run_cli(
        [*args, "--components", "text_encoder", "--json", str(report)], monkeypatch, capsys
    )
    assert code == 2, err
    assert "No space left on device" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
