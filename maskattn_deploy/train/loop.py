"""The gate training loop: frozen SDXL, trainable MaskAttn gates, exact resume.

One optimizer step::

    for each of grad_accum micro-batches:             (this process's share of the data)
        loss = objective.loss(batch)                  train/objective.py: conditioning, noise,
                                                      gated UNet, target
        backward (only the gates have requires_grad)
    average gate grads across processes, clip, AdamW step, LR schedule step

Everything random comes from one ``torch.Generator`` per process whose state is checkpointed
together with the data position, so a run stopped at step k and resumed produces the same gate
weights as an uninterrupted run (bit for bit on the CPU in fp32). The run folder is
train/run_dir.py, the optimizer train/optim.py, metrics and the result train/report.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.gating.modes import GateMode
from maskattn_deploy.train.checkpoint import (
    STATE_NAME,
    capture_rng_state,
    read_train_state,
    restore_rng_state,
    write_checkpoint,
)
from maskattn_deploy.train.config import TrainConfig
from maskattn_deploy.train.data import (
    Batch,
    BatchStream,
    DataOptions,
    ImageItemLoader,
    ItemLoader,
    SkipReport,
    SkipSample,
    Source,
    open_source,
)
from maskattn_deploy.train.dist import Runtime, make_runtime, resolve_precision
from maskattn_deploy.train.encode import TextEncoders, encode_pixels
from maskattn_deploy.train.objective import DenoisingObjective, EvalBatch
from maskattn_deploy.train.optim import build_optimization
from maskattn_deploy.train.report import SUMMARY_NAME, MetricsWriter, TrainResult
from maskattn_deploy.train.run_dir import GATES_DIR, check_run_dir, claim_run_dir
from maskattn_deploy.utils import write_json_atomic

logger = logging.getLogger(__name__)


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
        resume_from = check_run_dir(self.out_dir, self.config, resume)
        init = self._read_init_gates(resume_from)
        self.objective = DenoisingObjective.load(
            config.model,
            self.runtime.device,
            self.weight_dtype,
            config.train.gradient_checkpointing,
        )
        # After loading: building a built-in model on first use draws from the global RNG, so
        # seeding first made a run's gates depend on whether the model cache existed.
        self._seed_everything()
        self._install_gates(init, resume_from is not None)
        self._open_data()
        try:
            claim_run_dir(self.out_dir, self.config, self.runtime, resume_from, self._claim)
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

    @property
    def unet(self) -> torch.nn.Module:
        return self.objective.unet

    @property
    def vae(self) -> torch.nn.Module | None:
        return self.objective.vae

    @property
    def text(self) -> TextEncoders | None:
        return self.objective.text

    @property
    def gate_mode(self) -> GateMode:
        """The gate mode of every UNet call of the run (training and evaluation)."""
        return self.objective.gate_mode

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
        self.objective.gates = self.gates
        self.objective.gate_mode = GateMode.for_training(self.config.train.gate_estimator)
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
        vae, text = self.objective.vae, self.objective.text
        assert vae is not None and text is not None
        build_cache(
            plan, self.source, cfg.resolution, self.runtime,
            functools.partial(encode_pixels, vae), text.encode,
            batch=max(1, self.config.train.batch_size), progress=self.config.log.progress,
        )  # fmt: skip
        self._cache_plan = plan
        return CachedItemLoader(plan, self.source, cfg.resolution)

    def _release_cached_encoders(self) -> None:
        """Free the VAE / text encoders when the cache makes them unnecessary."""
        plan = getattr(self, "_cache_plan", None)
        if plan is not None:
            self.objective.release_encoders(plan.latents, plan.text)

    def _build_optimizer(self) -> None:
        optim = build_optimization(
            self.params,
            self.config.optim,
            self.config.train.steps,
            self.runtime.device.type,
            fp16=self.precision == "fp16",
        )
        self.optimizer = optim.optimizer
        self.lr_scheduler = optim.lr_scheduler
        self.scaler = optim.scaler

    def micro_loss(self, batch: Batch) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (fp32 scalar with grad to the gates)."""
        return self.objective.loss(batch, self.generator, self.config.data.caption_dropout)

    # -------------------------------------------------------------------------- evaluate

    def _build_eval_batch(self) -> None:
        """Fixed latents/noise/timesteps: held-out synthetic items, else the first records."""
        n = self.config.log.eval_batch
        self.eval_batch: EvalBatch | None = None
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
        if items:
            seed = self.config.train.seed + 12345
            self.eval_batch = self.objective.eval_batch(items, seed, is_heldout)

    def evaluate(self) -> float | None:
        """Loss on the fixed evaluation batch (no randomness consumed)."""
        return None if self.eval_batch is None else self.objective.eval_loss(self.eval_batch)

    # ------------------------------------------------------------------------------ step

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); returns loss and grad norm."""
        accum = self.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # Backward in the mode too: with gradient checkpointing the UNet recomputes blocks there.
        with self.gates.mode(self.gate_mode):
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
        merged = _merge_skips(skips)
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
            "prediction_type": self.objective.prediction_type,
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
        merged = _merge_skips(rt.gather_object(self.skips.state_dict()))
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


def _merge_skips(parts: list[dict[str, list[str]]]) -> SkipReport:
    """One report from every process's skipped-record state."""
    merged = SkipReport()
    for part in parts:
        other = SkipReport()
        other.load_state_dict(part)
        merged.merge(other)
    return merged


def run_training(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    cpu: bool = False,
) -> TrainResult:
    """Train gates as ``config`` says; the library entry point of ``maskattn-deploy train``."""
    if max_steps is not None:
        from maskattn_deploy.checks import check_int

        check_int("max_steps", max_steps, 1)
    return Trainer(config, out_dir, resume=resume, cpu=cpu).run(max_steps=max_steps)
