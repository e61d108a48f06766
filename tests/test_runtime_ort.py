"""ONNX Runtime (and TensorRT where present) against the torch reference, through ``generate``.

The module starts from an empty artefact cache and runs the default command, which builds the
tiny model, its seeded gates and the one-time ONNX export; every later test reuses that cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _hostile import run_generate as cli
from PIL import Image

from maskattn_deploy.cli.main import main
from maskattn_deploy.runtime.api import GenerateOptions, run_generate, tiny_export_dir
from maskattn_deploy.runtime.outputs import read_png_settings

PROMPT = "a red square left of a green circle"
QUIET = {"progress": False}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> dict:
    """Run the default command on an empty cache (cold), the way a new user would."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    out = tmp_path_factory.mktemp("default-out")
    previous = os.environ.get("MASKATTN_DEPLOY_CACHE")
    os.environ["MASKATTN_DEPLOY_CACHE"] = str(cache)
    argv = sys.argv
    sys.argv = [
        "maskattn-deploy",
        "generate",
        PROMPT,
        "--out",
        str(out),
        "--json",
        str(out / "r.json"),
    ]
    start = time.perf_counter()
    try:
        main()
    except SystemExit as exc:  # click may exit 0 explicitly
        assert not exc.code, f"default generate failed with exit code {exc.code}"
    finally:
        sys.argv = argv
    cold = time.perf_counter() - start
    print(f"\ndefault generate on a fresh cache: {cold:.1f} s")
    yield {"cache": cache, "out": out, "cold_s": cold}
    if previous is None:
        os.environ.pop("MASKATTN_DEPLOY_CACHE", None)
    else:
        os.environ["MASKATTN_DEPLOY_CACHE"] = previous


@pytest.fixture(scope="module")
def export_dir(fresh_cache) -> Path:
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    path = tiny_export_dir(tiny_default_gates_dir())
    assert (path / "manifest.json").is_file()
    return path


@pytest.mark.slow
def test_default_command_on_a_fresh_cache_writes_an_image(fresh_cache) -> None:
    out = fresh_cache["out"]
    images = sorted(out.glob("*.png"))
    assert len(images) == 1
    image = Image.open(images[0])
    assert image.size == (256, 256)  # the tiny export's default (recipe opt) size
    settings = read_png_settings(images[0])
    assert settings["backend"] == "onnxruntime" and settings["prompt"] == PROMPT
    assert settings["gates_sha256"] != "none" and settings["steps"] == 8
    report = json.loads((out / "r.json").read_text())
    assert report["export_cache"]["created"] is True
    assert report["timings"]["unet_per_step_s"] > 0 and len(report["timings"]["unet_steps_s"]) == 8
    assert "CPU" in report["backend_components"]["unet"]


@pytest.mark.slow
def test_torch_and_onnxruntime_agree_on_the_same_seed(export_dir, tmp_path) -> None:
    common = dict(steps=3, seed=21, height=128, width=128, negative_prompt="blue", **QUIET)
    cpu = {"device": "cpu", "ort_provider": "cpu"}  # the tolerance below is for CPU kernels
    ort = run_generate(
        GenerateOptions(PROMPT, backend="onnxruntime", out=tmp_path / "ort", **common, **cpu),
        say=lambda _: None,
    )
    ref = run_generate(
        GenerateOptions(PROMPT, backend="torch", out=tmp_path / "torch", **common, **cpu),
        say=lambda _: None,
    )
    assert ort.result.settings["gates_sha256"] == ref.result.settings["gates_sha256"]
    assert torch.equal(ort.result.initial_latents, ref.result.initial_latents)
    # fp32 graphs on the same inputs differ only by kernel choice and op fusion: 1.6e-5 seen
    # here on latents of magnitude ~10 after 3 Euler steps; 2e-4 leaves room for other CPUs.
    torch.testing.assert_close(ort.result.latents, ref.result.latents, rtol=0, atol=2e-4)
    a = np.asarray(Image.open(ort.images[0]).convert("RGB"))
    b = np.asarray(Image.open(ref.images[0]).convert("RGB"))
    assert psnr(a, b) >= 40.0


