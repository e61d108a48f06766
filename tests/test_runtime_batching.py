"""The batched pipeline: several requests through one UNet call per step, one result each.

A request's image must not depend on which other requests shared its batch. The expectation
each test compares with is the same request generated alone (``Pipeline.generate``, the
single-request path `generate` uses). Tolerances, measured on this machine's CPU:

- onnxruntime CPU: bit-identical (its kernels compute each row the same way at any batch size;
  checked at 2-16 UNet rows and 1-2 threads);
- torch CPU: final latents within 1e-4 (3.1e-5 measured after 8 Euler steps) and 8-bit images
  within one level (1 measured): oneDNN picks its convolution blocking by batch size, which
  reorders float sums.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _hostile import run_generate as cli

from maskattn_deploy.errors import UserError
from maskattn_deploy.runtime.batching import RowLayout, batch_key, plan_batches
from maskattn_deploy.runtime.model_info import ModelInfo
from maskattn_deploy.runtime.outputs import read_png_settings
from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline

A = GenerateConfig("a red square left of a green circle", steps=3, seed=3, height=64, width=64)
B = GenerateConfig("a blue dog", "ugly", steps=3, seed=11, guidance=7.0, height=64, width=64)
C = GenerateConfig("green", steps=3, seed=5, guidance=2.0, height=64, width=64)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def gated(tiny_pipe) -> Pipeline:
    """The tiny model with its seeded gates on the torch backend (a private copy of the UNet)."""
    from maskattn_deploy.models.tiny import tiny_default_gates_dir
    from maskattn_deploy.runtime.api import torch_pipeline

    return torch_pipeline("tiny", tiny_default_gates_dir(), torch.device("cpu"))


@pytest.fixture(scope="module")
def ort(tmp_path_factory) -> Pipeline:
    """The cached tiny export on ONNX Runtime CPU (exported once per test cache)."""
    from maskattn_deploy.models.tiny import tiny_default_gates_dir
    from maskattn_deploy.runtime.api import ensure_tiny_export
    from maskattn_deploy.runtime.ort_backend import ort_backend

    export_dir, _ = ensure_tiny_export(tiny_default_gates_dir(), lambda _: None)
    info = ModelInfo.from_export(export_dir)
    return Pipeline(ort_backend(export_dir, info.export_manifest, "cpu"), info)


# ---------------------------------------------------------------------- planning


def test_plan_batches_groups_by_key_keeps_order_and_cuts_at_max_rows() -> None:
    small = replace(A, height=128)
    nocfg = replace(A, guidance=1.0)  # guidance off: one row per image, another key
    configs = [A, small, B, nocfg, C, A, nocfg]
    assert batch_key(A) != batch_key(small) and batch_key(A) != batch_key(nocfg)
    assert plan_batches(configs, None) == [[0, 2, 4, 5], [1], [3, 6]]
    # 4 rows: two guided requests per call; unguided requests take one row each
    assert plan_batches(configs, 4) == [[0, 2], [4, 5], [1], [3, 6]]
    with pytest.raises(UserError, match="needs UNet batch 6"):
        plan_batches([replace(A, num_images=3)], 4)


def test_row_layout_puts_unconditional_rows_first() -> None:
    layout = RowLayout.of([1, 2, 1], [True, False, True])
    assert layout.uncond == [slice(0, 1), None, slice(1, 2)]
    assert layout.cond == [slice(2, 3), slice(3, 5), slice(5, 6)]
    assert layout.rows == 6 and layout.cond_rows == 4


# ---------------------------------------------------------------------- torch


def test_a_batch_of_one_is_the_single_request_path(gated: Pipeline) -> None:
    alone = gated.generate(A, progress=False)
    batched = gated.generate_batch([A])[0]
    assert torch.equal(alone.latents, batched.latents)
    assert batched.batch_size == 1 and batched.settings == alone.settings


def test_torch_batch_matches_each_request_alone(gated: Pipeline) -> None:
    batch = gated.generate_batch([B, A, C])
    assert [r.config.prompt for r in batch] == [B.prompt, A.prompt, C.prompt]
    for config, result in zip((B, A, C), batch, strict=True):
        alone = gated.generate(config, progress=False)
        assert torch.equal(result.initial_latents, alone.initial_latents)  # its own seed
        torch.testing.assert_close(result.latents, alone.latents, rtol=0, atol=1e-4)
        assert np.abs(pixels(result.images[0]) - pixels(alone.images[0])).max() <= 1
        assert result.settings["guidance"] == config.guidance and result.batch_size == 3
    # the three requests really differ (so equality above is not trivially true)
    assert (batch[0].latents - batch[1].latents).abs().max() > 0.1


def test_per_layer_open_fractions_match_masks_recorded_around_generate(gated: Pipeline) -> None:
    expected = _independent_fractions(gated, A)
    result = gated.generate_batch([A], gate_stats=True)[0]
    assert result.masks is None  # spatial maps only with record_masks
    assert set(result.gate_open) == set(gated.backend.gates.layers) == set(expected)
    for layer, fraction in result.gate_open.items():
        assert fraction == pytest.approx(expected[layer], abs=1e-6)
        assert 0.0 < fraction <= 1.0
    assert min(result.gate_open.values()) < 0.9  # some gates closed: the statistic is not trivial
    batched = gated.generate_batch([B, A], gate_stats=True)[1].gate_open
    assert batched == pytest.approx(result.gate_open, abs=0.02)  # batch fp noise may flip a gate


def _independent_fractions(pipeline: Pipeline, config: GenerateConfig) -> dict[str, float]:
    """Open fraction per layer from the GateSet's own recording around a plain generate: the
    mean of each evaluation's conditional row over (cell, token), averaged over evaluations."""
    with pipeline.backend.gates.recording() as records:
        pipeline.generate(config, progress=False)
        return {
            layer: float(np.mean([m[-1].float().mean().item() for m in masks]))
            for layer, masks in records.items()
        }


