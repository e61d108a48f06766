"""The built-in ``tiny-fitted`` backbone: the shipped file, its integrity checks, loading, and
that the fitted UNet really uses its text (the property gate training needs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from maskattn_deploy.errors import ModelLoadError
from maskattn_deploy.models import tiny_fitted
from maskattn_deploy.models.tiny import build_tiny_unet

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_asset_matches_the_tiny_architecture() -> None:
    tensors = tiny_fitted.read_asset()  # also checks the SHA-256 pinned in the module
    unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    assert set(unet) == set(build_tiny_unet().state_dict())
    assert all(v.dtype == torch.float16 for v in unet.values())
    # Text reaches the fitted UNet only through cross-attention: pooled-text columns are zero.
    assert torch.count_nonzero(unet["add_embedding.linear_1.weight"][:, :32]) == 0
    assert torch.count_nonzero(unet["add_embedding.linear_1.weight"][:, 32:]) > 0
    # Near-deterministic VAE posterior: the log-variance half of quant_conv is a constant -20.
    assert torch.all(tensors["vae.quant_conv.bias"][4:] == -20.0)
    assert torch.count_nonzero(tensors["vae.quant_conv.weight"][4:]) == 0


def test_missing_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing .*reinstall"):
        tiny_fitted.read_asset(tmp_path / "absent.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_fitted.ASSET.read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        tiny_fitted.read_asset(truncated)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        tiny_fitted.read_asset(truncated, sha256=None)  # no pinned hash: the parser refuses it
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ModelLoadError, match="expected VAE tensors"):
        tiny_fitted.build_tiny_fitted_pipeline(foreign, sha256=None)


def test_load_pipeline_builds_and_caches_tiny_fitted(tmp_path: Path, monkeypatch) -> None:
    from maskattn_deploy.models import load_pipeline

    monkeypatch.setenv("MASKATTN_DEPLOY_CACHE", str(tmp_path))
    pipe = load_pipeline("tiny-fitted")
    tensors = tiny_fitted.read_asset()
    state = pipe.unet.state_dict()
    assert pipe.unet.dtype == torch.float32
    for key in (
        "conv_in.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    ):
        assert torch.equal(state[key], tensors[f"unet.{key}"].float())
    assert torch.equal(pipe.vae.quant_conv.bias, tensors["vae.quant_conv.bias"])
    assert (tmp_path / f"tiny-sdxl-v1-fitted-{tiny_fitted.ASSET_SHA256[:12]}").is_dir()


@torch.no_grad()
def _heldout_losses(pipe) -> dict[str, float]:
    """Denoising loss on 16 held-out synthetic images (seed 7919, 64 px) with their own
    captions and with the captions rolled by one (each image gets another image's prompt)."""
    from diffusers import DDPMScheduler

    from maskattn_deploy.train.data import prepare_image
    from maskattn_deploy.train.encode import TextEncoders, encode_pixels
    from maskattn_deploy.train.synthetic import SyntheticSource

    n, gen = 16, torch.Generator().manual_seed(123)
    source = SyntheticSource(n, seed=7919, size=64)
    pixels, time_ids = zip(*[prepare_image(source.image(i), 64, 64) for i in range(n)], strict=True)
    mean, _ = encode_pixels(pipe.vae, torch.stack(pixels))
    latents = mean * pipe.vae.config.scaling_factor
    embeds, pooled = TextEncoders.from_pipeline(pipe).encode([source.caption(i) for i in range(n)])
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([int((i + 0.5) * 1000 / n) for i in range(n)])
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
    out = {}
    for name, shift in (("own", 0), ("shuffled", 1)):
        pred = pipe.unet(
            noisy, t, encoder_hidden_states=embeds.roll(shift, 0),
            added_cond_kwargs={"text_embeds": pooled.roll(shift, 0),
                               "time_ids": torch.tensor(time_ids, dtype=torch.float32)},
        ).sample  # fmt: skip
        out[name] = float(((pred - noise) ** 2).mean())
    return out


def test_fitted_unet_uses_its_text_and_the_random_one_does_not() -> None:
    from maskattn_deploy.models.tiny import build_tiny_pipeline

    fitted = _heldout_losses(tiny_fitted.build_tiny_fitted_pipeline())
    plain = _heldout_losses(build_tiny_pipeline())
    # Fitted: another image's caption makes the prediction measurably worse (measured +5.0 %;
    # 4.8 % on 64 images at fit time). Random: -0.19 % measured, under 0.5 % either way.
    assert fitted["shuffled"] > fitted["own"] * 1.015, fitted
    assert abs(plain["shuffled"] / plain["own"] - 1) < 0.005, plain
    assert fitted["own"] < 0.5 * plain["own"]  # and it is a denoiser at all


@pytest.mark.slow
def test_fit_script_writes_a_loadable_asset(tmp_path: Path) -> None:
    """scripts/fit_tiny_backbone.py end to end at toy size (2 steps, 8 images)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fit_tiny", ROOT / "scripts" / "fit_tiny_backbone.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    out = tmp_path / "fitted.safetensors"
    assert (
        module.main(["--steps", "2", "--images", "8", "--vae-images", "8", "--out", str(out)]) == 0
    )
    pipe = tiny_fitted.build_tiny_fitted_pipeline(out, sha256=None)
    assert torch.count_nonzero(pipe.unet.add_embedding.linear_1.weight[:, :32]) == 0
    assert torch.all(pipe.vae.quant_conv.bias[4:] == -20.0)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    shutil.rmtree(tmp_path, ignore_errors=True)