def test_io_binding_path_matches_plain_session(export_dir) -> None:
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.runtime.ort_backend import ort_backend

    manifest = ExportFolder.open(export_dir).manifest
    plain = ort_backend(export_dir, manifest, "cpu", ("unet",))
    bound = ort_backend(export_dir, manifest, "cpu", ("unet",), io_binding=True)
    g = torch.Generator().manual_seed(0)
    text_width = manifest.components["unet"].inputs[2]["shape"][-1]
    pooled_width = manifest.components["unet"].inputs[3]["shape"][-1]
    feed = {
        "sample": torch.randn(2, 4, 16, 24, generator=g),
        "timestep": torch.tensor([700.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 77, text_width, generator=g),
        "text_embeds": torch.randn(2, pooled_width, generator=g),
        "time_ids": torch.tensor([[128.0, 192, 0, 0, 128, 192]] * 2),
    }
    with plain, bound:
        expected = plain.run("unet", feed)["out_sample"]
        got = bound.run("unet", feed)["out_sample"]
    assert "IO binding" in bound.describe()["unet"]
    assert got.shape == (2, 4, 16, 24)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # same session kind, same kernels


@pytest.mark.slow
def test_save_masks_on_onnxruntime_uses_the_torch_reference(export_dir, tmp_path) -> None:
    options = GenerateOptions(
        PROMPT, steps=2, height=128, width=128, out=tmp_path, save_masks=True, **QUIET
    )
    report = run_generate(options, say=lambda _: None)
    assert len(report.mask_grids) == 1 and "torch reference pass" in report.notes[0]
    grid = Image.open(report.mask_grids[0])
    assert grid.size[0] > 0 and read_png_settings(report.mask_grids[0])["stage"] == "mid"


# ---------------------------------------------------------------------- refusals


def test_size_outside_the_exported_range(export_dir, monkeypatch, capsys) -> None:
    code, _, err = cli(monkeypatch, capsys, PROMPT, "--height", "512")
    assert code == 2 and "outside the exported range 128..384" in err


def test_batch_beyond_the_export(export_dir, monkeypatch, capsys) -> None:
    code, _, err = cli(monkeypatch, capsys, PROMPT, "--num-images", "3")
    assert code == 2 and "need UNet batch 6" in err and "1..4" in err


def test_export_from_another_model(export_dir, tmp_path, monkeypatch, capsys) -> None:
    other = tmp_path / "other-model"
    (other / "unet").mkdir(parents=True)
    from maskattn_deploy.models.tiny import tiny_pipeline_dir

    config = json.loads((tiny_pipeline_dir() / "unet" / "config.json").read_text())
    config["layers_per_block"] = 1  # another architecture -> another fingerprint
    (other / "unet" / "config.json").write_text(json.dumps(config))
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    code, _, err = cli(
        monkeypatch, capsys, PROMPT, "--export-dir", str(export_dir), "--model", str(other)
    )
    assert code == 2 and "was made for UNet" in err and str(other) in err
    from maskattn_deploy.runtime.api import check_export_matches
    from maskattn_deploy.runtime.model_info import ModelInfo

    check_export_matches(ModelInfo.from_export(export_dir), "tiny", None, False)  # the right one


def test_gates_that_were_not_exported(export_dir, monkeypatch, capsys) -> None:
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    other = tiny_default_gates_dir(seed=99)
    code, _, err = cli(
        monkeypatch, capsys, PROMPT, "--export-dir", str(export_dir), "--gates", str(other)
    )
    assert code == 2 and f"--gates {other} (sha256" in err and "are not the ones in" in err
    code, _, err = cli(monkeypatch, capsys, PROMPT, "--export-dir", str(export_dir), "--no-gates")
    assert code == 2 and "has gates built in" in err


def test_not_an_export_folder(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = cli(monkeypatch, capsys, PROMPT, "--export-dir", str(tmp_path))
    assert code == 2 and "is not an export folder" in err and "maskattn-deploy export" in err


def test_incomplete_export_folder(export_dir, tmp_path, monkeypatch, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken, ignore=shutil.ignore_patterns("*.onnx", "*.data"))
    code, _, err = cli(monkeypatch, capsys, PROMPT, "--export-dir", str(broken), "--steps", "1")
    assert code == 2 and "re-run maskattn-deploy export" in err


# ---------------------------------------------------------------------- TensorRT (real only)


@pytest.mark.tensorrt
def test_tensorrt_matches_onnxruntime(export_dir, tmp_path) -> None:
    from maskattn_deploy.engine.cuda_check import missing_for_tensorrt

    reason = missing_for_tensorrt()
    if reason is not None:
        pytest.skip(f"TensorRT not installed or no GPU here: {reason}")
    from maskattn_deploy.engine.builder import build_engines

    engines = tmp_path / "export"
    shutil.copytree(export_dir, engines)
    build_engines(engines, "tiny")
    common = dict(steps=3, seed=4, height=256, width=256, export_dir=engines, **QUIET)
    trt = run_generate(GenerateOptions(PROMPT, backend="tensorrt", out=tmp_path / "t", **common))
    ort = run_generate(GenerateOptions(PROMPT, backend="onnxruntime", out=tmp_path / "o", **common))
    a = np.asarray(Image.open(trt.images[0]).convert("RGB"))
    b = np.asarray(Image.open(ort.images[0]).convert("RGB"))
    assert psnr(a, b) >= 40.0  # fp32 engines vs fp32 ONNX Runtime
