"""``tiny-fitted``: the built-in tiny pipeline with a UNet that was fitted to use its text.

The plain ``tiny`` model has random weights: its prediction does not depend on the prompt in a
way that correlates with the noise target, so gate training cannot lower its denoising loss
(all-open and all-closed gates are under 0.1 % apart; see ``tests/test_train_learning.py``).
``tiny-fitted`` is the same architecture, tokenizers and text encoders, with two changes read
from a file shipped in the package (``assets/tiny_fitted.safetensors``, 17 MB):

* ``unet.*`` (fp16): the whole tiny UNet fitted as an epsilon denoiser on 2,048 synthetic
  shapes images (synthetic seed 1, disjoint from the gate recipes' seed-0 set) at 64 px,
  2,600 steps of batch 8, AdamW 1e-3; the pooled-text columns of ``add_embedding`` are zero,
  so text reaches the UNet only through cross-attention, where the gates act. Afterwards,
  shuffling the captions of a held-out batch raises its loss by 4.8 % and closing every gate
  by about 3 %: the model uses its text.
* ``vae.quant_conv.*``, ``vae.post_quant_conv.*`` (fp32): the random tiny VAE's posterior
  std (~1.0 against a mean std of ~0.18) made sampled latents ~97 % noise. The fitted VAE has
  a near-deterministic posterior (log-variance -20) and per-channel normalised latents at
  the usual scaling factor; ``post_quant_conv`` compensates, so decoding is unchanged.

``scripts/fit_tiny_backbone.py`` reproduces the file (about 9 minutes on 2 CPU cores). The
built pipeline is cached on disk like ``tiny`` (keyed by the file's hash).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import ModelLoadError
from maskattn_deploy.utils import sha256_file

log = logging.getLogger(__name__)

TINY_FITTED = "tiny-fitted"
ASSET = Path(__file__).resolve().parent / "assets" / "tiny_fitted.safetensors"
ASSET_SHA256 = "c796273c1912617437452498c89a90d940fd099a422a5524da331fe9a5d3765a"
FORMAT = "maskattn-tiny-fitted-v1"
VAE_KEYS = (
    "quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
)  # fmt: skip


def read_asset(path: Path = ASSET, sha256: str | None = ASSET_SHA256) -> dict[str, torch.Tensor]:
    """The asset's tensors; a missing, truncated or altered file is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "reinstall maskattn-deploy, or rebuild the file with scripts/fit_tiny_backbone.py"
    if not path.is_file():
        raise ModelLoadError(f"the tiny-fitted weights are missing ({path}): {fix}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ModelLoadError(f"{path} is corrupt or truncated (SHA-256 mismatch): {fix}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}): {fix}") from exc


def apply_asset(pipe: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Load the fitted UNet (to fp32) and the VAE's quant convs into a tiny pipeline."""
    unet = {k.removeprefix("unet."): v.float() for k, v in tensors.items() if k.startswith("unet.")}
    vae = {k.removeprefix("vae."): v.float() for k, v in tensors.items() if k.startswith("vae.")}
    if set(vae) != set(VAE_KEYS):
        raise ModelLoadError(
            f"tiny-fitted asset: expected VAE tensors {VAE_KEYS}, got {sorted(vae)}"
        )
    try:
        pipe.unet.load_state_dict(unet, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"tiny-fitted asset does not fit the tiny UNet: {exc}") from exc
    state = pipe.vae.state_dict()
    state.update(vae)
    pipe.vae.load_state_dict(state, strict=True)
    return pipe


def write_asset(pipe: Any, path: Path, metadata: dict[str, str]) -> str:
    """Save a fitted tiny pipeline's UNet (fp16) and VAE quant convs atomically; returns SHA-256."""
    from safetensors.torch import save_file

    from maskattn_deploy.utils import atomic_path

    tensors = {
        f"unet.{k}": v.detach().half().contiguous() for k, v in pipe.unet.state_dict().items()
    }
    vae = pipe.vae.state_dict()
    tensors.update({f"vae.{k}": vae[k].detach().float().contiguous() for k in VAE_KEYS})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, **metadata})
    return sha256_file(path)


def build_tiny_fitted_pipeline(path: Path = ASSET, sha256: str | None = ASSET_SHA256):
    """The tiny pipeline with the fitted UNet and VAE (no network; a few seconds)."""
    from maskattn_deploy.models.tiny import build_tiny_pipeline

    tensors = read_asset(path, sha256)
    return apply_asset(build_tiny_pipeline(), tensors)


def tiny_fitted_pipeline_dir() -> Path:
    """The on-disk cache of the ``tiny-fitted`` pipeline (keyed by the file's hash)."""
    from maskattn_deploy.models.tiny import TINY_VERSION, cached_pipeline_dir

    name = f"{TINY_VERSION}-fitted-{ASSET_SHA256[:12]}"
    return cached_pipeline_dir(name, build_tiny_fitted_pipeline)
