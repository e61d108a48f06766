"""The served SDXL pipeline: prompt in, latents and images out, on any backend.

It does what ``diffusers.StableDiffusionXLPipeline`` does for text-to-image, step for step, but
calls every network through a :class:`~maskattn_deploy.runtime.base.Backend` with the export's
component contract:

1. both CLIP tokenizers (77 tokens; longer prompts are truncated with a warning naming how many
   tokens were dropped) and both text encoders (penultimate hidden states, concatenated; the
   second encoder's pooled projection);
2. classifier-free guidance with the negative prompt; an empty negative prompt becomes zero
   embeddings when the model sets ``force_zeros_for_empty_prompt`` (SDXL base does);
3. SDXL micro-conditioning: ``time_ids = (h, w, 0, 0, h, w)`` for both CFG halves;
4. initial latents drawn on the CPU from ``torch.Generator('cpu').manual_seed(seed)`` (the same
   generator then feeds ancestral samplers), so every backend starts from the same noise;
5. a diffusers scheduler (:mod:`~maskattn_deploy.runtime.schedulers`), the UNet on the backend,
   the fp32 VAE decoder and diffusers' image post-processing.

Per-stage wall-clock timings are measured with the backend synchronised at stage boundaries.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from maskattn_deploy.checks import check_int, is_int
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import LATENT_FACTOR
from maskattn_deploy.runtime.base import Backend
from maskattn_deploy.runtime.batching import RowLayout, check_same_key, unet_rows
from maskattn_deploy.runtime.limits import (
    MAX_STEPS,
    check_request,
    check_size,
    out_of_memory_as_error,
)
from maskattn_deploy.runtime.masks import MaskAccumulator, token_labels
from maskattn_deploy.runtime.model_info import ModelInfo
from maskattn_deploy.runtime.schedulers import SCHEDULERS, make_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """One generation request (sizes in pixels; None means the model's default size)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 8
    guidance: float = 5.0
    scheduler: str = "euler"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise UserError("prompt and negative_prompt must be text", params=("prompt",))
        check_request(
            self.steps, self.guidance, self.seed, self.num_images, self.height, self.width
        )

    @property
    def do_cfg(self) -> bool:
        return self.guidance > 1.0


@dataclass
class Timings:
    """Wall-clock seconds per stage of one generation."""

    text_encoders_s: float = 0.0
    unet_steps_s: list[float] = field(default_factory=list)
    vae_s: float = 0.0
    total_s: float = 0.0
    warmup_s: float | None = None

    @property
    def unet_total_s(self) -> float:
        return sum(self.unet_steps_s)

    @property
    def unet_per_step_s(self) -> float:
        return self.unet_total_s / max(len(self.unet_steps_s), 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unet_total_s"] = self.unet_total_s
        data["unet_per_step_s"] = self.unet_per_step_s
        return data

    def table(self) -> str:
        """A short aligned table (milliseconds) for the terminal."""
        rows = [
            ("text encoders", self.text_encoders_s),
            (f"UNet total ({len(self.unet_steps_s)} steps)", self.unet_total_s),
            ("UNet per step", self.unet_per_step_s),
            ("VAE decode", self.vae_s),
            ("end to end", self.total_s),
        ]
        if self.warmup_s is not None:
            rows.append(("warm-up run (not counted)", self.warmup_s))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'stage':<{width}}  {'ms':>10}"]
        lines += [f"{name:<{width}}  {seconds * 1e3:>10.1f}" for name, seconds in rows]
        return "\n".join(lines)


@dataclass
class GenerateResult:
    """Everything one generation produced."""

    config: GenerateConfig
    images: list[Any]  # PIL images
    latents: torch.Tensor  # final latents [N, 4, h, w], fp32, CPU (before VAE scaling)
    initial_latents: torch.Tensor  # the seeded noise [N, 4, h, w], fp32, CPU (unscaled)
    pixels: torch.Tensor  # VAE output [N, 3, H, W] in [-1, 1], fp32, CPU
    timings: Timings
    settings: dict[str, Any]
    token_labels: list[str]
    masks: dict[str, torch.Tensor] | None = None  # stage -> [N, t, h, w] open fractions
    warnings: list[str] = field(default_factory=list)
    # gated layer -> fraction of open (latent cell, token) gate entries over the conditional
    # rows and every UNet evaluation (generate_batch(gate_stats=True))
    gate_open: dict[str, float] | None = None
    batch_size: int = 1  # requests that shared this result's UNet calls


@dataclass
class _Conditioning:
    embeds: torch.Tensor  # [rows, 77, E]
    pooled: torch.Tensor  # [rows, P]
    time_ids: torch.Tensor  # [rows, 6]
    prompt_ids: list[int]


@dataclass
class _Request:
    """One request's state while its batch runs."""

    config: GenerateConfig
    cond: _Conditioning
    scheduler: Any
    noise: torch.Tensor  # seeded initial noise, CPU fp32, unscaled
    latents: torch.Tensor
    step_kwargs: dict[str, Any]


def _uncond(rows: torch.Tensor, config: GenerateConfig) -> torch.Tensor | None:
    """The unconditional half of a request's conditioning rows (None without guidance)."""
    return rows[: config.num_images] if config.do_cfg else None


class Pipeline:
    """SDXL text-to-image over a backend; see the module docstring for the steps."""

    def __init__(self, backend: Backend, info: ModelInfo) -> None:
        self.backend = backend
        self.info = info

    # ------------------------------------------------------------------ checks

    def resolve(self, config: GenerateConfig) -> GenerateConfig:
        """Fill default sizes and refuse what cannot run, with one-line errors."""
        if not config.prompt or not config.prompt.strip():
            raise UserError("the prompt is empty; pass a text prompt, e.g. 'a red square'")
        if config.scheduler not in SCHEDULERS:
            raise UserError(
                f"unknown scheduler {config.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        timesteps = self.info.scheduler_config.get("num_train_timesteps", MAX_STEPS)
        if is_int(timesteps):
            check_int("steps", config.steps, 1, timesteps, hint=" (the scheduler's timesteps)")
        height = config.height or self.info.default_size[0]
        width = config.width or self.info.default_size[1]
        for name, value, allowed in (
            ("height", height, self.info.height_range),
            ("width", width, self.info.width_range),
        ):
            check_size(name, value, allowed)
            if value % self.info.size_multiple:
                raise UserError(
                    f"{name} {value} must be a multiple of {self.info.size_multiple} px for this "
                    "model (latent factor x the UNet's downsampling)",
                    params=(name,),
                )
        rows = config.num_images * (2 if config.do_cfg else 1)
        if (
            self.info.batch_range
            and not self.info.batch_range[0] <= rows <= self.info.batch_range[1]
        ):
            low, high = self.info.batch_range
            raise UserError(
                f"{config.num_images} image(s){' with guidance' if config.do_cfg else ''} need "
                f"UNet batch {rows}, but the export accepts batch {low}..{high}; lower "
                "--num-images or re-export with a recipe that allows a larger batch"
            )
        return replace(config, height=height, width=width)

    # ------------------------------------------------------------------ stages

    def _tokenize(self, tokenizer: Any, text: str, what: str, warn: list[str]) -> torch.Tensor:
        limit = tokenizer.model_max_length
        full = tokenizer(text, truncation=False, verbose=False).input_ids
        dropped = len(full) - limit
        if dropped > 0:
            message = (
                f"the {what} has {len(full)} tokens but CLIP reads {limit} (start and end "
                f"included): the last {dropped} token(s) were dropped"
            )
            if message not in warn:
                log.warning(message)
                warn.append(message)
        ids = tokenizer(
            text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(torch.long)  # [1, 77]

    def _encode(
        self, text: str, what: str, warn: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """[1, 77, E1+E2] penultimate hidden states of both encoders, [1, P] pooled, the ids."""
        ids_1 = self._tokenize(self.info.tokenizer, text, what, warn)
        ids_2 = self._tokenize(self.info.tokenizer_2, text, what, warn)
        if self.info.text_states is None:
            raise UserError("this model has no text encoders to run; export the whole pipeline")
        state_1, state_2 = self.info.text_states
        out_1 = self.backend.run("text_encoder", {"input_ids": ids_1})
        out_2 = self.backend.run("text_encoder_2", {"input_ids": ids_2})
        device = self.backend.device
        hidden = torch.cat(
            [out_1[state_1].to(device).float(), out_2[state_2].to(device).float()], dim=-1
        )
        return hidden, out_2["text_embeds"].to(device).float(), ids_1[0].tolist()

    def _condition(self, config: GenerateConfig, warn: list[str]) -> _Conditioning:
        embeds, pooled, ids = self._encode(config.prompt, "prompt", warn)
        n = config.num_images
        embeds, pooled = embeds.repeat(n, 1, 1), pooled.repeat(n, 1)
        time_ids = torch.tensor(
            [[config.height, config.width, 0, 0, config.height, config.width]],
            dtype=torch.float32,
            device=self.backend.device,
        ).repeat(n, 1)
        if config.do_cfg:
            negative = config.negative_prompt or ""
            if not negative.strip() and self.info.force_zeros_for_empty_prompt:
                neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg_embeds, neg_pooled, _ = self._encode(negative, "negative prompt", warn)
                neg_embeds, neg_pooled = neg_embeds.repeat(n, 1, 1), neg_pooled.repeat(n, 1)
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return _Conditioning(embeds, pooled, time_ids, ids)

    def initial_latents(self, config: GenerateConfig) -> tuple[torch.Tensor, torch.Generator]:
        """The seeded noise (CPU, fp32, unscaled) and the generator, advanced past it."""
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator("cpu").manual_seed(config.seed)
        shape = (
            config.num_images,
            self.info.latent_channels,
            config.height // LATENT_FACTOR,
            config.width // LATENT_FACTOR,
        )
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"))
        return noise.float(), generator

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        info = self.info
        if info.vae_latents_mean is not None and info.vae_latents_std is not None:
            mean = torch.tensor(info.vae_latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(info.vae_latents_std).view(1, -1, 1, 1).to(latents)
            scaled = latents * std / info.vae_scaling_factor + mean
        else:
            scaled = latents / info.vae_scaling_factor
        step = self.max_rows or scaled.shape[0]
        chunks = [
            self.backend.run("vae_decoder", {"latent_sample": scaled[i : i + step]})["sample"]
            for i in range(0, scaled.shape[0], step)
        ]
        return torch.cat([out.float().cpu() for out in chunks])

    # ------------------------------------------------------------------ run

    def generate(
        self,
        config: GenerateConfig,
        progress: bool = True,
        record_masks: bool = False,
        warmup: bool = False,
    ) -> GenerateResult:
        """Run one generation; ``warmup`` first runs a 2-step pass with the same shapes."""
        config = self.resolve(config)
        warmup_s = None
        with out_of_memory_as_error([config], self.backend.device):
            if warmup:
                start = time.perf_counter()
                self._run([replace(config, steps=min(config.steps, 2))], False, False, False)
                warmup_s = time.perf_counter() - start
            result = self._run([config], progress, record_masks, False)[0]
        result.timings.warmup_s = warmup_s
        return result

    @property
    def max_rows(self) -> int | None:
        """Most UNet rows one call may take (the export's batch range; None: no limit)."""
        return self.info.batch_range[1] if self.info.batch_range else None

    def generate_batch(
        self,
        configs: Sequence[GenerateConfig],
        progress: bool = False,
        record_masks: bool = False,
        gate_stats: bool = False,
    ) -> list[GenerateResult]:
        """Run requests that share a :func:`~maskattn_deploy.runtime.batching.batch_key` together.

        One UNet call per step serves all of them (see :mod:`maskattn_deploy.runtime.batching`);
        each request keeps its own prompt, seed, guidance scale and scheduler, and gets its own
        result. ``gate_stats`` fills each result's per-layer open-gate fractions,
        ``record_masks`` its per-stage mask maps. Use
        :func:`~maskattn_deploy.runtime.batching.plan_batches` to split mixed requests.
        """
        if not configs:
            return []
        resolved = [self.resolve(config) for config in configs]
        check_same_key(resolved)
        rows = sum(unet_rows(config) for config in resolved)
        if self.max_rows is not None and rows > self.max_rows:
            raise UserError(
                f"{len(resolved)} requests need UNet batch {rows}, but the export accepts at "
                f"most {self.max_rows}; split them with plan_batches(configs, pipeline.max_rows)"
            )
        with out_of_memory_as_error(resolved, self.backend.device):
            return self._run(resolved, progress, record_masks, gate_stats)

    def _mask_context(self, record: bool) -> contextlib.AbstractContextManager[Any]:
        if not record:
            return contextlib.nullcontext(None)
        recording = getattr(self.backend, "recording", None)
        if recording is None:
            raise UserError(
                "masks can only be recorded on the torch backend with gates installed "
                "(drop --no-gates, or record them with a torch reference pass)"
            )
        return recording()

    def _prepare(self, config: GenerateConfig, warn: list[str]) -> _Request:
        """Conditioning, scheduler, seeded latents and step arguments of one request."""
        cond = self._condition(config, warn)
        scheduler = make_scheduler(config.scheduler, self.info.scheduler_config)
        scheduler.set_timesteps(config.steps, device=self.backend.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        noise, generator = self.initial_latents(config)
        latents = noise.to(self.backend.device) * scheduler.init_noise_sigma
        return _Request(config, cond, scheduler, noise, latents, _step_kwargs(scheduler, generator))

    def _run(
        self,
        configs: list[GenerateConfig],
        progress: bool,
        record_masks: bool,
        gate_stats: bool,
    ) -> list[GenerateResult]:
        warns: list[list[str]] = [[] for _ in configs]
        timings = Timings()
        start = time.perf_counter()
        requests = [self._prepare(c, w) for c, w in zip(configs, warns, strict=True)]
        self.backend.synchronize()
        timings.text_encoders_s = time.perf_counter() - start
        layout = RowLayout.of([c.num_images for c in configs], [c.do_cfg for c in configs])
        accumulator = None
        with self._mask_context(record_masks or gate_stats) as records:
            if records is not None:
                first = configs[0]
                hw = (first.height // LATENT_FACTOR, first.width // LATENT_FACTOR)
                accumulator = MaskAccumulator(
                    self.backend.stage_of, hw, layout.cond_rows, spatial=record_masks
                )
            steps = range(len(requests[0].scheduler.timesteps))
            for index in _progress(steps, progress, self.backend.name):
                step_start = time.perf_counter()
                self._step(requests, layout, index)
                self.backend.synchronize()
                timings.unet_steps_s.append(time.perf_counter() - step_start)
                if accumulator is not None:
                    accumulator.drain(records)

        vae_start = time.perf_counter()
        pixels = self._decode(torch.cat([r.latents for r in requests]))
        self.backend.synchronize()
        timings.vae_s = time.perf_counter() - vae_start
        images = _postprocess(pixels)
        timings.total_s = time.perf_counter() - start
        return self._results(requests, layout, warns, timings, pixels, images, accumulator)

    def _results(
        self,
        requests: list[_Request],
        layout: RowLayout,
        warns: list[list[str]],
        timings: Timings,
        pixels: torch.Tensor,
        images: list[Any],
        accumulator: MaskAccumulator | None,
    ) -> list[GenerateResult]:
        """Split the batch's outputs into one result per request (rows in request order)."""
        results = []
        offset = 0
        masks = accumulator.fractions() if accumulator is not None and accumulator.spatial else None
        layers = accumulator.layer_fractions() if accumulator is not None else None
        for request, rows, warn in zip(requests, layout.cond_slices_from_end(), warns, strict=True):
            config, n = request.config, request.config.num_images
            results.append(
                GenerateResult(
                    config=config,
                    images=images[offset : offset + n],
                    latents=request.latents.float().cpu(),
                    initial_latents=request.noise,
                    pixels=pixels[offset : offset + n],
                    timings=replace(timings, unet_steps_s=list(timings.unet_steps_s)),
                    settings=self.settings(config),
                    token_labels=token_labels(self.info.tokenizer, request.cond.prompt_ids),
                    masks={k: v[rows] for k, v in masks.items()} if masks is not None else None,
                    warnings=warn,
                    gate_open={k: float(v[rows].mean()) for k, v in layers.items()}
                    if layers is not None
                    else None,
                    batch_size=len(requests),
                )
            )
            offset += n
        return results

    def _step(self, requests: list[_Request], layout: RowLayout, index: int) -> None:
        """One denoising step of every request through one batched UNet call."""
        scaled = [
            r.scheduler.scale_model_input(r.latents, r.scheduler.timesteps[index]) for r in requests
        ]
        uncond = [s if r.config.do_cfg else None for r, s in zip(requests, scaled, strict=True)]
        conds = [r.cond for r in requests]

        def rows_of(name: str) -> torch.Tensor:
            return layout.assemble(
                [_uncond(getattr(c, name), r.config) for c, r in zip(conds, requests, strict=True)],
                [
                    getattr(c, name)[-r.config.num_images :]
                    for c, r in zip(conds, requests, strict=True)
                ],
            )

        model_in = layout.assemble(uncond, scaled)
        t = requests[0].scheduler.timesteps[index]
        feed = {
            "sample": model_in,
            # One timestep for every row, as diffusers passes it; the graph broadcasts it.
            "timestep": t.to(device=model_in.device, dtype=torch.float32).reshape(1),
            "encoder_hidden_states": rows_of("embeds"),
            "text_embeds": rows_of("pooled"),
            "time_ids": rows_of("time_ids"),
        }
        out = self.backend.run("unet", feed)["out_sample"].to(model_in.device).float()
        for k, request in enumerate(requests):
            noise_pred = out[layout.cond[k]]
            if request.config.do_cfg:
                uncond_pred = out[layout.uncond[k]]
                noise_pred = uncond_pred + request.config.guidance * (noise_pred - uncond_pred)
            sched = request.scheduler
            request.latents = sched.step(
                noise_pred,
                sched.timesteps[index],
                request.latents,
                **request.step_kwargs,
                return_dict=False,
            )[0]

    def settings(self, config: GenerateConfig) -> dict[str, Any]:
        """The settings recorded in PNG metadata and JSON reports."""
        return {
            "prompt": config.prompt,
            "negative_prompt": config.negative_prompt,
            "seed": config.seed,
            "steps": config.steps,
            "guidance": config.guidance,
            "scheduler": config.scheduler,
            "backend": self.backend.name,
            "height": config.height,
            "width": config.width,
            "num_images": config.num_images,
            "model": self.info.model_spec,
            "model_fingerprint": self.info.unet_fingerprint,
            "gates_sha256": self.info.gates_sha256 or "none",
            "precision": self.info.precision,
        }


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """The generator (ancestral samplers) and eta (DDIM), as diffusers passes them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _progress(steps: Iterable[int], enabled: bool, backend: str) -> Iterator[int]:
    yield from tqdm(steps, desc=f"UNet ({backend})", unit="step", disable=not enabled, leave=False)


def _postprocess(pixels: torch.Tensor) -> list[Any]:
    """VAE output in [-1, 1] -> PIL images, exactly as diffusers' VaeImageProcessor does it."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=LATENT_FACTOR).postprocess(pixels, output_type="pil")
