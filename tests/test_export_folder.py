"""The export folder as one typed object: open validates and migrates, one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from maskattn_deploy.export.folder import (
    ComponentEntry,
    ExportFolder,
    ExportFolderError,
    ExportManifest,
    GatesEntry,
    ModelEntry,
)
from maskattn_deploy.export.spec import EXPORT_FORMAT
from maskattn_deploy.recipes import load_recipe


def manifest(gates: GatesEntry | None = None) -> ExportManifest:
    recipe = load_recipe("export", "tiny")
    unet = ComponentEntry(
        path="unet/model.onnx",
        inputs=[{"name": "sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]}],
        outputs=[{"name": "out_sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]}],
        external_data=False, precision="fp32", size_bytes=10, gated_layers=["a.attn2"],
    )  # fmt: skip
    return ExportManifest(
        format=EXPORT_FORMAT, created="2026-01-01T00:00:00+00:00",
        model=ModelEntry("tiny", "StableDiffusionXLPipeline", "abc", True, 0.13025),
        vae={"scaling_factor": 0.13025}, gates=gates, opset=18, precision="fp32",
        recipe=recipe, shapes=dict(recipe["shapes"]), components={"unet": unet},
        gated_layers=["a.attn2"], plugin={}, tools={}, validation=None, files={},
    )  # fmt: skip


def write(root: Path, data: dict) -> Path:
    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "unet" / "model.onnx").write_bytes(b"onnx")
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_round_trip_is_exact(tmp_path: Path) -> None:
    data = manifest().to_dict()
    assert list(data) == [
        "format", "created", "model", "vae", "gates", "gate_checkpoint_sha256", "opset",
        "precision", "recipe", "shapes", "components", "gated_layers", "plugin", "tools",
        "validation", "files", "file_sizes",
    ]  # fmt: skip
    folder = ExportFolder.open(write(tmp_path, data))
    assert folder.manifest.to_dict() == data
    assert folder.onnx_path("unet") == tmp_path / "unet" / "model.onnx"
    assert folder.manifest.export_recipe().shapes.opt_point().label == "2x256x256"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="someone-else/1"), "not a maskattn-deploy export"),
        (lambda d: d.update(format="maskattn-deploy-export/99"), "newer maskattn-deploy"),
        (lambda d: d.pop("components"), "has no 'components' (an object expected)"),
        (lambda d: d.update(opset="18"), "malformed 'opset' (an integer expected)"),
        (lambda d: d["components"]["unet"].pop("path"), "components.unet has no 'path'"),
        (lambda d: d["components"]["unet"].update(path="unet/other.onnx"), "other.onnx (unet) is missing"),
    ],
)  # fmt: skip
def test_bad_manifests_get_one_line_errors(tmp_path: Path, edit, message: str) -> None:
    data = copy.deepcopy(manifest().to_dict())
    edit(data)
    with pytest.raises(ExportFolderError) as info:
        ExportFolder.open(write(tmp_path, data))
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "re-run maskattn-deploy export" in text or "upgrade" in text


def test_missing_or_unreadable_folders(tmp_path: Path) -> None:
    with pytest.raises(ExportFolderError, match="does not exist; create it"):
        ExportFolder.open(tmp_path / "nope")
    with pytest.raises(ExportFolderError, match=r"no manifest.json\); create one"):
        ExportFolder.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExportFolderError, match="is unreadable"):
        ExportFolder.open(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ExportFolderError, match="is not a JSON object"):
        ExportFolder.open(tmp_path)


def test_version_1_validation_checks_are_migrated(tmp_path: Path) -> None:
    data = manifest().to_dict()
    old = {"component": "unet", "output": "out_sample", "point": "B=1 128x128",
           "max_abs": 2e-6, "max_ref": 3.0, "tolerance": 1e-4, "reason": "fp32 rounding",
           "finite": True, "relative": 6e-7, "ok": True}  # fmt: skip
    data |= {"format": "maskattn-deploy-export/1",
             "validation": {"unet": {"checks": [old], "ort_cpu_fp32_fallback_ops": []}}}  # fmt: skip
    opened = ExportFolder.open(write(tmp_path, data)).manifest
    assert opened.format == EXPORT_FORMAT
    (check,) = opened.validation["unet"]["checks"]
    assert check["ok"] is True and check["failures"] == [] and check["max_abs"] == 2e-6
    assert check["tolerance"] == {"atol": 1e-4, "rtol": 0.0, "max_rel_l2": None,
                                  "min_cosine": None, "reason": "fp32 rounding"}  # fmt: skip


def test_find_gates_needs_a_matching_hash(tmp_path: Path) -> None:
    from maskattn_deploy.gating.checkpoint import read_checkpoint
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    tiny = tiny_default_gates_dir()
    sha = read_checkpoint(tiny).sha256
    entry = GatesEntry(path=None, sha256=sha, config={}, threshold=0.0, num_parameters=1)
    folder = ExportFolder.open(write(tmp_path / "a", manifest(entry).to_dict()))
    assert folder.find_gates() == tiny  # the tiny model's seeded gates match
    assert folder.find_gates(given=tmp_path / "missing") == tiny
    other = GatesEntry(path=str(tiny), sha256="0" * 64, config={}, threshold=0.0, num_parameters=1)
    assert ExportFolder.open(write(tmp_path / "b", manifest(other).to_dict())).find_gates() is None
    ungated = ExportFolder.open(write(tmp_path / "c", manifest().to_dict()))
    assert ungated.find_gates(given=tiny) is None
