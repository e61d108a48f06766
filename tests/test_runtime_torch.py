"""The served pipeline on the torch backend: equality with stock diffusers, masks, metadata, errors.

Everything runs on the tiny model at 64x64 px (latent 8x8) with 1-3 steps: the point is the
control flow (tokenizers, guidance, schedulers, seeds, VAE), not image quality.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskattn_deploy.cli.main import main
from maskattn_deploy.errors import UserError
from maskattn_deploy.runtime.api import GenerateOptions, run_generate
from maskattn_deploy.runtime.masks import (
    COLUMNS,
    HEADER_H,
    LABEL_H,
    PANEL,
    MaskAccumulator,
    layer_grid,
    panel_box,
    render_mask_grid,
)
from maskattn_deploy.runtime.model_info import ModelInfo
from maskattn_deploy.runtime.outputs import read_png_settings
from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline
from maskattn_deploy.runtime.schedulers import make_scheduler
from maskattn_deploy.runtime.torch_backend import torch_backend

PROMPT = "a red square left of a green circle"


@pytest.fixture(scope="module")
def plain(tiny_pipe) -> Pipeline:
    """The tiny pipeline without gates behind the torch backend (shares tiny_pipe's modules)."""
    return Pipeline(torch_backend(tiny_pipe), ModelInfo.from_pipe(tiny_pipe, "tiny", None))


def stock(tiny_pipe, scheduler: str, **kwargs):
    """Stock diffusers SDXL with the same modules and a fresh scheduler of the same kind."""
    from diffusers import StableDiffusionXLPipeline

    components = dict(tiny_pipe.components)
    components["scheduler"] = make_scheduler(scheduler, tiny_pipe.scheduler.config)
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_schedulers_match_stock_diffusers(plain: Pipeline, tiny_pipe, scheduler: str) -> None:
    config = GenerateConfig(
        PROMPT, "blue", steps=2, scheduler=scheduler, seed=7, height=64, width=64, guidance=4.0
    )
    ours = plain.generate(config, progress=False)
    ref = stock(
        tiny_pipe,
        scheduler,
        prompt=PROMPT,
        negative_prompt="blue",
        num_inference_steps=2,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    # Same modules, same CPU generator, same op order: only float reassociation could differ.
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=1e-5)


def test_no_gates_cli_reproduces_stock_pipeline(tiny_pipe, tmp_path) -> None:
    report = run_generate(
        GenerateOptions(
            PROMPT,
            backend="torch",
            device="cpu",  # compared with tiny_pipe, which runs on the CPU
            no_gates=True,
            steps=3,
            seed=11,
            height=64,
            width=64,
            num_images=2,
            out=tmp_path,
            progress=False,
        ),
        say=lambda _: None,
    )
    ref = stock(
        tiny_pipe,
        "euler",
        prompt=PROMPT,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=64,
        width=64,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    ).images
    assert len(report.images) == 2
    for i, path in enumerate(report.images):
        ours = np.asarray(Image.open(path).convert("RGB")).astype(int)
        expected = (ref[i] * 255).round().astype(int)
        # 8-bit images from identical float pipelines: at most one rounding step apart.
        assert np.abs(ours - expected).max() <= 1
    settings = read_png_settings(report.images[0])
    assert settings["prompt"] == PROMPT and settings["seed"] == 11 and settings["steps"] == 3
    assert settings["backend"] == "torch" and settings["gates_sha256"] == "none"
    assert settings["model_fingerprint"].startswith("unet-") and settings["scheduler"] == "euler"
    assert Image.open(report.images[0]).text["negative_prompt"] == ""


def test_gates_change_the_image_and_forced_open_restores_it(tiny_pipe) -> None:
    from maskattn_deploy.gating import remove_gates
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    pipe = load_pipeline("tiny")
    gates = load_gates(tiny_default_gates_dir(), pipe.unet)
    gated = Pipeline(torch_backend(pipe), ModelInfo.from_pipe(pipe, "tiny", "x"))
    config = GenerateConfig(PROMPT, steps=2, seed=3, height=64, width=64)
    masked = gated.generate(config, progress=False)
    with gates.forced_open():
        opened = gated.generate(config, progress=False)
    remove_gates(pipe.unet)
    plain = Pipeline(torch_backend(tiny_pipe), ModelInfo.from_pipe(tiny_pipe, "tiny", None))
    reference = plain.generate(config, progress=False)
    # All gates open = plain attention (the masked softmax reduces to softmax): float noise only.
    torch.testing.assert_close(opened.latents, reference.latents, rtol=0, atol=1e-4)
    assert (masked.latents - reference.latents).abs().max() > 1e-3


def test_long_prompt_is_truncated_with_a_count(plain: Pipeline, caplog) -> None:
    words = 100  # "red" is one token; + start and end tokens = 102, CLIP reads 77
    config = GenerateConfig("red " * words, steps=1, height=64, width=64, guidance=1.0)
    with caplog.at_level("WARNING"):
        result = plain.generate(config, progress=False)
    assert len(result.warnings) == 1
    assert "the last 25 token(s) were dropped" in result.warnings[0]
    assert "25 token(s)" in caplog.text
    assert len(result.token_labels) == 77  # start + 75 words + end


def test_guidance_off_runs_one_row_per_image(plain: Pipeline) -> None:
    result = plain.generate(
        GenerateConfig(PROMPT, steps=1, height=64, width=96, guidance=1.0), False
    )  # 96: not square, a multiple of the tiny UNet's 32 px
    assert result.images[0].size == (96, 64)
    assert result.latents.shape == (1, 4, 8, 12)


def test_same_seed_same_noise_different_seed_different_noise(plain: Pipeline) -> None:
    a, _ = plain.initial_latents(GenerateConfig(PROMPT, seed=5, height=64, width=64))
    b, _ = plain.initial_latents(GenerateConfig(PROMPT, seed=5, height=64, width=64))
    c, _ = plain.initial_latents(GenerateConfig(PROMPT, seed=6, height=64, width=64))
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, expected) and not torch.equal(a, c)