def test_requests_with_different_keys_are_refused_together(gated: Pipeline) -> None:
    with pytest.raises(UserError, match="must share height, width, steps"):
        gated.generate_batch([A, replace(A, steps=2)])


# ---------------------------------------------------------------------- onnxruntime


@pytest.mark.slow
def test_onnxruntime_batch_is_bit_identical_to_each_request_alone(ort: Pipeline) -> None:
    configs = [replace(c, height=128, width=128) for c in (B, A)]
    batch = ort.generate_batch(configs)
    for config, result in zip(configs, batch, strict=True):
        alone = ort.generate(config, progress=False)
        assert torch.equal(result.latents, alone.latents)
        assert np.array_equal(pixels(result.images[0]), pixels(alone.images[0]))
    with pytest.raises(UserError, match="accepts at most 4"):
        ort.generate_batch(configs + [replace(C, height=128, width=128)])


@pytest.mark.slow
def test_batch_file_images_equal_single_generate(ort, tmp_path, monkeypatch, capsys) -> None:
    from maskattn_deploy.runtime.api import GenerateOptions, run_generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red square\n# a comment\n\n"
        '{"prompt": "a blue circle", "seed": 42, "guidance": 7.5}\n'
        "a green triangle\n"
    )
    out = tmp_path / "batch"
    common = ["--height", "128", "--width", "128", "--steps", "2", "--no-progress"]
    code, stdout, _ = cli(
        monkeypatch, capsys, "--batch-file", str(prompts), "--out", str(out), *common
    )
    assert code == 0 and "3 request(s) in 2 batch(es)" in stdout
    images = sorted(out.glob("*.png"))
    assert len(images) == 3
    expected = [("a red square", 0, 5.0), ("a blue circle", 42, 7.5), ("a green triangle", 2, 5.0)]
    for path, (prompt, seed, guidance) in zip(images, expected, strict=True):
        settings = read_png_settings(path)
        assert (settings["prompt"], settings["seed"], settings["guidance"]) == (
            prompt,
            seed,
            guidance,
        )
        single = run_generate(
            GenerateOptions(
                prompt,
                seed=seed,
                guidance=guidance,
                steps=2,
                height=128,
                width=128,
                out=tmp_path / f"single-{seed}",
                progress=False,
            ),
            say=lambda _: None,
        )
        assert np.array_equal(pixels_of(path), pixels_of(single.images[0]))


def pixels_of(path: Path) -> np.ndarray:
    from PIL import Image

    return pixels(Image.open(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "has no prompts"),
        ('{"prompt": "x", "colour": 1}\n', "unknown key(s) colour"),
        ('{"prompt": "x", "seed": "7"}\n', "'seed' must be int"),
        ("{not json\n", "not valid JSON"),
        ('{"prompt": "x", "steps": 0}\n', "'steps' must be at least 1"),
    ],
)
def test_bad_batch_files_fail_with_one_line(
    content, message, tmp_path, monkeypatch, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    code, _, err = cli(monkeypatch, capsys, "--batch-file", str(prompts), "--out", str(tmp_path))
    assert code == 2 and err.startswith("error:") and message in err
    assert not list(tmp_path.glob("*.png"))


def test_prompt_and_batch_file_are_exclusive(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = cli(monkeypatch, capsys, "x", "--batch-file", str(tmp_path / "p.txt"))
    assert code == 2 and "either a PROMPT or --batch-file" in err
