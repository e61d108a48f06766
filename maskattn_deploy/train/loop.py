"""The gate training loop: frozen SDXL, trainable MaskAttn gates, exact resume.

One optimizer step::

    for each of grad_accum micro-batches:             (this process's share of the data)
        latents  = (mean + std * eps) * vae_scale      VAE posterior sample        [b, 4, h, w]
        ctx, pooled = text encoders(caption or "")     SDXL conditioning           [b, 77, E]
        noise, t ~ N(0, I), U{0..T-1}                  from the run's generator
        pred = UNet(add_noise(latents, noise, t), t, ctx, pooled, time_ids)   gated attn2
        loss = mse(pred, noise | velocity)             per the scheduler's prediction type
        backward (only the gates have requires_grad)
    average gate grads across processes, clip, AdamW step, LR schedule step

Everything random comes from one ``torch.Generator`` per process whose state is checkpointed
together with the data position, so a run stopped at step k and resumed produces the same gate
weights as an uninterrupted run (bit for bit on the CPU in fp32).

Precision: the frozen UNet and text encoders run in the training dtype (bf16/fp16 on CUDA,
fp32 on the CPU) without autocast; the VAE stays fp32; the gate heads, the loss and the
optimizer are fp32; fp16 uses a gradient scaler.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import spec_template
from maskattn_deploy.gating.modes import GateMode
from maskattn_deploy.train.checkpoint import (
    CHECKPOINTS_DIR,
    STATE_NAME,
    capture_rng_state,
    latest_checkpoint,
    read_train_state,
    restore_rng_state,
    write_checkpoint,
)
from maskattn_deploy.train.config import TrainConfig, config_from_dict, diff_configs
from maskattn_deploy.train.data import (
    Batch,
    BatchStream,
    DataOptions,
    ImageItemLoader,
    ItemLoader,
    SkipReport,
    SkipSample,
    Source,
    collate,
    open_source,
)
from maskattn_deploy.train.dist import Runtime, make_runtime, resolve_precision
from maskattn_deploy.train.encode import TextEncoders, encode_pixels, scale_latents
from maskattn_deploy.utils import write_json_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
GATES_DIR = "gates"
# Settings that may change when a run is resumed (they do not affect the numbers).
RESUME_MUTABLE = ("log", "data.num_workers", "description")


def lr_factor(
    step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` (so the first step already learns), then cosine or
    linear decay from 1 to ``min_ratio`` at ``total``, or constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    out_dir: str
    gates_dir: str
    step: int
    total_steps: int
    complete: bool
    steps_this_run: int
    wall_s: float
    train_s: float
    steps_per_s: float
    images_per_s: float
    loss_first: float | None
    loss_last: float | None
    eval_loss_start: float | None
    eval_loss_end: float | None
    open_start: dict[str, float] = field(default_factory=dict)
    open_end: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    checkpoint: str | None = None
    device: str = "cpu"
    world: int = 1
    precision: str = "no"

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


@dataclass
class _EvalBatch:
    """A fixed batch (fixed latents, noise and timesteps) for comparable losses over a run."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    target: torch.Tensor
    heldout: bool