# ---------------------------------------------------------------------- masks


def test_mask_accumulator_averages_on_the_latent_grid() -> None:
    acc = MaskAccumulator(lambda layer: "mid", (4, 4), num_images=1)
    full = torch.zeros(2, 16, 3, dtype=torch.bool)  # CFG rows [uncond, cond], 4x4 grid, 3 tokens
    full[1, :, 0] = True  # token 0 open everywhere in the conditional row
    full[0, :, 1] = True  # uncond row only: must not count
    half = torch.zeros(2, 4, 3, dtype=torch.bool)  # a 2x2 layer
    half[1, 0, 2] = True  # token 2 open in the top-left cell -> top-left 2x2 of the latent grid
    acc.drain({"a": [full], "b": [half]})
    got = acc.fractions()["mid"][0]  # [3, 4, 4]
    assert torch.equal(got[0], torch.full((4, 4), 0.5))  # open in 1 of 2 layers
    assert torch.equal(got[1], torch.zeros(4, 4))
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 0.5
    assert torch.equal(got[2], expected)
    assert layer_grid(9, (5, 6)) == (3, 3) and layer_grid(30, (5, 6)) == (5, 6)


def test_render_grid_dimensions_and_panels() -> None:
    fractions = torch.zeros(9, 4, 4)
    fractions[3] = 1.0
    fractions[5, :2] = 1.0
    labels = [f"t{i}" for i in range(9)]
    image = Image.new("RGB", (64, 64), "gray")
    grid = render_mask_grid(fractions, labels, image, "stage mid")
    rows = -(-(1 + 9) // COLUMNS)
    assert grid.size == (COLUMNS * PANEL, HEADER_H + rows * (PANEL + LABEL_H))
    panels = [np.asarray(grid.crop(panel_box(i + 1))) for i in range(9)]
    assert np.array_equal(panels[0], panels[1])  # equal fractions, equal panels
    assert not np.array_equal(panels[0], panels[3])
    assert panels[3].mean() > panels[0].mean()  # open is brighter
    top, bottom = panels[5][: PANEL // 2], panels[5][PANEL // 2 :]
    assert top.mean() > bottom.mean()


def test_save_masks_writes_grids_whose_panels_differ(tmp_path) -> None:
    report = run_generate(
        GenerateOptions(
            PROMPT,
            backend="torch",
            device="cpu",
            steps=2,
            height=64,
            width=64,
            out=tmp_path,
            save_masks=True,
            progress=False,
            json_path=tmp_path / "report.json",
        ),
        say=lambda _: None,
    )
    labels = report.result.token_labels
    assert labels[0] == "<start>" and labels[-1] == "<end>" and "red" in labels
    masks = report.result.masks
    assert masks is not None and set(masks) == {"mid"}  # the tiny default gates: mid stage
    assert len(report.mask_grids) == 1 and report.mask_grids[0].name.endswith(".masks-mid.png")
    grid = Image.open(report.mask_grids[0])
    rows = -(-(1 + len(labels)) // COLUMNS)
    assert grid.size == (COLUMNS * PANEL, HEADER_H + rows * (PANEL + LABEL_H))
    fractions = masks["mid"][0]  # [t, 8, 8]
    assert fractions.min() >= 0 and fractions.max() <= 1
    # The seeded gates differ between tokens, so their maps and panels must differ too.
    i, j = labels.index("red"), labels.index("green")
    assert not torch.equal(fractions[i], fractions[j])
    assert not np.array_equal(
        np.asarray(grid.crop(panel_box(i + 1))), np.asarray(grid.crop(panel_box(j + 1)))
    )
    assert (tmp_path / "report.json").is_file()


# ---------------------------------------------------------------------- errors


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the real entry point; returns the exit code and the last stderr line (the error)."""
    monkeypatch.setattr(sys, "argv", ["maskattn-deploy", "generate", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exc.value.code), err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "--backend", "jax"], "unknown backend 'jax'; choose one of onnxruntime, torch"),
        (["   "], "the prompt is empty"),
        (["x", "--height", "100"], "--height 100 must be a positive multiple of 8"),
        (["x", "--width", "0"], "--width must be an integer in 8..4096, got 0"),
        (["x", "--gates", "g", "--no-gates"], "either --gates or --no-gates"),
        (["x", "--backend", "torch", "--no-gates", "--model", "no/such-model-xyz"], "cannot load"),
    ],
)
def test_invalid_inputs_fail_with_one_line(monkeypatch, capsys, args, message) -> None:
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err


def test_tensorrt_without_tensorrt_names_the_fix(monkeypatch, capsys) -> None:
    from maskattn_deploy.engine.cuda_check import missing_for_tensorrt

    reason = missing_for_tensorrt()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here; the refusal cannot happen")
    code, err = run_cli(monkeypatch, capsys, "x", "--backend", "tensorrt")
    assert code == 2 and reason in err
    assert "pip install" in err or "NVIDIA GPU" in err


def test_unknown_scheduler_is_refused_by_the_library(plain: Pipeline) -> None:
    with pytest.raises(UserError, match="unknown scheduler 'lms'"):
        plain.generate(GenerateConfig(PROMPT, scheduler="lms", height=64, width=64))
