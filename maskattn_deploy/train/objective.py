"""The training objective: SDXL conditioning, the gated UNet's prediction and its target.

For a batch (the caller's generator supplies every random draw, in this order)::

    drop     ~ U(0, 1) < caption_dropout               per item, drawn even when dropout == 0
    ctx, pooled = text encoders(caption or "")           (or the cached embeddings)
    latents  = (mean + std * eps) * vae_scale            VAE posterior sample        [b, 4, h, w]
    noise, t ~ N(0, I), U{0..T-1}
    pred = UNet(add_noise(latents, noise, t), t, ctx, pooled, time_ids)   gated attn2
    loss = mse(pred, noise | velocity | latents)         per the scheduler's prediction type

Precision: the frozen UNet and text encoders run in the training dtype (bf16/fp16 on CUDA,
fp32 on the CPU) without autocast; the VAE stays fp32; the gate heads and the loss are fp32.
Every UNet call runs in the objective's gate mode (straight-through training by default).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import spec_template
from maskattn_deploy.gating import GateMode, GateSet
from maskattn_deploy.train.data import Batch, collate
from maskattn_deploy.train.encode import TextEncoders, encode_pixels, scale_latents

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class EvalBatch:
    """A fixed batch (fixed latents, noise and timesteps) for comparable losses over a run."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    target: torch.Tensor
    heldout: bool


@dataclass
class DenoisingObjective:
    """The frozen model parts and the noise-prediction loss of gated SDXL.

    ``vae`` / ``text`` become None when a cache makes them unnecessary
    (:meth:`release_encoders`); ``gates`` is set once they are installed on ``unet``.
    ``unet_step`` is the UNet's spec adapter, the very module the exporter traces.
    """

    unet: torch.nn.Module
    unet_step: torch.nn.Module
    vae: torch.nn.Module | None
    vae_config: Any
    text: TextEncoders | None
    noise_scheduler: Any  # diffusers DDPMScheduler
    device: torch.device
    dtype: torch.dtype  # the frozen UNet's and text encoders' dtype
    gates: GateSet | None = None
    gate_mode: GateMode = field(default_factory=GateMode.for_training)
    empty_embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # "" for cached text

    @classmethod
    def load(
        cls, model: str, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool
    ) -> DenoisingObjective:
        """Load ``model`` frozen (no grads, eval mode): UNet/text in ``dtype``, VAE in fp32."""
        from diffusers import DDPMScheduler

        from maskattn_deploy.models import load_pipeline

        pipe = load_pipeline(model, torch_dtype=torch.float32, device="cpu")
        unet = _to(pipe.unet, device, dtype)
        vae = pipe.vae.to(device)  # fp32 always (docs/design.md section 6.4)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            _to(encoder, device, dtype)
        text = TextEncoders.from_pipeline(pipe)
        for module in (unet, vae, *text.encoders):
            module.requires_grad_(False)
            module.eval()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unsupported scheduler prediction type {prediction_type!r}")
        step = spec_template("unet").adapter(unet)
        return cls(unet, step, vae, pipe.vae.config, text, scheduler, device, dtype)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def release_encoders(self, latents_cached: bool, text_cached: bool) -> None:
        """Free the VAE / text encoders that a cache makes unnecessary."""
        assert self.text is not None
        self.empty_embeds = tuple(t[0] for t in self.text.encode([""]))  # type: ignore[assignment]
        if latents_cached:
            self.vae = None
        if text_cached:
            self.text = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def condition(
        self, batch: Batch, generator: torch.Generator, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents fp32, prompt embeds, pooled, time_ids) for a batch; draws from ``generator``."""
        device, b = self.device, len(batch)
        drop = torch.rand(b, generator=generator) < dropout  # drawn even when dropout == 0
        cached = batch.cached or {}
        if "prompt_embeds" in cached:
            embeds, pooled = cached["prompt_embeds"].to(device), cached["pooled"].to(device)
            if drop.any():
                assert self.empty_embeds is not None
                empty_e, empty_p = (t.to(device, embeds.dtype) for t in self.empty_embeds)
                embeds[drop.to(device)] = empty_e
                pooled[drop.to(device)] = empty_p
        else:
            assert self.text is not None
            captions = ["" if d else c for d, c in zip(drop.tolist(), batch.captions, strict=True)]
            embeds, pooled = self.text.encode(captions)
        if "mean" in cached:
            mean, std = cached["mean"].to(device), cached["std"].to(device)
        else:
            assert self.vae is not None and batch.pixels is not None
            mean, std = encode_pixels(self.vae, batch.pixels)
        eps = torch.randn(mean.shape, generator=generator).to(device)
        latents = scale_latents(self.vae_config, mean + std * eps)
        return latents, embeds, pooled, batch.time_ids.to(device)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return latents

    def predict(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The gated UNet's prediction, in the objective's gate mode."""
        dtype = self.dtype
        mode = (
            self.gates.mode(self.gate_mode) if self.gates is not None else contextlib.nullcontext()
        )
        with mode:
            return self.unet_step(
                noisy.to(dtype), t, embeds.to(dtype), pooled.to(dtype), time_ids.to(dtype)
            )

    def loss(self, batch: Batch, generator: torch.Generator, dropout: float) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (fp32 scalar with grad to the gates)."""
        latents, embeds, pooled, time_ids = self.condition(batch, generator, dropout)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        t = torch.randint(0, self.num_train_timesteps, (len(batch),), generator=generator)
        t = t.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.predict(noisy, t, embeds, pooled, time_ids)
        return F.mse_loss(pred.float(), self.target(latents, noise, t).float())

    def eval_batch(self, items: list[Any], seed: int, heldout: bool) -> EvalBatch:
        """Fixed latents, noise and timesteps for ``items`` (from a generator seeded ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        latents, embeds, pooled, time_ids = self.condition(collate(items), gen, 0.0)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        # Timesteps spread evenly over the schedule so the loss covers all noise levels.
        total = self.num_train_timesteps
        spread = [int((i + 0.5) * total / len(items)) for i in range(len(items))]
        t = torch.tensor(spread, dtype=torch.int64, device=self.device)
        return EvalBatch(
            noisy=self.noise_scheduler.add_noise(latents, noise, t),
            timesteps=t,
            embeds=embeds,
            pooled=pooled,
            time_ids=time_ids,
            target=self.target(latents, noise, t).float(),
            heldout=heldout,
        )

    @torch.no_grad()
    def eval_loss(self, e: EvalBatch) -> float:
        """Loss on a fixed evaluation batch (no randomness consumed)."""
        pred = self.predict(e.noisy, e.timesteps, e.embeds, e.pooled, e.time_ids)
        return float(F.mse_loss(pred.float(), e.target))


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a fp32-loaded module; cast only when the training dtype differs."""
    module.to(device)
    return module.to(dtype) if dtype != torch.float32 else module