class MetricsWriter:
    """JSONL metrics in the run folder (appended; flushed per line), TensorBoard if installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_NAME
        self.tb = None
        if enabled and tensorboard:
            from maskattn_deploy._lazy import available

            if available("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            else:
                logger.info("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            for stage, value in record.get("open", {}).items():
                self.tb.add_scalar(f"open/{stage}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Set up a run (model, gates, data, optimizer, resume) and train it.

    ``Trainer(config, out_dir).run()`` is the whole job; tests use the pieces (``evaluate``,
    ``train_step``) directly.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        resume: bool = False,
        runtime: Runtime | None = None,
        cpu: bool = False,
    ) -> None:
        self.t_start = time.perf_counter()
        self.config = config.validate()
        self.out_dir = Path(out_dir)
        self.runtime = runtime or make_runtime(cpu=cpu)
        self.precision, self.weight_dtype = resolve_precision(
            config.train.mixed_precision, self.runtime
        )
        self.grad_accum = config.grad_accum_for(self.runtime.world)
        self.step = 0
        self.images_seen = 0
        self._claim = contextlib.ExitStack()
        # Everything that can be refused is checked before the run folder is written.
        resume_from = self._check_run_dir(resume)
        init = self._read_init_gates(resume_from)
        self._load_model()
        # After loading: building a built-in model on first use draws from the global RNG, so
        # seeding first made a run's gates depend on whether the model cache existed.
        self._seed_everything()
        self._install_gates(init, resume_from is not None)
        self._open_data()
        try:
            self._claim_run_dir(resume_from)
            self._build_data()
            self._build_eval_batch()
            self._release_cached_encoders()
            self._build_optimizer()
            if resume_from is not None:
                self._load_state(resume_from)
        except BaseException:
            self.close()
            raise
        self.metrics = MetricsWriter(self.out_dir, config.log.tensorboard, self.runtime.is_main)

    def close(self) -> None:
        """Release the run folder's write lock (``run`` does it when it ends)."""
        self._claim.close()

    # ----------------------------------------------------------------------------- setup

    def _check_run_dir(self, resume: bool) -> Path | None:
        """Check the run folder (nothing is written); returns the checkpoint to resume from."""
        config_path = self.out_dir / CONFIG_NAME
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"--out {self.out_dir} is a file; choose a folder for the run")
        latest = latest_checkpoint(self.out_dir)
        if resume and latest is not None:
            try:
                saved = config_from_dict(json.loads(config_path.read_text())["config"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(
                    f"cannot resume: {config_path} is missing or unreadable ({exc}); it records "
                    "the run's settings"
                ) from exc
            changes = diff_configs(saved, self.config, ignore=RESUME_MUTABLE)
            if changes:
                raise UserError(
                    f"--resume needs the settings of the run in {self.out_dir}; changed: "
                    f"{'; '.join(changes)}. Start a new run with gates.init={self.out_dir / GATES_DIR} "
                    "to continue these gates under new settings"
                )
            logger.info("resuming from %s", latest)
            return latest
        if resume:
            logger.warning("no checkpoint in %s: starting a new run", self.out_dir)
        elif config_path.exists() or latest is not None:
            raise UserError(
                f"{self.out_dir} already holds a training run: pass --resume to continue it, "
                "or choose another --out"
            )
        return None

    def _claim_run_dir(self, resume_from: Path | None) -> None:
        """Lock the run folder, remove temp files of killed runs, record the settings."""
        from maskattn_deploy.locks import output_lock, remove_stale_temps

        self.runtime.barrier()  # every process has checked before the main one writes
        if self.runtime.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create {self.out_dir}: {exc.strerror}") from exc
            self._claim.enter_context(output_lock(self.out_dir))
            for folder in (self.out_dir, self.out_dir / CHECKPOINTS_DIR, self.out_dir / GATES_DIR):
                remove_stale_temps(folder)
            if resume_from is None:
                write_json_atomic(
                    self.out_dir / CONFIG_NAME, {"config": self.config.to_dict(), **_versions()}
                )
        self.runtime.barrier()

    def _seed_everything(self) -> None:
        seed = self.config.train.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        # The run's own stream of randomness (noise, timesteps, dropout, latent samples).
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + self.runtime.rank)
        if self.runtime.device.type == "cuda" and self.config.train.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _load_model(self) -> None:
        from diffusers import DDPMScheduler

        from maskattn_deploy.models import load_pipeline

        device = self.runtime.device
        pipe = load_pipeline(self.config.model, torch_dtype=torch.float32, device="cpu")
        self.unet = _to(pipe.unet, device, self.weight_dtype)
        # The UNet's spec adapter: the very module the exporter traces.
        self.unet_step = spec_template("unet").adapter(self.unet)
        # The VAE stays fp32 always (docs/design.md section 6.4).
        self.vae: torch.nn.Module | None = pipe.vae.to(device)
        self.vae_config = pipe.vae.config
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            _to(encoder, device, self.weight_dtype)
        self.text: TextEncoders | None = TextEncoders.from_pipeline(pipe)
        for module in (self.unet, self.vae, *self.text.encoders):
            module.requires_grad_(False)
            module.eval()
        if self.config.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"unsupported scheduler prediction type {self.prediction_type!r}")
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)

    def _read_init_gates(self, resume_from: Path | None) -> Any:
        """The gate checkpoint to start from (resume, or ``gates.init``), read and checked."""
        from maskattn_deploy.gating.checkpoint import read_checkpoint

        if resume_from is not None:
            return read_checkpoint(resume_from)
        if not self.config.gates.init:
            return None
        return read_checkpoint(Path(self.config.gates.init))

    def _install_gates(self, init: Any, resuming: bool) -> None:
        from maskattn_deploy.gating import install_gates
        from maskattn_deploy.gating.checkpoint import load_gates

        if init is not None:
            wanted = self.config.gate_config()
            if not resuming and init.config != wanted:
                logger.warning(
                    "gates.init %s has gate config %s; it is used instead of the recipe's %s",
                    self.config.gates.init, init.config.to_dict(), wanted.to_dict(),
                )  # fmt: skip
            self.gates = load_gates(init, self.unet)
        else:
            self.gates = install_gates(self.unet, self.config.gate_config())
        # Every UNet call of the run (training and evaluation) is in this mode: see _unet.
        self.gate_mode = GateMode.for_training(self.config.train.gate_estimator)
        self.gates.train()
        self.params = list(self.gates.parameters())
        for param in self.params:
            param.requires_grad_(True)
        self.runtime.broadcast_(self.params)  # every process starts from rank 0's gates

    def _open_data(self) -> None:
        cfg = self.config.data
        self.skips = SkipReport()
        options = DataOptions(
            multi_object_only=cfg.multi_object_only,
            min_objects=cfg.min_objects,
            caption_filter=cfg.caption_filter,
            limit=cfg.limit,
            synthetic_size=cfg.resolution,
        )
        self.source: Source = open_source(cfg.spec, options, self.skips)

    def _build_data(self) -> None:
        cfg = self.config.data
        loader: ItemLoader = ImageItemLoader(self.source, cfg.resolution)
        workers = cfg.num_workers
        if cfg.cache != "off":
            loader = self._build_cache()
            workers = 0 if self._cache_plan.latents else workers
        self.loader = loader
        self.stream = BatchStream(
            loader,
            self.config.train.seed,
            self.skips,
            self.runtime.rank,
            self.runtime.world,
            workers,
        )
        logger.info("data: %s (%d records)", self.source.description, len(self.source))

    def _build_cache(self) -> ItemLoader:
        from maskattn_deploy.train.cache import CachedItemLoader, CachePlan, build_cache, cache_key

        cfg = self.config.data
        folder = Path(cfg.cache_dir) if cfg.cache_dir else self.out_dir / "cache"
        extra = {
            "dtype": str(self.weight_dtype),
            "filter": [cfg.multi_object_only, cfg.min_objects],
        }
        plan = CachePlan(
            folder=folder,
            latents=cfg.cache in ("latents", "all"),
            text=cfg.cache in ("text", "all"),
            key=cache_key(self.config.model, cfg.resolution, self.source, extra),
        )
        assert self.vae is not None and self.text is not None
        build_cache(
            plan, self.source, cfg.resolution, self.runtime,
            functools.partial(encode_pixels, self.vae), self.text.encode,
            batch=max(1, self.config.train.batch_size), progress=self.config.log.progress,
        )  # fmt: skip
        self._cache_plan = plan
        return CachedItemLoader(plan, self.source, cfg.resolution)

    def _release_cached_encoders(self) -> None:
        """Free the VAE / text encoders when the cache makes them unnecessary."""
        plan = getattr(self, "_cache_plan", None)
        if plan is None:
            return
        assert self.text is not None
        self.empty_embeds = tuple(t[0] for t in self.text.encode([""]))
        if plan.latents:
            self.vae = None
        if plan.text:
            self.text = None
        gc.collect()
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()

    def _build_optimizer(self) -> None:
        o = self.config.optim
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=o.lr,
            betas=(o.betas[0], o.betas[1]),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        factor = functools.partial(
            lr_factor,
            warmup=o.warmup_steps,
            total=self.config.train.steps,
            schedule=o.schedule,
            min_ratio=o.min_lr_ratio,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(
            self.runtime.device.type, enabled=self.precision == "fp16"
        )

    # ---------------------------------------------------------------------- conditioning

    def _condition(
        self, batch: Batch, generator: torch.Generator, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents fp32, prompt embeds, pooled, time_ids) for a batch; draws from ``generator``."""
        device, b = self.runtime.device, len(batch)
        drop = torch.rand(b, generator=generator) < dropout  # drawn even when dropout == 0
        cached = batch.cached or {}
        if "prompt_embeds" in cached:
            embeds, pooled = cached["prompt_embeds"].to(device), cached["pooled"].to(device)
            if drop.any():
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

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return latents

    def _unet(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        dtype = self.weight_dtype
        with self.gates.mode(self.gate_mode):
            return self.unet_step(
                noisy.to(dtype), t, embeds.to(dtype), pooled.to(dtype), time_ids.to(dtype)
            )

    def micro_loss(self, batch: Batch) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (fp32 scalar with grad to the gates)."""
        device = self.runtime.device
        latents, embeds, pooled, time_ids = self._condition(
            batch, self.generator, self.config.data.caption_dropout
        )
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        t = torch.randint(0, self.num_train_timesteps, (len(batch),), generator=self.generator)
        t = t.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self._unet(noisy, t, embeds, pooled, time_ids)
        return F.mse_loss(pred.float(), self._target(latents, noise, t).float())

    # -------------------------------------------------------------------------- evaluate

    def _build_eval_batch(self) -> None:
        """Fixed latents/noise/timesteps: held-out synthetic items, else the first records."""
        n = self.config.log.eval_batch
        self.eval_batch: _EvalBatch | None = None
        if n <= 0:
            return
        heldout = getattr(self.source, "heldout", None)
        uses_cache = getattr(self, "_cache_plan", None) is not None and self._cache_plan.latents
        if callable(heldout) and not uses_cache:
            items_loader: ItemLoader = ImageItemLoader(heldout(n), self.config.data.resolution)
            is_heldout = True
        else:
            items_loader, is_heldout = self.loader, False
        items = []
        for index in range(len(items_loader)):
            if len(items) == n:
                break
            try:
                items.append(items_loader.load(index))
            except SkipSample as exc:
                self.skips.add(exc.reason, items_loader.key(index), exc.detail)
        if not items:
            return
        gen = torch.Generator().manual_seed(self.config.train.seed + 12345)
        batch = collate(items)
        latents, embeds, pooled, time_ids = self._condition(batch, gen, 0.0)
        noise = torch.randn(latents.shape, generator=gen).to(self.runtime.device)
        # Timesteps spread evenly over the schedule so the loss covers all noise levels.
        spread = [int((i + 0.5) * self.num_train_timesteps / len(items)) for i in range(len(items))]
        t = torch.tensor(spread, dtype=torch.int64, device=self.runtime.device)
        self.eval_batch = _EvalBatch(
            noisy=self.noise_scheduler.add_noise(latents, noise, t),
            timesteps=t,
            embeds=embeds,
            pooled=pooled,
            time_ids=time_ids,
            target=self._target(latents, noise, t).float(),
            heldout=is_heldout,
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Loss on the fixed evaluation batch (no randomness consumed)."""
        e = self.eval_batch
        if e is None:
            return None
        pred = self._unet(e.noisy, e.timesteps, e.embeds, e.pooled, e.time_ids)
        return float(F.mse_loss(pred.float(), e.target))

    # ------------------------------------------------------------------------------ step

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); returns loss and grad norm."""
        accum = self.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            batch = self.stream.next_batch(self.config.train.batch_size)
            loss = self.micro_loss(batch)
            self.scaler.scale(loss / accum).backward()
            total += float(loss.detach())
        for param in self.params:
            if param.grad is None:  # a head unused this step: keep the all-reduce aligned
                param.grad = torch.zeros_like(param)
        self.runtime.all_reduce_mean_([p.grad for p in self.params])  # type: ignore[misc]
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.step += 1
        self.images_seen += accum * self.config.train.batch_size * self.runtime.world
        return {"loss": total / accum, "grad_norm": float(norm), "lr": lr}

    # ------------------------------------------------------------------------ checkpoints

    def _position(self) -> dict[str, Any]:
        """This process's random and data position (captured between optimizer steps)."""
        return {
            "generator": self.generator.get_state(),
            "data": self.stream.state_dict(),
            "rng": capture_rng_state(),
        }

    def save_checkpoint(self, position: dict[str, Any] | None = None) -> Path | None:
        """Collective: every process contributes its position; the main one writes."""
        from maskattn_deploy.gating.checkpoint import save_gates

        positions = self.runtime.gather_object(position or self._position())
        skips = self.runtime.gather_object(self.skips.state_dict())
        if not self.runtime.is_main:
            self.runtime.barrier()
            return None
        merged = SkipReport()
        for part in skips:
            other = SkipReport()
            other.load_state_dict(part)
            merged.merge(other)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "world": self.runtime.world,
            "images_seen": self.images_seen,
            "skipped": merged.state_dict(),
            "positions": positions,
        }
        meta = self._gate_metadata(complete=False)
        path = write_checkpoint(
            self.out_dir,
            self.step,
            state,
            lambda folder: save_gates(self.gates, self.unet, folder, step=self.step, metadata=meta),
            keep=self.config.log.keep_checkpoints,
        )
        self.runtime.barrier()
        return path

    def _load_state(self, folder: Path) -> None:
        state = read_train_state(folder)
        try:
            self._restore(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            detail = f"no field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise UserError(
                f"{folder / STATE_NAME} does not fit this run ({detail}); delete this "
                "checkpoint folder to resume from the previous one"
            ) from exc

    def _restore(self, state: dict[str, Any]) -> None:
        positions = state["positions"]
        self.step = int(state["step"])
        self.images_seen = int(state.get("images_seen", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.skips.load_state_dict(state.get("skipped", {}))
        if int(state["world"]) == self.runtime.world:
            mine = positions[self.runtime.rank]
            self.generator.set_state(mine["generator"])
            self.stream.load_state_dict(mine["data"])
            restore_rng_state(mine["rng"])
        else:
            logger.warning(
                "checkpoint was written by %s processes, this run has %d: data order and noise "
                "continue approximately, not exactly", state["world"], self.runtime.world,
            )  # fmt: skip
            first = positions[0]["data"]
            scaled = first["position"] * int(state["world"]) // self.runtime.world
            self.stream.load_state_dict({"epoch": first["epoch"], "position": scaled})
            self.generator.manual_seed(
                self.config.train.seed * 1_000_003 + self.runtime.rank + self.step
            )
        if self.step >= self.config.train.steps:
            logger.info("the run in %s already finished its %d steps", self.out_dir, self.step)

    def _gate_metadata(self, complete: bool, **extra: Any) -> dict[str, Any]:
        cfg = self.config
        return {
            "trained_by": "maskattn-deploy train",
            "recipe": cfg.name,
            "model": cfg.model,
            "data": cfg.data.spec,
            "resolution": cfg.data.resolution,
            "steps": self.step,
            "total_steps": cfg.train.steps,
            "complete": complete,
            "effective_batch": cfg.train.batch_size * self.grad_accum * self.runtime.world,
            "lr": cfg.optim.lr,
            "precision": self.precision,
            "prediction_type": self.prediction_type,
            "config": cfg.to_dict(),
            **extra,
        }

    # ------------------------------------------------------------------------------ run

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``max_steps``, a stop point that keeps the schedule)."""
        try:
            return self._run(max_steps)
        finally:
            self.close()

    def _run(self, max_steps: int | None) -> TrainResult:
        cfg, rt = self.config, self.runtime
        stop = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
        eval_start = self.evaluate() if rt.is_main else None
        open_start = self.gates.open_fractions()
        self.metrics.write(
            {"event": "start", "step": self.step, "eval_loss": eval_start, "open": open_start,
             "device": str(rt.device), "world": rt.world, "precision": self.precision,
             "data": self.source.description, "records": len(self.source)}
        )  # fmt: skip
        from tqdm.auto import tqdm

        bar = tqdm(
            total=stop, initial=self.step, desc="training gates", unit="step", dynamic_ncols=True,
            disable=not (rt.is_main and cfg.log.progress),
        )  # fmt: skip
        start_step, losses, window_t, window_step = self.step, [], time.perf_counter(), self.step
        first_loss: float | None = None
        self._last_loss: float | None = None
        last_ckpt: Path | None = None
        t_loop = time.perf_counter()
        try:
            while self.step < stop:
                position = self._position()
                try:
                    stats = self.train_step()
                except KeyboardInterrupt:
                    logger.warning("interrupted: saving the state before step %d", self.step + 1)
                    self.save_checkpoint(position)
                    raise
                first_loss = stats["loss"] if first_loss is None else first_loss
                self._last_loss = stats["loss"]
                losses.append(stats["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                if self.step % cfg.log.every == 0 or self.step == stop:
                    now = time.perf_counter()
                    record = self._log_record(
                        stats, losses, now - window_t, self.step - window_step
                    )
                    losses, window_t, window_step = [], now, self.step
                    if cfg.log.eval_every and self.step % cfg.log.eval_every == 0 and rt.is_main:
                        record["eval_loss"] = self.evaluate()
                    self.metrics.write(record)
                every = cfg.log.checkpoint_every
                if (every and self.step % every == 0) or self.step == stop:
                    last_ckpt = self.save_checkpoint()
        finally:
            bar.close()
        train_s = time.perf_counter() - t_loop
        return self._finish(
            start_step, first_loss, self._last_loss, eval_start, open_start, train_s, last_ckpt
        )

    def _log_record(
        self, stats: dict[str, float], losses: list[float], seconds: float, steps: int
    ) -> dict[str, Any]:
        images = steps * self.config.train.batch_size * self.grad_accum * self.runtime.world
        return {
            "step": self.step,
            "epoch": self.stream.epoch,
            "loss": self.runtime.mean(sum(losses) / max(1, len(losses))),
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "open": self.gates.open_fractions(),
            "steps_per_s": steps / seconds if seconds > 0 else None,
            "images_per_s": images / seconds if seconds > 0 else None,
            "skipped": self.skips.total,
        }

    def _finish(
        self,
        start_step: int,
        first_loss: float | None,
        last_loss: float | None,
        eval_start: float | None,
        open_start: dict[str, float],
        train_s: float,
        checkpoint: Path | None,
    ) -> TrainResult:
        from maskattn_deploy.gating.checkpoint import save_gates

        rt = self.runtime
        eval_end = self.evaluate() if rt.is_main else None
        open_end = self.gates.open_fractions()
        merged = SkipReport()
        for part in rt.gather_object(self.skips.state_dict()):
            other = SkipReport()
            other.load_state_dict(part)
            merged.merge(other)
        complete = self.step >= self.config.train.steps
        gates_dir = self.out_dir / GATES_DIR
        steps = self.step - start_step
        images = steps * self.config.train.batch_size * self.grad_accum * rt.world
        result = TrainResult(
            out_dir=str(self.out_dir),
            gates_dir=str(gates_dir),
            step=self.step,
            total_steps=self.config.train.steps,
            complete=complete,
            steps_this_run=steps,
            wall_s=time.perf_counter() - self.t_start,
            train_s=train_s,
            steps_per_s=steps / train_s if train_s > 0 else 0.0,
            images_per_s=images / train_s if train_s > 0 else 0.0,
            loss_first=first_loss,
            loss_last=last_loss,
            eval_loss_start=eval_start,
            eval_loss_end=eval_end,
            open_start=open_start,
            open_end=open_end,
            skipped=merged.counts(),
            checkpoint=str(checkpoint) if checkpoint else None,
            device=str(rt.device),
            world=rt.world,
            precision=self.precision,
        )
        if rt.is_main:
            meta = self._gate_metadata(
                complete,
                loss=last_loss,
                eval_loss=eval_end,
                skipped=merged.counts(),
                steps_per_s=result.steps_per_s,
            )
            save_gates(self.gates, self.unet, gates_dir, step=self.step, metadata=meta)
            self.metrics.write({"event": "end", **asdict(result)})
            write_json_atomic(self.out_dir / SUMMARY_NAME, asdict(result))
        self.metrics.close()
        self.stream.close()
        rt.barrier()
        return result


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a fp32-loaded module; cast only when the training dtype differs."""
    module.to(device)
    return module.to(dtype) if dtype != torch.float32 else module


def _versions() -> dict[str, Any]:
    import platform

    import diffusers

    import maskattn_deploy

    return {
        "versions": {
            "maskattn_deploy": getattr(maskattn_deploy, "__version__", "unknown"),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        }
    }


def run_training(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    cpu: bool = False,
) -> TrainResult:
    """Train gates as ``config`` says; the library entry point of ``maskattn-deploy train``."""
    return Trainer(config, out_dir, resume=resume, cpu=cpu).run(max_steps=max_steps)
